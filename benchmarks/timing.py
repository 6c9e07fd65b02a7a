"""Timing helper shared by the benchmarks (imported as a sibling module: pytest puts this
directory on sys.path for the benchmark files, which are not a package)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

THREADS = [None, 1]
THREAD_IDS = ["default-threads", "1-thread"]


@contextmanager
def torch_threads(n: int | None) -> Iterator[int]:
    """torch's intra-op thread count inside the block (None: unchanged), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n or before)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def interleaved_best(fns: dict[str, Callable[[], object]], rounds: int = 2) -> dict[str, float]:
    """Minimum wall time of each function, in seconds, alternating them round by round so that a
    load spike from other jobs on the shared cores hits all of them alike (one warm-up each)."""
    best = {name: float("inf") for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best
