"""Benchmarks on the session subject (default SmolLM2): capture overhead, stop-at-layer gain,
top-k merge cost vs the forward that produced the chunk, and top-20 stability vs corpus size.

Ratios go into ``benchmark.extra_info``; nothing here asserts a timing (DESIGN.md targets:
capture / plain forward <= 1.05; harvest throughput >= 0.9 x the forward alone).
Run: ``pytest benchmarks/ --benchmark-only`` (add ``--benchmark-json=FILE`` to keep numbers).
"""

from __future__ import annotations

import time

import pytest
import torch

from harness.activations.capture import capture
from harness.activations.harvest import HarvestSpec, cached_corpus, harvest
from harness.activations.topk import StreamingTopK, TopKSpec
from harness.data.corpus import CorpusRecipe

BATCH, LENGTH, ROUNDS = 8, 128, 3


def _median_seconds(fn, rounds: int = ROUNDS) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@pytest.fixture(scope="module")
def tokens(subject):
    g = torch.Generator().manual_seed(0)
    return torch.randint(100, subject.model.cfg.d_vocab, (BATCH, LENGTH), generator=g)


@torch.no_grad()
def test_capture_overhead(benchmark, subject, tokens):
    model = subject.model
    hooks = [f"blocks.{layer}.mlp.hook_post" for layer in range(model.cfg.n_layers)]
    plain = _median_seconds(lambda: model(tokens, return_type=None))
    benchmark.pedantic(lambda: capture(model, tokens, hooks), rounds=ROUNDS, iterations=1)
    ratio = benchmark.stats.stats.median / plain
    benchmark.extra_info.update(plain_forward_s=plain, capture_over_plain=ratio,
                                tokens=BATCH * LENGTH, hooks=len(hooks), target="<= 1.05")


@torch.no_grad()
def test_stop_at_layer_gain(benchmark, subject, tokens):
    model = subject.model
    hook = ["blocks.3.mlp.hook_post"]
    full = _median_seconds(lambda: model.run_with_cache(tokens, names_filter=hook.__contains__,
                                                        return_type=None))
    benchmark.pedantic(lambda: capture(model, tokens, hook), rounds=ROUNDS, iterations=1)
    benchmark.extra_info.update(full_forward_with_cache_s=full,
                                stop_at_layer_4_over_full=benchmark.stats.stats.median / full)


@torch.no_grad()
def test_topk_merge_vs_forward(benchmark, subject, tokens):
    """Merging one chunk's activations at every MLP layer vs the forward that produced them."""
    model = subject.model
    hooks = [f"blocks.{layer}.mlp.hook_post" for layer in range(model.cfg.n_layers)]
    forward = _median_seconds(lambda: capture(model, tokens, hooks))
    acts = capture(model, tokens, hooks)
    n = BATCH * LENGTH
    ctx = torch.arange(BATCH).repeat_interleave(LENGTH)
    pos = torch.arange(LENGTH).repeat(BATCH)
    flats = [acts[h].reshape(n, -1).float() for h in hooks]
    tops = [StreamingTopK(TopKSpec(20, f.shape[1])) for f in flats]

    def merge():
        for top, flat in zip(tops, flats, strict=True):
            top.update(flat, ctx, pos)

    benchmark.pedantic(merge, rounds=ROUNDS, iterations=1)
    benchmark.extra_info.update(forward_with_capture_s=forward,
                                merge_over_forward=benchmark.stats.stats.median / forward,
                                harvest_throughput_vs_forward=forward / (forward + benchmark.stats.stats.median),
                                target="throughput >= 0.9")


def _token_sets(res, corpus) -> tuple[list[set[int]], torch.Tensor]:
    toks = res.top_tokens(corpus)  # (k, n_units)
    return [set(t[t >= 0].tolist()) for t in toks.T], toks[0]


@pytest.mark.parametrize("n_contexts", [512, 1024, 2048])
def test_top20_stability(benchmark, subject, content_cache, n_contexts):
    """Per-neuron Jaccard of the top-20 argmax-token sets from two independent corpora (seeds
    0 and 1) of the same size: how reproducible Method-1 token lists are at that size."""
    layer = 3
    spec = HarvestSpec(hooks=(f"blocks.{layer}.mlp.hook_post",), k=20, batch_size=16)
    sets, firsts = [], []
    for seed in (0, 1):
        recipe = CorpusRecipe(n_contexts=n_contexts, seed=seed)
        corpus = cached_corpus(content_cache, subject.model.tokenizer, recipe)
        res = benchmark.pedantic(harvest, args=(subject, corpus, spec, content_cache),
                                 rounds=1, iterations=1) if seed == 0 else harvest(subject, corpus, spec, content_cache)
        token_sets, first = _token_sets(res[spec.hooks[0]], corpus)
        sets.append(token_sets)
        firsts.append(first)
    jac = torch.tensor([len(a & b) / len(a | b) if a | b else 1.0 for a, b in zip(*sets, strict=True)])
    benchmark.extra_info.update(
        n_tokens=n_contexts * CorpusRecipe.context_len, layer=layer,
        mean_jaccard=float(jac.mean()), median_jaccard=float(jac.median()),
        share_jaccard_ge_half=float((jac >= 0.5).float().mean()),
        top1_token_match=float((firsts[0] == firsts[1]).float().mean()),
    )
