"""harness.models.determinism: the pinned SAE training gives the same bits on every simulated machine,
and without the pin the same machines disagree (so the test could fail)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from harness.models import determinism
from harness.models.determinism import (
    PINNED_THREADS,
    decode_cbwr,
    deterministic,
    platform,
    portability,
)

ROOT = Path(__file__).resolve().parents[3]
MACHINES = [(cap, threads) for cap in ("default", "avx2") for threads in ("1", "2")]


def _child(capability: str, threads: str, *flags: str) -> dict:
    """``python -m harness.models.determinism hash`` on a simulated machine: its ATen ISA level and
    OpenMP thread count as the environment says, MKL CNR unset (MKL's own default: off).

    OMP_WAIT_POLICY=PASSIVE changes no bits, only how idle OpenMP threads wait: two children
    with two spinning threads each on 2 shared cores made the 30 tiny steps take 3 s, not 0.15 s.
    """
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "OMP_NUM_THREADS": threads,
           "OMP_WAIT_POLICY": "PASSIVE"}
    for var in ("MKL_CBWR", "MKL_NUM_THREADS", "ONEDNN_MAX_CPU_ISA"):
        env.pop(var, None)
    out = subprocess.run([sys.executable, "-m", "harness.models.determinism", "hash", *flags],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _has_avx2() -> str | None:
    flags = determinism._cpu_flags()
    if flags is None:
        return "no /proc/cpuinfo: cannot tell whether the CPU has AVX2"
    if not {"avx2", "fma"} <= flags:
        return "CPU lacks AVX2/FMA: the pin cannot select ATen's AVX2 kernels here"
    return None


@pytest.mark.slow
def test_pinned_training_is_bit_identical_across_simulated_machines() -> None:
    """Four simulated machines (ATen ISA level x thread count), pinned: one SAE hash and one
    reduction-probe hash. Controls, unpinned in effect: the ISA level changes the SAE hash, the
    thread count changes the probe (the tiny SAE reduces too little to split across threads)."""
    if reason := _has_avx2():
        pytest.skip(reason)
    runs = [(m, ()) for m in MACHINES] + [
        (("default", "2"), ("--torch-first",)),  # the pin comes after the first op: too late
        (("avx2", "1"), ("--no-pin",)),
    ]
    # 6 children (~5.6 s each, 3.4 s of it importing sae_lens), 2 at a time on 2 cores
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda r: _child(*r[0], *r[1]), runs))
    by_run = {(m, flags[0] if flags else "pin"): res
              for (m, flags), res in zip(runs, results, strict=True)}

    pinned = {m: by_run[m, "pin"] for m in MACHINES}
    for machine, res in pinned.items():
        plat = res["platform"]
        assert plat["cpu_capability"] == "AVX2", (machine, plat)
        assert plat["num_threads"] == PINNED_THREADS, (machine, plat)
        if plat["mkl"]["names"] is not None:  # an MKL build: CNR took effect
            assert "STRICT" in plat["mkl"]["names"], (machine, plat)
        assert plat["pin_notes"] == [], (machine, plat)
    hashes = {m: (res["hash"], res["probe"]) for m, res in pinned.items()}
    assert len(set(hashes.values())) == 1, hashes
    sae_hash, probe = next(iter(hashes.values()))

    # Controls: the test can fail. An op before pin() fixes the ISA level for good, and the
    # default level gives other bits than the pinned (AVX2) ones...
    late_default = by_run[("default", "2"), "--torch-first"]
    assert late_default["platform"]["cpu_capability"] == "DEFAULT"
    assert any("an op ran before pin()" in n for n in late_default["platform"]["pin_notes"])
    assert late_default["hash"] != sae_hash
    # ...and without the pin the thread count is the machine's, which changes the reductions.
    one_thread = by_run[("avx2", "1"), "--no-pin"]
    assert one_thread["platform"]["num_threads"] == 1
    assert one_thread["probe"] != probe


def test_decode_cbwr() -> None:
    assert decode_cbwr(0x10002) == ["AUTO", "STRICT"]
    assert decode_cbwr(1) == ["BRANCH_OFF"]
    assert decode_cbwr(3 | 0x10000) == ["COMPATIBLE", "STRICT"]
    assert decode_cbwr(10) == ["AVX2"]
    assert decode_cbwr(99) == ["BRANCH_99"]


def test_portability_reasons() -> None:
    ok, reason = portability("AVX2", PINNED_THREADS, ["AUTO", "STRICT"])
    assert not ok
    assert reason == ("MKL CNR branch AUTO: gemm kernels are chosen per CPU (the AVX2 branch is "
                      "refused on AMD); bits identical across machines with the same CPU model, "
                      "not across models; COMPATIBLE would cost 2.4x the forward")
    ok, reason = portability("AVX2", PINNED_THREADS, ["COMPATIBLE", "STRICT"])
    assert ok and "bits identical on any x86-64 CPU" in reason
    assert portability("AVX2", PINNED_THREADS, ["AVX2", "STRICT"])[0]
    ok, reason = portability("AVX2", PINNED_THREADS, ["AVX2"])
    assert not ok and "without STRICT" in reason
    ok, reason = portability("DEFAULT", 1, ["BRANCH_OFF"])
    assert not ok
    assert reason.count("; ") == 2
    assert "ATen capability DEFAULT" in reason and "1 threads" in reason
    assert "MKL CNR BRANCH_OFF" in reason
    ok, reason = portability("AVX2", PINNED_THREADS, None, "no mkl_serv_cbwr_get")
    assert not ok and "no MKL CNR control (no mkl_serv_cbwr_get)" in reason


def test_platform_fields() -> None:
    plat = platform()
    json.dumps(plat)  # JSON-serialisable
    assert plat["torch"] == torch.__version__
    assert plat["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert plat["num_threads"] == torch.get_num_threads()
    assert isinstance(plat["cpu_vendor"], str) and isinstance(plat["cpu_model"], str)
    assert plat["avx2"] in (True, False, None) and plat["avx512"] in (True, False, None)
    assert plat["deterministic_algorithms"] == torch.are_deterministic_algorithms_enabled()
    mkl = plat["mkl"]
    if mkl["cbwr"] is None:
        assert mkl["reason"]
    else:
        assert mkl["names"] == decode_cbwr(mkl["cbwr"])
    names = mkl["names"]
    assert (plat["bit_portable"], plat["reason"]) == portability(
        plat["cpu_capability"], plat["num_threads"], names, mkl["reason"])


def test_deterministic_restores_the_flag() -> None:
    before = torch.are_deterministic_algorithms_enabled()
    with deterministic():
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert platform()["deterministic_algorithms"]
    assert torch.are_deterministic_algorithms_enabled() == before
