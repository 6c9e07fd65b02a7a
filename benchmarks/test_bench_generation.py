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

The default subject's case (``test_default_subject_generation_rate``, skipped when its wheel
is not installed) measures the workload the suite actually decodes: SmolLM2-135M at family N's
own batches (32 rows: N2's baseline; 160 rows: N3's whole dose grid, 20 runs x 8 prompts, one
batch), 50 new tokens, two intra-op threads as the suite runs. There a step is arithmetic on
32-160 rows against a forward's thousands, so the ratio is bounded by the matmul efficiency at
that many rows, by TransformerLens' per-call weight copies (which :func:`decode_layouts`
removes) and by its re-rotation and re-layout of the whole KV cache at every step (which
``incremental_attention`` removes; ``_generate`` decodes under it). Measured (2 cores, 2
threads): 80 rows 0.42 before ``incremental_attention``, 0.46 after; 160 rows 0.45 -> 0.57.

Run: python -m pytest benchmarks/test_bench_generation.py -q -p no:cacheprovider --benchmark-only
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from unittest import mock

import pytest
import torch
from timing import interleaved_best

from harness.activations import generation as gen
from harness.activations.capture import tokenize
from harness.activations.clamp import clamp_hooks
from harness.activations.generation import Clamp, GenerationSpec, run_generation
from harness.activations.layouts import decode_layouts
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
    def decode():
        with decode_layouts(model):  # as the engine decodes (bit-identical, fewer copies)
            return gen._generate(model, tokens, mask, [clamp] * BATCH, [None] * BATCH,
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


def _left_padded(model, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    batch = tokenize(model, prompts, prepend_bos=False)
    width = int(batch.lengths.max())
    pad = model.tokenizer.pad_token_id or 0
    tokens = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i in range(len(prompts)):
        n = int(batch.lengths[i])
        tokens[i, width - n:], mask[i, width - n:] = batch.tokens[i, :n], 1
    return tokens, mask


@pytest.fixture(scope="module")
def default_subject():
    from harness.models.loaders import load_subject
    from harness.models.subjects import SubjectUnavailable, parse_subject

    try:
        return load_subject(parse_subject("smollm2-135m"))
    except SubjectUnavailable as exc:
        pytest.skip(f"default subject unavailable: {exc}")


@pytest.mark.parametrize("rows", [32, 160], ids=["N2-baseline-32", "N3-grid-160"])
@torch.no_grad()
def test_default_subject_generation_rate(benchmark, default_subject, rows):
    """Family N's decoding on SmolLM2-135M at the suite's own batch: generated tokens/s vs the
    plain forward's token rate over the sequences produced (same rows), 50 new tokens, EOS
    off, the clamp hooked on the last layer's MLP."""
    from pathlib import Path

    model = default_subject.model
    lines = [x for x in (Path(__file__).resolve().parents[1] / "fixtures" / "prompts_n.txt")
             .read_text(encoding="utf-8").splitlines() if x.strip()]
    prompts = [lines[i % len(lines)] for i in range(rows)]
    hook = f"blocks.{model.cfg.n_layers - 1}.mlp.hook_post"
    clamps = [Clamp(hook, neuron=7, value=float(i % 10)) for i in range(rows)]
    tokens, mask = _left_padded(model, prompts)
    new_tokens = 50

    def decode():
        with decode_layouts(model):
            return gen._generate(model, tokens, mask, clamps, [None] * rows, [None] * rows, None,
                                 0, new_tokens)

    def decode_without_incremental():  # TransformerLens' attention at every step
        with mock.patch.object(gen, "incremental_attention", lambda *a: nullcontext()):
            return decode()

    new, _, _, _ = decode()
    final = torch.cat([tokens, new], dim=1)
    final_mask = torch.cat([mask, torch.ones_like(new)], dim=1)

    def forward():  # in chunks of 16 rows, as the suite's forwards run (memory)
        for s in range(0, rows, 16):
            model(final[s: s + 16], attention_mask=final_mask[s: s + 16])

    best = interleaved_best({"forward": forward, "decode": decode,
                             "without_incremental": decode_without_incremental}, rounds=1)
    benchmark.pedantic(decode, rounds=1, iterations=1)
    gen_rate = rows * new_tokens / best["decode"]
    forward_rate = final.numel() / best["forward"]
    benchmark.extra_info.update(
        rows=rows, prompt_tokens=tokens.shape[1], new_tokens=new_tokens,
        forward_s=best["forward"], generation_s=best["decode"],
        generated_tokens_per_s=gen_rate, forward_tokens_per_s=forward_rate,
        generation_rate_over_forward_rate=gen_rate / forward_rate, target=">= 0.5",
        without_incremental_s=best["without_incremental"],
        without_incremental_rate_over_forward_rate=rows * new_tokens / best["without_incremental"]
        / forward_rate,
        threads=torch.get_num_threads(), load_average=os.getloadavg()[0])
