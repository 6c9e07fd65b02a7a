"""Benchmarks of harness/analyses/geometry.py: Method-2 scoring of a whole layer at SmolLM2-135M's shape
against the single GEMM of the same size, the matmul bound (DESIGN.md target: within 1.5x).
Random tensors, no model. Numbers go to ``benchmark.extra_info``; nothing is asserted about time.

Each case runs with torch's default intra-op threads and with one thread: on shared, busy
cores the many small element-wise ops after the GEMM pay for every OpenMP barrier when a
sibling thread is descheduled, while the GEMM gains little from a second thread; the load
average is recorded with the numbers.

Run: python -m pytest benchmarks/test_bench_geometry.py -q -p no:cacheprovider --benchmark-only
"""

from __future__ import annotations

import os

import pytest
import torch
from timing import THREAD_IDS, THREADS, interleaved_best
from timing import torch_threads as _threads

from harness.activations.topk import StreamingTopK, TopKSpec
from harness.analyses.geometry import DEFAULT_CHUNK, score_topk

D_VOCAB, D_MODEL, D_MLP, K = 49152, 576, 1536, 20  # SmolLM2-135M: vocabulary x one MLP layer


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    W_E = torch.randn(D_VOCAB, D_MODEL, generator=gen)  # (d_vocab, d_model)
    W = torch.randn(D_MODEL, D_MLP, generator=gen) / D_MODEL**0.5  # (d_model, d_mlp)
    scale = 1 + 0.1 * torch.randn(D_MODEL, generator=gen)  # (d_model,) an ln2.w
    return W_E, W, scale


@pytest.mark.parametrize("threads", THREADS, ids=THREAD_IDS)
@pytest.mark.parametrize("cosine", [True, False], ids=["tl_cosine", "viewer"])
def test_layer_scoring_vs_gemm(benchmark, cosine: bool, threads: int | None) -> None:
    """score_topk over 49152 tokens x 1536 neurons (default chunk) vs (49152, 576) @ (576, 1536)."""
    W_E, W, scale = _inputs()
    s = None if cosine else scale

    def run() -> object:
        return score_topk(W_E, W, K, cosine=cosine, scale=s)

    with _threads(threads) as n_threads:
        benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
        t = interleaved_best({"gemm": lambda: W_E @ W, "scoring": run})
    benchmark.extra_info.update(
        {
            "shape": [D_VOCAB, D_MODEL, D_MLP],
            "k": K,
            "chunk": DEFAULT_CHUNK,
            "threads": n_threads,
            "loadavg_1min": os.getloadavg()[0],
            "gemm_s": t["gemm"],
            "scoring_s": t["scoring"],
            "scoring_over_gemm": t["scoring"] / t["gemm"],
        }
    )


@pytest.mark.parametrize("threads", THREADS, ids=THREAD_IDS)
@pytest.mark.parametrize("chunk", [2048, 4096, 8192, 16384])
def test_chunk_sweep(benchmark, chunk: int, threads: int | None) -> None:
    """Cosine scoring per chunk size vs the GEMM measured alongside: picks DEFAULT_CHUNK."""
    W_E, W, _ = _inputs()

    def run() -> object:
        return score_topk(W_E, W, K, cosine=True, chunk=chunk)

    with _threads(threads) as n_threads:
        benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
        t = interleaved_best({"gemm": lambda: W_E @ W, "scoring": run})
    benchmark.extra_info.update(
        {
            "chunk": chunk,
            "threads": n_threads,
            "loadavg_1min": os.getloadavg()[0],
            "gemm_s": t["gemm"],
            "scoring_s": t["scoring"],
            "scoring_over_gemm": t["scoring"] / t["gemm"],
        }
    )


def test_streamingtopk_merge_baseline(benchmark) -> None:
    """The alternative the module does not take: each chunk's dot scores (token-major) fed whole to
    StreamingTopK.update, context = token id, position = 0."""
    W_E, W, _ = _inputs()
    chunk = DEFAULT_CHUNK

    def run() -> object:
        topk = StreamingTopK(TopKSpec(K, D_MLP))
        for lo in range(0, D_VOCAB, chunk):
            ids = torch.arange(lo, min(lo + chunk, D_VOCAB))
            topk.update(W_E[lo : lo + chunk] @ W, ids, torch.zeros_like(ids))
        return topk.result()

    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    t = interleaved_best(
        {
            "gemm": lambda: W_E @ W,
            "streamingtopk": run,
            "score_topk": lambda: score_topk(W_E, W, K, cosine=False, chunk=chunk),
        }
    )
    benchmark.extra_info.update(
        {
            "chunk": chunk,
            "threads": torch.get_num_threads(),
            "loadavg_1min": os.getloadavg()[0],
            **{f"{name}_s": v for name, v in t.items()},
            "streamingtopk_over_gemm": t["streamingtopk"] / t["gemm"],
            "score_topk_over_gemm": t["score_topk"] / t["gemm"],
        }
    )
