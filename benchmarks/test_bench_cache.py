"""Is a cache hit cheaper than the work it replaces? Reread a 64 MB entry vs recompute it.

The producer makes four 2048 x 2048 fp32 matrices (64 MB) with matmuls of inner size 1024
(about 34 GFLOP, a few tenths of a second here). The ratio reread / recompute goes into
``benchmark.extra_info``, with the break-even producer cost: below it, caching a 64 MB entry
costs more than recomputing it. Timings are reported, never asserted.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from harness.activations.cache import ContentCache, cache_key

N_TENSORS, SIDE, INNER = 4, 2048, 1024
FLOP = N_TENSORS * 2 * SIDE * SIDE * INNER


def produce() -> tuple[dict[str, torch.Tensor], dict]:
    """Four (SIDE, SIDE) fp32 products: 64 MB, FLOP floating-point operations."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for i in range(N_TENSORS):
        a = torch.randn(SIDE, INNER, generator=g)  # (SIDE, INNER)
        b = torch.randn(INNER, SIDE, generator=g)  # (INNER, SIDE)
        out[f"w{i}"] = a @ b  # (SIDE, SIDE)
    return out, {"flop": FLOP}


def median_seconds(fn: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def test_reread_vs_recompute_64mb(benchmark, tmp_path: Path) -> None:
    cache = ContentCache(tmp_path)
    start = time.perf_counter()
    first = cache.get_or_compute("bench", "1", {"side": SIDE, "inner": INNER}, produce)
    cold = time.perf_counter() - start
    key = cache_key("bench", "1", side=SIDE, inner=INNER)

    def reread() -> dict[str, torch.Tensor]:
        entry = cache.get("bench", key)
        assert entry is not None
        return entry.tensors

    # Equivalence: the cached path returns exactly what the plain path computes.
    fresh, _ = produce()
    for name, t in reread().items():
        assert torch.equal(t, fresh[name]), name

    nbytes = sum(t.numel() * t.element_size() for t in first.tensors.values())
    recompute_s = median_seconds(produce, rounds=3)
    reread_s = median_seconds(reread, rounds=5)
    gflops = FLOP / recompute_s / 1e9
    benchmark.extra_info.update(
        {
            "entry_mb": nbytes / 2**20,
            "recompute_s": recompute_s,
            "reread_s": reread_s,
            "ratio_reread_over_recompute": reread_s / recompute_s,
            "reread_gb_per_s": nbytes / reread_s / 1e9,
            "cold_miss_s": cold,
            "ratio_write_overhead": (cold - first.meta["compute_seconds"]) / recompute_s,
            "producer_gflop_per_s": gflops,
            "break_even_gflop": reread_s * gflops,
        }
    )
    benchmark.pedantic(reread, rounds=5, warmup_rounds=1)
