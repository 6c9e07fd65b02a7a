"""The neuron clamp of family N: ``act[..., neuron] = value`` at every position of a hook, in
the generation, in the rerun or in both (CLAIMS.md, family N), written per row so that runs
with different clamps (other neurons, other values, none) share one batch."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch

__all__ = ["PHASES", "WHERE", "Clamp", "Phase", "Where", "clamp_hooks"]

Where = Literal["both", "generation-only", "rerun-only"]
WHERE: tuple[str, ...] = get_args(Where)
Phase = Literal["generation", "rerun"]
PHASES: tuple[str, ...] = get_args(Phase)


@dataclass(frozen=True)
class Clamp:
    """``act[..., neuron] = value`` at every position (prompt and generated) of ``hook``."""

    hook: str
    """Hook name, e.g. ``blocks.11.mlp.hook_post``."""
    neuron: int
    """Index into the hook's last dimension."""
    value: float
    """The clamped value v. v = 0 is a run like any other; the baseline is ``clamp=None``."""
    where: Where = "both"
    """"both" (generation and rerun: the source's choice), "generation-only" or "rerun-only"
    (claim N3 separates what the clamp does to the text from what it does to the reading)."""

    def __post_init__(self) -> None:
        if self.where not in WHERE:
            raise ValueError(f"clamp.where must be one of {WHERE}, got {self.where!r}")
        if isinstance(self.neuron, bool) or not isinstance(self.neuron, int) or self.neuron < 0:
            raise ValueError(f"clamp.neuron must be an int >= 0, got {self.neuron!r}")
        if not isinstance(self.value, (int, float)) or not math.isfinite(self.value):
            raise ValueError(f"clamp.value must be a finite number, got {self.value!r}")
        object.__setattr__(self, "value", float(self.value))  # 3 and 3.0: one cache key


def clamp_hooks(clamps: Sequence[Clamp | None], phase: Phase) -> list[tuple[str, Any]]:
    """Forward hooks writing row r's clamp ``clamps[r]`` (None: nothing) in ``phase``
    ("generation" or "rerun"): one hook per hook name, ``act[rows, ..., neurons] = values``,
    so rows of different runs (other neurons, other values, no clamp) share one batch."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    skip = "rerun-only" if phase == "generation" else "generation-only"
    by_hook: dict[str, list[tuple[int, Clamp]]] = {}
    for r, c in enumerate(clamps):
        if c is not None and c.where != skip:
            by_hook.setdefault(c.hook, []).append((r, c))
    return [(h, _rows_hook(entries)) for h, entries in by_hook.items()]


def _rows_hook(entries: list[tuple[int, Clamp]]):
    rows = torch.tensor([r for r, _ in entries])  # (k,)
    neurons = torch.tensor([c.neuron for _, c in entries])  # (k,)
    values = torch.tensor([c.value for _, c in entries], dtype=torch.float64)  # (k,)

    def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:  # act (batch, pos, ..., d)
        dev = act.device
        act[rows.to(dev), ..., neurons.to(dev)] = values.to(dev, act.dtype).view(
            -1, *[1] * (act.ndim - 2))  # (k, pos, ...) <- (k, 1, ...)
        return act
    return hook
