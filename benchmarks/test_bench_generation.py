"""Benchmark of harness/activations/generation.py: batched, KV-cached, clamped generation
against the plain forward's token rate on the same batch (target: generated tokens/s >= 0.5 x
the rate at which one forward processes the final sequences).

Subjects: small in-process HookedTransformers (4 layers, the stand-in BPE tokenizer of
tests/standins.py) so that it runs in seconds: "narrow" (d_model 128) is bound by the per-step
overhead of a forward call, "wide" (d_model 512) by arithmetic, as gpt2-small is on a CPU. The
ratio cannot be large when one decoding step costs about as much as a whole forward: it is at
most ~ BATCH x (t_forward / t_step) / (BATCH x (prompt + new)). 8 prompts of ~16 tokens, 32 new
tokens each (EOS off: every row runs the full length), clamp on ``blocks.2.mlp.hook_post``.
Also reported: the whole engine (generation + rerun with reading), and TransformerLens' own
``generate`` on the same batch under the same hook, with the KV cache and without, so the
hand-written loop's cost and the KV cache's gain are visible. Timings are the best of
alternating rounds (``timing.interleaved_best``) with ONE intra-op thread: on the 2 shared cores
under load, two threads made the wide forward ~10x slower and erratic (OpenMP barriers wait for
a descheduled sibling; see test_bench_geometry.py). Ratios go to ``benchmark.extra_info``;
nothing is asserted about time.

Run: python -m pytest benchmarks/test_bench_generation.py -q -p no:cacheprovider --benchmark-only
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from timing import interleaved_best

from harness.activations import generation as gen
from harness.activations.capture import tokenize
from harness.activations.clamp import clamp_hooks
from harness.activations.generation import Clamp, GenerationSpec, run_generation
from tests.standins import corpus, train_tokenizer

BATCH, PROMPT_TOKENS, NEW, ROUNDS = 8, 16, 32, 2
HOOK = "blocks.2.mlp.hook_post"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=300, model_max_length=256)


@pytest.fixture(scope="module", params=[128, 512], ids=["narrow", "wide"])
def model(request, tokenizer):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    d = request.param
    cfg = HookedTransformerConfig(n_layers=4, d_model=d, d_head=32, n_heads=d // 32,
                                  d_mlp=4 * d, n_ctx=256, d_vocab=300, act_fn="gelu",
                                  normalization_type="LN", seed=0)
    return HookedTransformer(cfg, tokenizer=tokenizer).eval()


@pytest.fixture(scope="module")
def prompts(model) -> tuple[str, ...]:
    """BATCH corpus lines cut to about PROMPT_TOKENS tokens (lengths differ: left padding)."""
    lines = [line for line in corpus(seed=1) if "\n" not in line][:BATCH]
    cut = [model.to_tokens(s, prepend_bos=False)[0, : PROMPT_TOKENS - i % 3] for i, s in
           enumerate(lines)]
    return tuple(model.tokenizer.decode(t) for t in cut)


@contextmanager
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def test_generation_rate_vs_forward(benchmark, model, prompts):
    clamp = Clamp(HOOK, neuron=5, value=10.0)
    spec = GenerationSpec(prompts, NEW, clamp=clamp, stop_at_eos=False, batch_size=BATCH)
    batch = tokenize(model, list(prompts), prepend_bos=False)
    rows = [batch.tokens[i, : batch.lengths[i]] for i in range(BATCH)]
    width = int(batch.lengths.max())
    pad = model.tokenizer.pad_token_id
    tokens = torch.full((BATCH, width), pad, dtype=torch.long)
    mask = torch.zeros(BATCH, width, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, width - len(r):], mask[i, width - len(r):] = r, 1
    decode = lambda: gen._generate(model, tokens, mask, [clamp] * BATCH, [None] * BATCH,  # noqa: E731
                                   [None] * BATCH, None, pad, NEW)
    new, _, _, _ = decode()
    final = torch.cat([tokens, new], dim=1)  # (BATCH, width + NEW) the sequences produced
    final_mask = torch.cat([mask, torch.ones_like(new)], dim=1)

    def tl_generate(kv: bool):
        def run():
            with model.hooks(fwd_hooks=clamp_hooks([clamp] * BATCH, "generation")):
                return model.generate(list(prompts), max_new_tokens=NEW, do_sample=False,
                                      stop_at_eos=False, prepend_bos=False, verbose=False,
                                      use_past_kv_cache=kv, return_type="tokens")
        return run

    with _one_thread():
        best = interleaved_best({
            "forward": lambda: model(final, attention_mask=final_mask),
            "decode": decode,
            "engine": lambda: run_generation(model, spec),
            "tl_generate_kv": tl_generate(True),
            "tl_generate_no_kv": tl_generate(False),
        }, rounds=ROUNDS)
        benchmark.pedantic(decode, rounds=1, iterations=1)  # the table's row; ratios use best
    decode_s = best["decode"]
    forward_rate = final.numel() / best["forward"]  # tokens/s through one plain forward
    gen_rate = BATCH * NEW / decode_s  # generated tokens/s, KV-cached, clamp hooked
    benchmark.extra_info.update(
        batch=BATCH, prompt_tokens=width, new_tokens=NEW, forward_s=best["forward"],
        generation_s=decode_s, step_over_forward=decode_s / NEW / best["forward"],
        generated_tokens_per_s=gen_rate, forward_tokens_per_s=forward_rate,
        generation_rate_over_forward_rate=gen_rate / forward_rate, target=">= 0.5",
        engine_s=best["engine"], engine_rate_over_forward_rate=BATCH * NEW / best["engine"]
        / forward_rate,
        tl_generate_kv_over_ours=best["tl_generate_kv"] / decode_s,
        tl_generate_no_kv_over_ours=best["tl_generate_no_kv"] / decode_s,
        n_params=sum(p.numel() for p in model.parameters()), threads=1,
        load_average=os.getloadavg()[0],
    )
