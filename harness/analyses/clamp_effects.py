"""What clamping one unit changes besides the clamped coordinate (claim N3, CLAIMS.md family N).

Writing v into coordinate n of a layer's ``hook_post`` changes that coordinate by construction;
everything else a clamp does goes through the model: the layer's other units move only when
the generated text changes (a unit's value at a position does not depend on another unit of
the same layer), later layers move through the residual stream, and so does the next-token
distribution. These helpers measure those non-arithmetic parts per prompt, pick the
random-neuron control of matched standard deviation, and compare a clamped SRM profile with
its closed-form prediction (:func:`harness.analyses.srm.substitute_coordinate`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["curve_share_explained", "matched_std_units", "relative_shift"]


def relative_shift(X: torch.Tensor | np.ndarray, base: torch.Tensor | np.ndarray,
                   exclude: int | None = None) -> np.ndarray:
    """Per row i: ||(X_i - base_i)_{-e}|| / ||(base_i)_{-e}||, the L2 shift of each vector
    relative to its baseline with coordinate ``e = exclude`` left out (None: every
    coordinate), in float64. 0 iff the other coordinates did not move; NaN for a baseline row
    that is zero outside e."""
    X = np.asarray(torch.as_tensor(X).double())
    base = np.asarray(torch.as_tensor(base).double())
    if X.shape != base.shape or X.ndim != 2:
        raise ValueError(f"need two (n, d) arrays of one shape, got {X.shape} and {base.shape}")
    keep = np.ones(X.shape[1], dtype=bool)
    if exclude is not None:
        if not 0 <= exclude < X.shape[1]:
            raise ValueError(f"exclude {exclude} out of range 0..{X.shape[1] - 1}")
        keep[exclude] = False
    num = np.linalg.norm((X - base)[:, keep], axis=1)
    den = np.linalg.norm(base[:, keep], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), math.nan)


def matched_std_units(std: np.ndarray, neuron: int, k: int,
                      exclude: Sequence[int] = ()) -> np.ndarray:
    """The k units whose standard deviation is closest to ``std[neuron]`` on a log scale
    (|log std_m - log std_n|; ties: the lower index), never ``neuron`` itself, a unit of
    ``exclude`` or a constant unit: the candidates of the random-neuron control."""
    std = np.asarray(std, dtype=np.float64)
    if std.ndim != 1 or not 0 <= neuron < std.size:
        raise ValueError(f"need a (d,) std vector and a neuron in range, got {std.shape}, {neuron}")
    if not std[neuron] > 0:
        raise ValueError(f"unit {neuron} is constant (std {std[neuron]}): nothing to match")
    eligible = std > 0
    eligible[[neuron, *exclude]] = False
    idx = np.flatnonzero(eligible)
    if idx.size < k:
        raise ValueError(f"only {idx.size} eligible units for {k} candidates")
    gap = np.abs(np.log(std[idx]) - math.log(std[neuron]))
    return idx[np.lexsort((idx, gap))[:k]]


def curve_share_explained(measured: tuple[float, float], predicted: tuple[float, float],
                          baseline: tuple[float, float]) -> float:
    """The share of a clamp's change of the SRM mean curve that the closed form predicts:
    1 - |m - p|^2 / |m - b|^2 for the curves' coefficients (A, B) (the mean curve is A cos +
    B sin, so squared distances between curves over the angle grid are proportional to those
    between coefficients). 1: the clamped curve is the substitution's; 0: no better than the
    baseline curve; NaN when the clamp did not move the curve at all."""
    m, p, b = (np.asarray(x, dtype=np.float64) for x in (measured, predicted, baseline))
    change = float(((m - b) ** 2).sum())
    if change == 0:
        return math.nan
    return 1.0 - float(((m - p) ** 2).sum()) / change
