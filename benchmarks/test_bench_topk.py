"""Benchmarks of harness/activations/topk.py: merge cost against the matmul that produces a chunk, and
state size against corpus length. Numbers go to ``benchmark.extra_info``; nothing is asserted
about time.

Run: python -m pytest benchmarks/test_bench_topk.py -q -p no:cacheprovider --benchmark-only
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest
import torch

from harness.activations.topk import StreamingTopK, TopKSpec

N_TOKENS, D_MODEL, D_MLP, K = 2048, 576, 1536, 20  # one chunk of SmolLM2-135M's MLP


def _best_of(fn: Callable[[], object], rounds: int = 5) -> float:
    """Minimum wall time over rounds (after one warm-up), in seconds."""
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_merge_vs_matmul(benchmark, kind: str) -> None:
    """Merge of one (2048, 1536) chunk into a top-20 state, against (2048, 576) @ (576, 1536).

    dense: Gaussian pre-activations, no ties at the top-k threshold (the plain-topk path).
    sparse: relu(x - 2.5), ~0.6 % active like an SAE feature, so most units have fewer than k
    nonzero tokens and ties at 0 straddle the threshold (the exact tie-breaking path).
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N_TOKENS, D_MODEL, generator=gen)  # (n_tokens, d_model)
    w = torch.randn(D_MODEL, D_MLP, generator=gen) / D_MODEL**0.5  # (d_model, d_mlp)
    acts = x @ w  # (n_tokens, d_mlp)
    if kind == "sparse":
        acts = torch.relu(acts - 2.5)
    ctx = torch.arange(N_TOKENS) // 128
    pos = torch.arange(N_TOKENS) % 128
    topk = StreamingTopK(TopKSpec(K, D_MLP))
    topk.update(acts, ctx, pos)  # a full state, as in the steady state of a long stream

    benchmark.pedantic(topk.update, args=(acts, ctx, pos), rounds=5, iterations=1, warmup_rounds=1)
    merge_s = _best_of(lambda: topk.update(acts, ctx, pos))
    matmul_s = _best_of(lambda: x @ w)
    plain_topk_s = _best_of(lambda: acts.topk(K, dim=0))
    # The same ratio on one thread: many small parallel sorts suffer most when other jobs hold
    # the second core, so this is the steadier number on a shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        merge_1t = _best_of(lambda: topk.update(acts, ctx, pos))
        matmul_1t = _best_of(lambda: x @ w)
    finally:
        torch.set_num_threads(threads)
    benchmark.extra_info.update(
        {
            "chunk": [N_TOKENS, D_MLP],
            "active_fraction": float((acts > 0).float().mean()),
            "units_with_ties_at_threshold": float(((acts > 0).sum(0) < K).float().mean()),
            "loadavg_1m": os.getloadavg()[0],
            "k": K,
            "threads": threads,
            "merge_s": merge_s,
            "matmul_s": matmul_s,
            "plain_float_topk_s": plain_topk_s,
            "topk_merge_over_matmul": merge_s / matmul_s,
            "plain_topk_over_matmul": plain_topk_s / matmul_s,
            "merge_tokens_per_s": N_TOKENS / merge_s,
            "topk_merge_over_matmul_1_thread": merge_1t / matmul_1t,
        }
    )


# 256 units, not 1536: ~490 chunks of 2048 x 1536 would take minutes on 2 shared cores, and the
# point here is how state bytes scale with corpus length, which does not depend on the width.
MEM_UNITS, MEM_CHUNK = 256, 2048


@pytest.mark.parametrize("n_tokens", [100_000, 1_000_000], ids=["1e5", "1e6"])
def test_state_bytes_vs_corpus_length(benchmark, n_tokens: int) -> None:
    """Stream n_tokens synthetic tokens (256 units) and record the top-k state's bytes."""

    def stream() -> StreamingTopK:
        gen = torch.Generator().manual_seed(1)
        topk = StreamingTopK(TopKSpec(K, MEM_UNITS))
        for start in range(0, n_tokens, MEM_CHUNK):
            n = min(MEM_CHUNK, n_tokens - start)
            ids = torch.arange(start, start + n)
            topk.update(torch.randn(n, MEM_UNITS, generator=gen), ids // 512, ids % 512)
        return topk

    topk = benchmark.pedantic(stream, rounds=1, iterations=1)
    benchmark.extra_info.update(
        {
            "n_tokens": topk.n_seen,
            "n_units": MEM_UNITS,
            "k": K,
            "state_bytes": topk.nbytes,
            "chunk_bytes": MEM_CHUNK * MEM_UNITS * 4,
            "bytes_per_unit": topk.nbytes // MEM_UNITS,
        }
    )
