"""Benchmarks of harness/analyses/srm.py: the SRM sweep of 360 angles over 10^4 vectors of
gpt2-small's d_mlp (normalise, project, mean cosine and all four thresholds of the source
convention) against one matmul of the same shape, (10^4, 3072) @ (3072, 2), which reads X once as
the sweep must (target: within 2x), and against the (10^4, 2) @ (2, 360) product that forms the
cosines. Random tensors, no model. Numbers go to ``benchmark.extra_info``; nothing is asserted
about time.

Each case runs with torch's default intra-op threads and with one thread (see
benchmarks/test_bench_geometry.py: on shared, busy cores the one-thread numbers are the steadier).

Run: python -m pytest benchmarks/test_bench_srm.py -q -p no:cacheprovider --benchmark-only
"""

from __future__ import annotations

import os

import pytest
import torch
from timing import THREAD_IDS, THREADS, interleaved_best
from timing import torch_threads as _threads

from harness.analyses.srm import DEFAULT_CHUNK, Plane, normalised_coordinates, srm

N_VECTORS, D_MLP, N_ANGLES = 10_000, 3072, 360  # gpt2-small's MLP width, the write-up's grid
PAIR = (373, 2202)  # the write-up's plane


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(N_VECTORS, D_MLP, generator=gen)  # (n, d_mlp) float32
    W = torch.randn(D_MLP, 2, generator=gen)  # (d_mlp, 2) a plane's basis, as a matmul operand
    coords = torch.randn(N_VECTORS, 2, generator=gen)  # (n, 2)
    spot = torch.randn(2, N_ANGLES, generator=gen)  # (2, n_angles)
    return X, W, coords, spot


@pytest.mark.parametrize("threads", THREADS, ids=THREAD_IDS)
@pytest.mark.parametrize("plane_kind", ["coordinates", "vectors"])
def test_sweep_vs_matmul(benchmark, plane_kind: str, threads: int | None) -> None:
    """srm(X, plane, 360) vs X @ W (10^4, 3072) x (3072, 2) and vs (10^4, 2) x (2, 360).

    coordinates: the plane (e_373, e_2202), projected by indexing; vectors: a general
    orthonormal plane, projected by a (n, d) x (d, 2) product (so at least the matmul itself)."""
    X, W, coords, spot = _inputs()
    if plane_kind == "coordinates":
        plane = Plane.coordinates(*PAIR, d=D_MLP)
    else:
        plane = Plane.spanned_by(W[:, 0], W[:, 1], orthonormalise=True)

    def run() -> object:
        return srm(X, plane, N_ANGLES)

    with _threads(threads) as n_threads:
        benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
        t = interleaved_best(
            {
                "matmul": lambda: X @ W,
                "cosine_product": lambda: coords @ spot,
                "normalise_project": lambda: normalised_coordinates(X, plane),
                "srm": run,
            },
            rounds=3,
        )
    benchmark.extra_info.update(
        {
            "shape": [N_VECTORS, D_MLP, N_ANGLES],
            "plane": plane_kind,
            "thresholds": 4,
            "chunk": DEFAULT_CHUNK,
            "threads": n_threads,
            "loadavg_1min": os.getloadavg()[0],
            **{f"{name}_s": v for name, v in t.items()},
            "srm_over_matmul": t["srm"] / t["matmul"],
            "srm_over_cosine_product": t["srm"] / t["cosine_product"],
            "normalise_project_over_matmul": t["normalise_project"] / t["matmul"],
        }
    )


@pytest.mark.parametrize("threads", THREADS, ids=THREAD_IDS)
@pytest.mark.parametrize("chunk", [512, 2048, 8192, N_VECTORS])
def test_chunk_sweep(benchmark, chunk: int, threads: int | None) -> None:
    """The coordinate-plane sweep per chunk size vs the matmul measured alongside: picks
    DEFAULT_CHUNK (one chunk of all 10^4 vectors is the unchunked reference)."""
    X, W, _, _ = _inputs()

    def run() -> object:
        return srm(X, PAIR, N_ANGLES, chunk=chunk)

    with _threads(threads) as n_threads:
        benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
        t = interleaved_best({"matmul": lambda: X @ W, "srm": run}, rounds=3)
    benchmark.extra_info.update(
        {
            "chunk": chunk,
            "threads": n_threads,
            "loadavg_1min": os.getloadavg()[0],
            "matmul_s": t["matmul"],
            "srm_s": t["srm"],
            "srm_over_matmul": t["srm"] / t["matmul"],
        }
    )
