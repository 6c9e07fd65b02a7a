"""A simplified Spotlight Resonance Method (claims family N, N1): how a set of vectors sits around
a 2-d plane. For vectors x_v (n, d), an orthonormal plane basis (b1, b2) and angles theta,

    u_v = x_v / ||x_v||,   p_v = (<u_v, b1>, <u_v, b2>)       (normalised in-plane coordinates)
    s(theta) = cos(theta) b1 + sin(theta) b2                   (the spotlight)
    c[v, theta] = <u_v, s(theta)> = p_v1 cos(theta) + p_v2 sin(theta)

with theta = ``linspace(0, 360, n_angles, endpoint=False)`` degrees. Each vector is projected once
((n, d) -> (n, 2)); all angles are then one (n, 2) x (2, n_angles) product. The profile holds
mean_v c[v, theta] and, per threshold t, how many vectors pass t (:class:`Convention`).

Closed forms (what N1 tests): the mean curve is exactly A cos(theta) + B sin(theta), with
(A, B) = mean_v p_v; max_theta c[v, theta] = ||p_v|| (the in-plane norm, at theta = atan2(p_v2,
p_v1)), so a vector passes t at some angle of the circle iff ||p_v|| > t (>= for non-strict
counts), and at some angle of the grid only if; writing v into coordinate i
(:func:`substitute_coordinate`) is the arithmetic part of a clamp of unit i.

Conventions (the statistic only; spotlight and angle grid are the ones above for all three):
- ``source``: the source's ``code/run_srm_sweep_multi_threshold.py`` (ApocryphalEditor/holding):
  COUNT of c > t, strict, t in (0.7, 0.5, 0.3, 0.1); its CLI defaults to 72 angles.
- ``sweeper``: the same repository's ``code/run_srm_sweep.py``: COUNT of c > 0.90, strict (the
  CLI default; the function's own default is 0.95).
- ``bird``: Bird's SRM (arXiv:2505.13471; GeorgeBird1/Spotlight-Resonance-Method,
  ``f_spotlight_resonance``): FRACTION of c >= epsilon, its default epsilon 0.9. Bird's code
  differs in two further ways not reproduced here: its grid ``linspace(0, 2 pi, n)`` includes
  the endpoint, and its probe exp(theta (b1 b2^T - b2 b1^T)) b1 = cos(theta) b1 - sin(theta) b2
  turns the other way (his curve at theta is this one at -theta; pass the plane (b1, -b2)).

Departures from the source scripts: a zero vector (which they keep at cosine 0 after a warning)
and a non-finite entry (NaN through their mean, silently uncounted) raise ``ValueError`` here.
Computation in float32 unless ``dtype`` says otherwise (float64 stays float64; the source's
cosines are float64 products of float32 vectors), on the input's device; the thresholds are
compared as the float64 numbers given, whatever the dtype (c > 0.1 is not c > float32(0.1)).
Cosines are formed in blocks of ``chunk`` vectors; profiles are returned on the CPU.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from harness.analyses.plane import Plane, PlaneLike, as_plane

__all__ = [
    "CONVENTIONS",
    "DEFAULT_CHUNK",
    "Convention",
    "ConventionName",
    "Plane",
    "PlaneLike",
    "SRMProfile",
    "angle_grid",
    "cosines",
    "in_plane_norms",
    "mean_curve_coefficients",
    "mean_curve_peak",
    "normalised_coordinates",
    "predicted_profile",
    "srm",
    "substitute_coordinate",
]

ConventionName = Literal["source", "sweeper", "bird"]
DEFAULT_CHUNK = 2048
"""Vectors per (chunk, n_angles) block of cosines: 2.9 MB at 360 float32 angles (see
benchmarks/test_bench_srm.py)."""
_SHOWN = 10
"""Row indices quoted in an error message."""


@dataclass(frozen=True)
class Convention:
    """Which statistic an SRM profile reports beside the mean cosine."""

    name: ConventionName
    """``"source"``, ``"sweeper"`` or ``"bird"`` (module docstring)."""
    thresholds: tuple[float, ...]
    """Cosine thresholds t, in the order the profile's rows follow."""
    strict: bool
    """True: count c > t (the source scripts); False: c >= t (Bird)."""
    fraction: bool
    """True: the reported statistic is count / n_vectors (Bird); False: the count."""

    def __post_init__(self) -> None:
        if self.name not in ("source", "sweeper", "bird"):
            raise ValueError(f"unknown convention {self.name!r}: 'source', 'sweeper' or 'bird'")
        if not isinstance(self.thresholds, tuple):
            raise ValueError(f"thresholds must be a tuple, got {type(self.thresholds).__name__}")
        if not self.thresholds or not all(math.isfinite(t) for t in self.thresholds):
            raise ValueError(f"need one or more finite thresholds, got {self.thresholds!r}")


CONVENTIONS: dict[str, Convention] = {
    "source": Convention("source", (0.7, 0.5, 0.3, 0.1), strict=True, fraction=False),
    "sweeper": Convention("sweeper", (0.90,), strict=True, fraction=False),
    "bird": Convention("bird", (0.9,), strict=False, fraction=True),
}


@dataclass(frozen=True, eq=False)
class SRMProfile:
    """An SRM sweep: the mean cosine and the threshold counts at every angle (CPU tensors)."""

    angles_deg: Tensor
    """(n_angles,) float64 ``linspace(0, 360, n_angles, endpoint=False)``."""
    mean_cosine: Tensor
    """(n_angles,) float64 mean_v c[v, theta]."""
    counts: Tensor
    """(n_thresholds, n_angles) int64: vectors with c > t (strict) or c >= t, per threshold row."""
    convention: Convention
    """The thresholds, the comparison and the reported statistic."""
    n_vectors: int
    """n, the number of vectors swept."""

    @property
    def thresholds(self) -> tuple[float, ...]:
        return self.convention.thresholds

    @property
    def fractions(self) -> Tensor:
        """(n_thresholds, n_angles) float64 counts / n_vectors."""
        return self.counts.to(torch.float64) / self.n_vectors

    @property
    def reported(self) -> Tensor:
        """The convention's statistic: ``fractions`` for Bird, ``counts`` for the source scripts."""
        return self.fractions if self.convention.fraction else self.counts


def _matrix(X: Tensor | np.ndarray, dtype: torch.dtype | None) -> Tensor:
    """X as an (n >= 1, d >= 2) tensor in the compute dtype (float64 stays, else float32)."""
    X = torch.as_tensor(X).detach()
    if X.ndim != 2 or X.shape[0] < 1 or X.shape[1] < 2:
        raise ValueError(f"need vectors X of shape (n >= 1, d >= 2), got {tuple(X.shape)}")
    dtype = dtype or (torch.float64 if X.dtype == torch.float64 else torch.float32)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    return X.to(dtype)


def _rows(mask: Tensor) -> str:
    rows = mask.nonzero().squeeze(1).tolist()
    return f"{len(rows)} rows, e.g. {rows[:_SHOWN]}"


def _checked_norms(X: Tensor) -> Tensor:
    """||x_v|| (n,), refusing zero, non-finite and over/underflowing norms, naming the rows."""
    norms = torch.linalg.vector_norm(X, dim=1)  # (n,)
    bad = ~torch.isfinite(norms)  # NaN or inf entry, or a norm that overflows
    if bool(bad.any()):
        entries = ~torch.isfinite(X).all(1)  # (n,)
        if bool(entries.any()):
            raise ValueError(f"vectors have NaN or infinite entries: {_rows(entries)}")
        raise ValueError(f"vector norms overflow {X.dtype}: {_rows(bad)}; pass dtype=float64")
    zero = norms == 0  # (n,)
    if bool(zero.any()):
        all_zero = ~(X != 0).any(1)  # (n,) error path only: a second pass is fine
        if bool(all_zero.any()):
            raise ValueError(f"zero vectors have no direction: {_rows(all_zero)}")
        raise ValueError(f"vector norms underflow {X.dtype}: {_rows(zero)}; pass dtype=float64")
    return norms


def normalised_coordinates(
    X: Tensor | np.ndarray, plane: PlaneLike, *, dtype: torch.dtype | None = None
) -> Tensor:
    """p_v = (<u_v, b1>, <u_v, b2>), u_v = x_v / ||x_v||: (n, 2), computed as the projection of
    x_v divided by its norm (linear, so no (n, d) normalised copy is made)."""
    X = _matrix(X, dtype)
    norms = _checked_norms(X)  # (n,)
    return as_plane(plane, X.shape[1]).project(X) / norms[:, None]  # (n, 2)


def angle_grid(n_angles: int) -> Tensor:
    """(n_angles,) float64 degrees, ``np.linspace(0, 360, n_angles, endpoint=False)``."""
    if isinstance(n_angles, bool) or not isinstance(n_angles, (int, np.integer)) or n_angles < 1:
        raise ValueError(f"n_angles must be an int >= 1, got {n_angles!r}")
    return torch.arange(int(n_angles), dtype=torch.float64) * (360.0 / int(n_angles))


def _comparable(thresholds: tuple[float, ...], dtype: torch.dtype, strict: bool) -> Tensor:
    """(n_thresholds,) in dtype, so that a dtype cosine c compares with them as with the float64
    thresholds t: c > t iff c > (t rounded down to dtype); c >= t iff c >= (t rounded up)."""
    t64 = torch.tensor(thresholds, dtype=torch.float64)  # (n_thresholds,)
    t = t64.to(dtype)
    off = t.double() > t64 if strict else t.double() < t64  # rounded the wrong way
    toward = torch.full_like(t, -math.inf if strict else math.inf)
    return torch.where(off, torch.nextafter(t, toward), t)


def _spotlights(angles_deg: Tensor, like: Tensor) -> Tensor:
    """(2, n_angles) rows cos(theta), sin(theta), in like's dtype and on its device."""
    rad = torch.deg2rad(angles_deg)  # (n_angles,) float64
    return torch.stack([rad.cos(), rad.sin()]).to(dtype=like.dtype, device=like.device)


def cosines(
    X: Tensor | np.ndarray,
    plane: PlaneLike,
    n_angles: int = 360,
    *,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """c[v, theta] (n, n_angles) in full, on X's device: for tests and small n."""
    coords = normalised_coordinates(X, plane, dtype=dtype)  # (n, 2)
    return coords @ _spotlights(angle_grid(n_angles), coords)  # (n, n_angles)


def srm(
    X: Tensor | np.ndarray,
    plane: PlaneLike,
    n_angles: int = 360,
    *,
    convention: ConventionName | Convention = "source",
    thresholds: tuple[float, ...] | None = None,
    dtype: torch.dtype | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> SRMProfile:
    """The SRM profile of X (n, d) in ``plane`` (a :class:`Plane` or coordinates (i, j)).

    ``thresholds`` replaces the convention's (keeping its comparison and statistic). Cosines
    are formed ``chunk`` vectors at a time; block sums are accumulated in float64 (the mean)
    and int64 (the counts)."""
    if isinstance(convention, str):
        if convention not in CONVENTIONS:
            raise ValueError(f"unknown convention {convention!r}: one of {sorted(CONVENTIONS)}")
        convention = CONVENTIONS[convention]
    conv = convention
    if thresholds is not None:
        conv = dataclasses.replace(conv, thresholds=tuple(float(t) for t in thresholds))
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    angles = angle_grid(n_angles)  # (n_angles,)
    coords = normalised_coordinates(X, plane, dtype=dtype)  # (n, 2)
    spot = _spotlights(angles, coords)  # (2, n_angles)
    thr = _comparable(conv.thresholds, coords.dtype, conv.strict).tolist()  # exact in dtype
    total = torch.zeros(n_angles, dtype=torch.float64, device=coords.device)
    counts = torch.zeros(len(thr), n_angles, dtype=torch.int64, device=coords.device)
    # Blocks of a few MB stay in cache across the 1 + n_thresholds passes over them; one
    # (n, n_angles) block and a (n_thresholds, n, n_angles) mask were ~5x slower on CPU.
    for lo in range(0, coords.shape[0], chunk):
        c = coords[lo : lo + chunk] @ spot  # (m, n_angles)
        total += c.sum(0)
        for k, t in enumerate(thr):
            counts[k] += (c > t if conv.strict else c >= t).sum(0, dtype=torch.int32)
    n = coords.shape[0]
    return SRMProfile(angles, (total / n).cpu(), counts.cpu(), conv, n)


def mean_curve_coefficients(
    X: Tensor | np.ndarray, plane: PlaneLike, *, dtype: torch.dtype | None = None
) -> tuple[float, float]:
    """(A, B) = mean_v p_v, so mean_v c[v, theta] = A cos(theta) + B sin(theta) exactly."""
    a, b = normalised_coordinates(X, plane, dtype=dtype).to(torch.float64).mean(0).tolist()
    return a, b


def mean_curve_peak(a: float, b: float) -> tuple[float, float]:
    """(peak angle in [0, 360) degrees, amplitude sqrt(A^2 + B^2)) of A cos + B sin; the trough
    is 180 degrees away at minus the amplitude. The angle of a zero curve is 0."""
    return math.degrees(math.atan2(b, a)) % 360.0, math.hypot(a, b)


def in_plane_norms(
    X: Tensor | np.ndarray, plane: PlaneLike, *, dtype: torch.dtype | None = None
) -> Tensor:
    """||p_v|| (n,) = max_theta c[v, theta]: vector v passes t at some angle iff ||p_v|| > t."""
    return torch.linalg.vector_norm(normalised_coordinates(X, plane, dtype=dtype), dim=1)


def substitute_coordinate(X: Tensor | np.ndarray, index: int, v: float) -> Tensor:
    """A copy of X (n, d) with coordinate ``index`` of every vector set to v (before any
    normalisation): the arithmetic prediction of clamping unit ``index`` to v, with nothing
    else changed. X itself is not modified."""
    X = torch.as_tensor(X).detach()
    if X.ndim != 2:
        raise ValueError(f"need vectors X of shape (n, d), got {tuple(X.shape)}")
    if not 0 <= index < X.shape[1]:
        raise ValueError(f"index {index} out of range 0..{X.shape[1] - 1}")
    if not math.isfinite(v):
        raise ValueError(f"clamp value must be finite, got {v}")
    out = X.to(torch.promote_types(X.dtype, torch.float32), copy=True)  # (n, d)
    out[:, index] = v
    return out


def predicted_profile(
    X_baseline: Tensor | np.ndarray,
    index: int,
    v: float,
    plane: PlaneLike,
    n_angles: int = 360,
    *,
    convention: ConventionName | Convention = "source",
    thresholds: tuple[float, ...] | None = None,
    dtype: torch.dtype | None = None,
) -> SRMProfile:
    """:func:`srm` of the baseline vectors with coordinate ``index`` set to v: the profile a
    clamp would give if it changed nothing but that coordinate."""
    X = substitute_coordinate(X_baseline, index, v)  # (n, d)
    return srm(X, plane, n_angles, convention=convention, thresholds=thresholds, dtype=dtype)
