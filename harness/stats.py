"""Estimates with intervals, per-claim random generators, and the verdict rule.

Statistics take an explicit generator (never the global numpy RNG) and return an
:class:`Estimate`. Intervals come from scipy (``scipy.stats.bootstrap``, ``pearsonr``'s
Fisher-z interval) rather than hand-rolled resampling.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

from harness.errors import HarnessError
from harness.registry import Decision


@dataclass(frozen=True)
class Estimate:
    """A measured value with its interval. ``method='exact'`` means no sampling error."""

    value: float
    ci_low: float
    ci_high: float
    n: int
    method: str
    confidence: float = 0.95

    def __post_init__(self) -> None:
        # A percentile interval may exclude a skewed point estimate (legitimate); an inverted
        # interval never is. NaN compares false and passes through, visibly.
        if self.ci_low > self.ci_high:
            raise ValueError(f"inverted interval [{self.ci_low}, {self.ci_high}]")

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        if self.method == "exact":
            return f"{self.value:.4g} (exact, n={self.n})"
        return f"{self.value:.4g} [{self.ci_low:.4g}, {self.ci_high:.4g}] (n={self.n})"


def exact(value: float, n: int) -> Estimate:
    """A value without sampling error (e.g. a max over every entry)."""
    v = float(value)
    return Estimate(v, v, v, n, "exact", 1.0)


def claim_rng(seed: int, claim_id: str) -> np.random.Generator:
    """The generator a claim owns: derived from (session seed, claim id), order-independent."""
    digest = hashlib.sha256(claim_id.encode()).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


def bootstrap(
    data: np.ndarray,
    statistic: Callable[..., float],
    rng: np.random.Generator,
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
) -> Estimate:
    """Percentile bootstrap interval of ``statistic`` over the first axis of ``data``.

    ``statistic`` must accept ``axis`` (numpy reductions do). NaNs are not dropped: a NaN in
    the data gives a NaN estimate, visibly.
    """
    data = np.asarray(data, dtype=float)
    if data.shape[0] < 2:
        raise ValueError(f"a bootstrap needs at least 2 observations, got {data.shape[0]}")
    value = float(statistic(data, axis=0))
    if math.isnan(value):
        return Estimate(math.nan, math.nan, math.nan, int(data.shape[0]), "bootstrap-percentile")
    res = stats.bootstrap(
        (data,),
        statistic,
        n_resamples=n_resamples,
        confidence_level=confidence,
        method="percentile",
        rng=rng,
        vectorized=True,
        axis=0,
    )
    ci = res.confidence_interval
    return Estimate(
        value, float(ci.low), float(ci.high), int(data.shape[0]), "bootstrap-percentile", confidence
    )


def pearson(x: np.ndarray, y: np.ndarray, confidence: float = 0.95) -> Estimate:
    """Pearson r with scipy's Fisher-z interval; NaN (not an error) for a constant input."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    # Exact test: std() of a constant array can round to 1e-17 instead of 0.
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return Estimate(math.nan, math.nan, math.nan, len(x), "pearson-fisher-z", confidence)
    res = stats.pearsonr(x, y)
    ci = res.confidence_interval(confidence_level=confidence)
    return Estimate(float(res.statistic), float(ci.low), float(ci.high), len(x),
                    "pearson-fisher-z", confidence)


def columnwise_pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r between matching columns of two (n, k) arrays; NaN for constant columns.

    Vectorised because scipy's pearsonr takes one pair at a time and a layer has thousands.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"need two (n, k) arrays of one shape, got {x.shape} and {y.shape}")
    xc = x - x.mean(axis=0)
    yc = y - y.mean(axis=0)
    denom = np.sqrt((xc**2).sum(axis=0) * (yc**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (xc * yc).sum(axis=0) / denom
    # Constant columns by exact comparison: a rounded mean leaves a ~1e-17 residue in xc, so
    # denom > 0 alone would report r = 0 (or noise) for them.
    constant = (x == x[:1]).all(axis=0) | (y == y[:1]).all(axis=0)
    return np.where((denom > 0) & ~constant, np.clip(r, -1.0, 1.0), np.nan)


def require_finite(estimate: Estimate, where: str) -> Estimate:
    """``estimate`` unchanged, or HarnessError naming ``where`` and the non-finite fields: a
    NaN headline is an error to locate, never a verdict (it used to read as inconclusive)."""
    bad = [k for k in ("value", "ci_low", "ci_high") if not math.isfinite(getattr(estimate, k))]
    if bad:
        raise HarnessError(f"{where} = {estimate} has a non-finite {', '.join(bad)}: a NaN is "
                           "an error to locate, never a verdict")
    return estimate


def decide(estimate: Estimate, decision: Decision, dtype: str) -> str:
    """supported / refuted / inconclusive, by where the interval lies (see Decision); a
    non-finite estimate raises HarnessError."""
    require_finite(estimate, decision.statistic)
    lo, hi = estimate.ci_low, estimate.ci_high
    if decision.direction == "between":
        assert decision.bounds is not None
        b_lo, b_hi = decision.bounds
        if b_lo < lo and hi < b_hi:
            return "supported"
        if hi <= b_lo or lo >= b_hi:
            return "refuted"
        return "inconclusive"
    t = decision.threshold_for(dtype)
    if decision.direction == "above":
        return "supported" if lo > t else "refuted" if hi <= t else "inconclusive"
    return "supported" if hi < t else "refuted" if lo >= t else "inconclusive"
