"""Pin what decides the bits of CPU training (the suite's SAEs), and record what the math ran on.

Three libraries choose kernels per machine, and each choice changes float32 bits:

- **ATen** (PyTorch's own CPU kernels) compiles its vectorised kernels once per ISA level
  (``default``, ``avx2``, ``avx512``) and dispatches on the CPU it finds. ``torch.randn``
  (the Box-Muller fill), reductions, RMSNorm, silu and softmax give different bits per level.
  The env var ``ATEN_CPU_CAPABILITY`` overrides the choice; ATen reads it lazily at the first
  dispatched op, so it may be set after ``import torch``, but not after the first op.
- **oneMKL** (statically linked into libtorch_cpu.so, does the float32 GEMMs) picks its code path
  per CPU and, unless Conditional Numerical Reproducibility (CNR) is strict, per thread count
  and memory alignment. ``MKL_CBWR`` is read once, when MKL initialises (the first GEMM or the
  first ``mkl_serv_cbwr_get``); after that ``mkl_serv_cbwr_set`` fails with -8.
- **ATen's parallel reductions** split their work by the thread count, so the number of threads
  changes the summation order: it is fixed too (STRICT CNR alone covers only MKL). Measured
  (torch 2.13, 1-4 threads, an (8192, 576) tensor): full reductions -- sum, mean, dot, prod,
  mse_loss -- change bits; dim reductions, norm, var, rms_norm and cumsum do not.

What is NOT pinned (``platform()`` says so in ``bit_portable``/``reason``): MKL's branch on AMD.
MKL refuses its AVX2 branch on non-Intel CPUs (``mkl_serv_cbwr_set(AVX2|STRICT)`` returns -3)
and falls back to AUTO, i.e. kernels chosen per CPU model. The only vendor-independent branch,
COMPATIBLE, makes the model forward 2.4x slower (766 -> 323 tokens/s measured on an EPYC
Milan), over the suite's budget. So bits are identical across machines with the same CPU model
(and, on Intel, across all AVX2-capable models), not across vendors. The torch/MKL build itself
is, of course, part of what must match.

Use: call :func:`pin` first thing in a process, before any torch op (the ``__main__`` entry
does; calling it from harness.evidence.plugin is left to that module). :func:`platform` records
the outcome next to any result; ``python -m harness.models.determinism hash`` prints both.

Verified by tests/harness/test_determinism.py (four simulated machines give one hash; the
controls show the hash does see the ISA level and the probe the thread count); the cost is in
benchmarks/test_bench_determinism.py (pin: none measurable here; COMPATIBLE: ~3.3x per gemm).
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import platform as _platform
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

PINNED_CAPABILITY = "avx2"
"""ATen ISA level. AVX2 (with FMA), not AVX-512: every x86-64 machine we may run on since
~2015 has it (Haswell, Zen) and AVX-512 machines run it too; the reverse is impossible, so
pinning AVX-512 would exclude this box. Machines without AVX2 cannot reproduce the bits and
are reported so (pin() then leaves the capability to the machine)."""

PINNED_THREADS = 2
"""Intra-op threads. Fixed because ATen's parallel reductions split work by thread count. Two:
this box's core count, the smallest we run on; more threads would not change the bits of MKL
(STRICT) but would of ATen, so a 16-core box also uses 2 (bits over speed)."""

MKL_MODE = "AVX2,STRICT"
"""MKL CNR mode. STRICT: results independent of thread count and alignment (cheap). Branch
AVX2 rather than AUTO: on Intel CPUs it fixes the GEMM kernels to the AVX2 ones whatever the
model (AVX-512 machines included), so Intel machines agree with each other (Intel's CNR
documentation; no Intel box measured here); on AMD MKL refuses
the AVX2 branch and silently uses AUTO,STRICT -- exactly what asking for AUTO,STRICT gives, so
asking for AVX2 costs nothing there (measured: identical mode 0x10002). COMPATIBLE (the only
vendor-independent branch) would cost 2.4x the model forward, ~3.3x a forward-sized gemm. ``platform()`` reports the branch MKL actually took."""

_MKL_BRANCHES = {1: "BRANCH_OFF", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 5: "SSE3", 6: "SSSE3",
                 7: "SSE4_1", 8: "SSE4_2", 9: "AVX", 10: "AVX2", 11: "AVX512_MIC",
                 12: "AVX512", 13: "AVX512_MIC_E1", 14: "AVX512_E1"}
_MKL_CODES = {name: code for code, name in _MKL_BRANCHES.items()}
_MKL_STRICT = 0x10000
_MKL_ERRORS = {-1: "INVALID_SETTINGS", -2: "INVALID_INPUT", -3: "UNSUPPORTED_BRANCH",
               -4: "UNKNOWN_BRANCH", -8: "MODE_CHANGE_FAILURE (MKL already initialised)"}
_NON_FIXED = {"BRANCH_OFF", "AUTO"}

_state: dict[str, Any] = {"called": False, "notes": []}
"""What :func:`pin` did and could not do (reported by :func:`platform`)."""


def _cpuinfo() -> dict[str, str]:
    """First processor's fields of /proc/cpuinfo ({} off Linux)."""
    out: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                out[key.strip()] = value.strip()
    except OSError:
        pass
    return out


def _cpu_flags() -> set[str] | None:
    info = _cpuinfo()
    return set(info["flags"].split()) if "flags" in info else None


def _mkl_cbwr_funcs() -> tuple[Any, Any] | str:
    """(cbwr_get, cbwr_set) from torch's own MKL, or the reason they are unavailable."""
    import torch

    libs = glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "*torch_cpu.*"))
    if not libs:
        return "libtorch_cpu not found next to torch"
    try:
        lib = ctypes.CDLL(libs[0])  # already loaded by torch: same handle
        get, set_ = lib.mkl_serv_cbwr_get, lib.mkl_serv_cbwr_set
    except (OSError, AttributeError) as e:
        return f"no mkl_serv_cbwr_get/set in {os.path.basename(libs[0])} (torch not built with " \
               f"MKL, e.g. ARM or OpenBLAS builds): {e}"
    for fn in (get, set_):
        fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_int]
    return get, set_


def decode_cbwr(value: int) -> list[str]:
    """MKL CNR value -> names, e.g. 0x10002 -> ["AUTO", "STRICT"]."""
    names = [_MKL_BRANCHES.get(value & 0xFFFF, f"BRANCH_{value & 0xFFFF}")]
    return names + (["STRICT"] if value & _MKL_STRICT else [])


def _encode_cbwr(mode: str) -> int:
    parts = [p.strip().upper() for p in mode.split(",")]
    return _MKL_CODES[parts[0]] | (_MKL_STRICT if "STRICT" in parts[1:] else 0)


def pin() -> None:
    """Pin ATen's ISA level, MKL's CNR mode and the thread count; idempotent.

    Sets the env vars before torch is imported when it can (then they cannot be too late),
    imports torch, and checks what took effect; anything that did not is noted for
    :func:`platform` (e.g. a torch op ran before the pin, so ATen and MKL were already set up).
    """
    notes: list[str] = []
    torch_was_loaded = "torch" in sys.modules
    flags = _cpu_flags()
    if flags is not None and not {"avx2", "fma"} <= flags:
        notes.append("CPU lacks AVX2/FMA: ATEN_CPU_CAPABILITY left to the machine")
    elif flags is None and _platform.machine().lower() not in ("x86_64", "amd64"):
        notes.append(f"not x86-64 ({_platform.machine()}): ATEN_CPU_CAPABILITY left alone")
    else:
        os.environ["ATEN_CPU_CAPABILITY"] = PINNED_CAPABILITY
    capability_set = not notes
    os.environ["MKL_CBWR"] = MKL_MODE
    # oneDNN's JIT ISA cap (read at its first use). Float32 matmuls go to MKL at the "highest"
    # matmul precision (set below); oneDNN serves convolutions and bf16/fp16/lowered-precision
    # matmuls, which the suite does not run: the cap is free and narrows them if they appear.
    os.environ["ONEDNN_MAX_CPU_ISA"] = "AVX2"

    import torch

    torch.set_num_threads(PINNED_THREADS)
    torch.set_float32_matmul_precision("highest")  # no bf16/TF32 shortcuts in float32 matmuls
    if capability_set:
        got = torch.backends.cpu.get_cpu_capability()
        if got.lower() != PINNED_CAPABILITY:
            notes.append(f"ATen capability is {got}, not {PINNED_CAPABILITY.upper()}: "
                         + ("an op ran before pin()" if torch_was_loaded else "torch refused it"))
    funcs = _mkl_cbwr_funcs()
    if isinstance(funcs, str):
        notes.append(funcs)
    else:
        get, set_ = funcs
        if not get(-1) & _MKL_STRICT:  # env came too late (MKL initialised): try the API
            rc = set_(_encode_cbwr(MKL_MODE))
            if rc == -3:  # AVX2 branch refused (AMD): what MKL does with the env var anyway
                rc = set_(_MKL_CODES["AUTO"] | _MKL_STRICT)
            if rc:
                notes.append(f"MKL CNR stays {'+'.join(decode_cbwr(get(-1)))}: cbwr_set -> "
                             f"{_MKL_ERRORS.get(rc, rc)}" + (" (torch ran an op before pin())"
                                                             if torch_was_loaded else ""))
    _state.update(called=True, notes=notes)


def portability(capability: str, threads: int, mkl_names: list[str] | None,
                mkl_reason: str | None = None) -> tuple[bool, str]:
    """Whether float32 CPU training is bit-identical across x86-64 machines, and why (not).

    Portable only with ATen at AVX2, the pinned thread count and MKL on a fixed ISA branch
    with STRICT CNR; every unmet condition adds its reason."""
    reasons: list[str] = []
    if capability != "AVX2":
        reasons.append(f"ATen capability {capability}: vectorised kernels (randn, reductions, "
                       "RMSNorm, silu, softmax) give other bits than under AVX2")
    if threads != PINNED_THREADS:
        reasons.append(f"{threads} threads, not {PINNED_THREADS}: ATen's parallel reductions "
                       "sum in a thread-count-dependent order")
    branch = mkl_names[0] if mkl_names else None
    if branch is None:
        reasons.append(f"no MKL CNR control ({mkl_reason}): BLAS kernels chosen per CPU")
    elif branch == "AUTO":
        reasons.append("MKL CNR branch AUTO: gemm kernels are chosen per CPU (the AVX2 branch is "
                       "refused on AMD); bits identical across machines with the same CPU model, "
                       "not across models; COMPATIBLE would cost 2.4x the forward")
    elif branch in _NON_FIXED or branch.startswith("BRANCH_"):
        reasons.append(f"MKL CNR {branch}: gemm kernels, and their bits, depend on the CPU, "
                       "thread count and alignment")
    elif "STRICT" not in mkl_names:
        reasons.append(f"MKL branch {branch} without STRICT: gemm bits may depend on thread "
                       "count and alignment")
    if reasons:
        return False, "; ".join(reasons)
    return True, (f"ATen AVX2 kernels, MKL branch {'+'.join(mkl_names)}, {threads} threads: "
                  "bits identical on any x86-64 CPU that runs this MKL branch, given the same "
                  "torch build")


def platform() -> dict[str, Any]:
    """What the math runs on, JSON-serialisable, with ``bit_portable`` and its ``reason``.

    Imports torch and reads MKL's CNR state, which initialises MKL: call :func:`pin` first.
    """
    import torch

    info = _cpuinfo()
    flags = _cpu_flags()
    capability = torch.backends.cpu.get_cpu_capability()
    threads = torch.get_num_threads()
    mkl: dict[str, Any] = {"cbwr": None, "names": None, "reason": None}
    funcs = _mkl_cbwr_funcs()
    if isinstance(funcs, str):
        mkl["reason"] = funcs
    else:
        value = funcs[0](-1)
        mkl.update(cbwr=value, names=decode_cbwr(value))

    portable, reason = portability(capability, threads, mkl["names"], mkl["reason"])
    return {
        "torch": torch.__version__,
        "cpu_capability": capability,
        "mkl": mkl,
        "num_threads": threads,
        "cpu_vendor": info.get("vendor_id") or _platform.machine(),
        "cpu_model": info.get("model name") or _platform.processor(),
        # family/model/stepping: hypervisors often mask the model name ("AMD EPYC")
        "cpu_id": "/".join(info.get(k, "?") for k in ("cpu family", "model", "stepping")),
        "avx2": None if flags is None else {"avx2", "fma"} <= flags,
        "avx512": None if flags is None else "avx512f" in flags,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "env": {k: os.environ.get(k) for k in ("ATEN_CPU_CAPABILITY", "MKL_CBWR",
                                               "OMP_NUM_THREADS", "ONEDNN_MAX_CPU_ISA")},
        "pinned": _state["called"],
        "pin_notes": list(_state["notes"]),
        "bit_portable": portable,
        "reason": reason,
    }


@contextmanager
def deterministic() -> Iterator[None]:
    """``torch.use_deterministic_algorithms(True)`` (errors, not warnings), then the old setting.

    On CPU few ops have a nondeterministic variant (scatter/index_add with duplicates go through
    atomics only on GPU); the flag makes any that does raise instead of drifting silently."""
    import torch

    old = (torch.are_deterministic_algorithms_enabled(),
           torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old[0], warn_only=old[1])


def state_hash(state: dict[str, Any]) -> str:
    """sha256 over sorted keys: name, shape and contiguous float32 bytes of each tensor."""
    import torch

    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().to(torch.float32).contiguous().cpu()
        h.update(f"{key}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def small_sae_hash(seed: int = 0, steps: int = 30) -> str:
    """sha256 of a tiny sae-lens TopK TrainingSAE after ``steps`` real sae-lens training steps.

    Each step is ``SAETrainer._train_step`` (``training_forward_pass``, firing statistics,
    backward, grad-norm clipping, Adam, lr scheduler), as harness.saes.train's runners do it.
    The data are sparse codes (``torch.randn``/``torch.rand`` from a seeded Generator: ATen's
    vectorised fills) times a dictionary (a matmul: MKL sgemm); the dead-feature window is short
    so the TopK auxiliary loss runs in the later steps.
    """
    import torch
    from sae_lens import TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.registry import get_sae_training_class
    from sae_lens.training.sae_trainer import SAETrainer

    d_in, d_sae, k, n_latent, batch = 64, 256, 8, 512, 128
    cfg = TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, dtype="float32", device="cpu")
    sae_cls, _ = get_sae_training_class(cfg.architecture())
    with torch.random.fork_rng(devices=[]), deterministic():
        torch.manual_seed(seed)
        sae = sae_cls(cfg)
        gen = torch.Generator().manual_seed(seed)
        dictionary = torch.randn(n_latent, d_in, generator=gen) / d_in**0.5  # (n_latent, d_in)
        trainer = SAETrainer(
            SAETrainerConfig(total_training_samples=steps * batch, train_batch_size_samples=batch,
                             lr=3e-3, lr_end=3e-4, dead_feature_window=10, device="cpu"),
            sae, data_provider=iter(()),  # never read: batches are fed by hand
        )
        for step in range(steps):
            codes = torch.randn(batch, n_latent, generator=gen).abs()  # (batch, n_latent)
            codes *= torch.rand(batch, n_latent, generator=gen) < 0.02
            trainer._train_step(sae, codes @ dictionary)  # (batch, d_in)
            trainer.n_training_steps = step + 1
        return state_hash(sae.state_dict())


def reduction_probe(seed: int = 0) -> str:
    """sha256 of full reductions (sum, mean, dot, prod) of a seeded (8192, 576) tensor.

    The tiny SAE of :func:`small_sae_hash` never reduces enough elements for ATen to split the
    work across threads (measured: its hash is the same at 1 and 2 threads); these 4.7M-element
    reductions are split, and their bits change with the thread count (measured at 1-4 threads).
    They give the thread-count pin something to prove."""
    import torch

    x = torch.randn(8192, 576, generator=torch.Generator().manual_seed(seed))
    flat = x.flatten()
    return state_hash({"sum": x.sum(), "mean": x.mean(), "dot": flat.dot(flat),
                       "prod": (1 + x * 1e-4).prod()})


def main(argv: list[str] | None = None) -> None:
    """``python -m harness.models.determinism hash [--no-pin] [--torch-first] [--seed S] [--steps N]``"""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m harness.models.determinism")
    parser.add_argument("command", choices=["hash"])
    parser.add_argument("--no-pin", action="store_true", help="skip pin()")
    parser.add_argument("--torch-first", action="store_true",
                        help="run a torch op (matmul + randn) before pin(): the pin comes too late")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)
    if args.torch_first:
        import torch

        a = torch.randn(64, 64)
        _ = a @ a
    if not args.no_pin:
        pin()
    digest = small_sae_hash(seed=args.seed, steps=args.steps)
    probe = reduction_probe(seed=args.seed)
    print(json.dumps({"hash": digest, "probe": probe, "platform": platform()}))


if __name__ == "__main__":
    main()
