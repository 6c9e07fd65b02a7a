"""Estimates with intervals, per-claim random generators, and the verdict rule.

Statistics take an explicit generator (never the global numpy RNG) and return an
:class:`Estimate`. Intervals come from scipy (``scipy.stats.bootstrap``, ``pearsonr``'s
Fisher-z interval) rather than hand-rolled resampling.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

from harness.evidence.errors import HarnessError
from harness.evidence.registry import Decision


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


def cluster_bootstrap_columnwise_pearson(
    x: np.ndarray,
    y: np.ndarray,
    clusters: np.ndarray,
    statistic: Callable[..., np.ndarray],
    rng: np.random.Generator,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    chunk: int = 50,
) -> tuple[np.ndarray, Estimate]:
    """(r per column, Estimate of ``statistic`` over the columns' r) with a cluster bootstrap:
    whole clusters (texts) are resampled with replacement, because every column (neuron) is
    measured on the same positions, so resampling columns treats shared positions as
    independent evidence (the random twin's 0.986 [0.986, 0.986]).

    ``statistic(r, axis=1)`` reduces a (resamples, columns) array (e.g. ``np.nanmedian``;
    constant columns give NaN r and are excluded by the nan-reductions, a stated choice). Each
    resample is computed from per-cluster sufficient statistics (n, sums, sums of squares and
    cross-products of the globally centred data), so a resample costs a small matmul, not a
    pass over the data.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    clusters = np.asarray(clusters)
    if x.shape != y.shape or x.ndim != 2 or clusters.shape != (x.shape[0],):
        raise ValueError(f"need x, y of one (n, k) shape and n cluster labels; got {x.shape}, "
                         f"{y.shape}, {clusters.shape}")
    labels, index = np.unique(clusters, return_inverse=True)
    if labels.size < 2:
        raise ValueError(f"a cluster bootstrap needs at least 2 clusters, got {labels.size}")
    r = columnwise_pearson(x, y)
    value = float(statistic(r[None, :], axis=1)[0])
    xc, yc = x - x.mean(axis=0), y - y.mean(axis=0)
    onehot = np.zeros((labels.size, x.shape[0]))
    onehot[index, np.arange(x.shape[0])] = 1.0
    suff = {"n": onehot.sum(axis=1, keepdims=True), "sx": onehot @ xc, "sy": onehot @ yc,
            "sxx": onehot @ (xc * xc), "syy": onehot @ (yc * yc), "sxy": onehot @ (xc * yc)}
    draws = np.empty(n_resamples)
    for start in range(0, n_resamples, chunk):
        b = min(chunk, n_resamples - start)
        w = rng.multinomial(labels.size, np.full(labels.size, 1.0 / labels.size), size=b).astype(float)
        t = {k: w @ v for k, v in suff.items()}
        n = t["n"]
        cov = t["sxy"] - t["sx"] * t["sy"] / n
        var = (t["sxx"] - t["sx"] ** 2 / n) * (t["syy"] - t["sy"] ** 2 / n)
        with np.errstate(invalid="ignore", divide="ignore"):
            rb = np.where(var > 0, cov / np.sqrt(np.where(var > 0, var, 1.0)), np.nan)
        draws[start:start + b] = statistic(np.clip(rb, -1.0, 1.0), axis=1)
    lo, hi = percentile_interval(draws, confidence)  # a NaN draw surfaces
    return r, Estimate(value, lo, hi, int(labels.size),
                       f"cluster bootstrap over {labels.size} texts", confidence)


def percentile_interval(draws: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """The central ``confidence`` range of ``draws``: their (1 - c)/2 and (1 + c)/2 percentiles
    (numpy's linear interpolation). The suite's one percentile rule: every percentile interval
    (:func:`percentile_estimate`, the cluster bootstrap, hand-written resampling loops in the
    claims) goes through it. A NaN draw gives NaN bounds (visibly); :func:`percentile_estimate`
    refuses them instead."""
    alpha = (1 - confidence) / 2
    lo, hi = np.percentile(np.asarray(draws, dtype=float), [100 * alpha, 100 * (1 - alpha)])
    return float(lo), float(hi)


def percentile_estimate(value: float, draws: np.ndarray, n: int, method: str,
                        confidence: float = 0.95) -> Estimate:
    """Estimate(value, percentile interval of ``draws``): the one percentile-interval helper
    for resampling loops written out by hand (stratified, cluster, nested). A non-finite draw
    is a HarnessError: dropping it would condition the interval on the draws that happened to
    be defined."""
    draws = np.asarray(draws, dtype=float)
    bad = int((~np.isfinite(draws)).sum())
    if bad:
        raise HarnessError(f"{method}: {bad} of {draws.size} resampled values are not finite")
    if draws.size < 2:
        raise ValueError(f"an interval needs at least 2 draws, got {draws.size}")
    lo, hi = percentile_interval(draws, confidence)
    return Estimate(float(value), lo, hi, int(n), method, confidence)


def null_estimate(draws: np.ndarray, method: str = "label-shuffle null (mean, 95% range)") -> Estimate:
    """A null distribution as an Estimate: the mean of its ``draws`` with their central 95 %
    range (what a claim's headline interval must clear, harness.evidence.record)."""
    draws = np.asarray(draws, dtype=float)
    return percentile_estimate(float(np.mean(draws)), draws, draws.size, method)


def bootstrap_indices(n: int, rng: np.random.Generator, n_resamples: int) -> Iterator[np.ndarray]:
    """``n_resamples`` index vectors of a plain bootstrap over ``n`` units (drawn with
    replacement, ``rng.integers(0, n, n)``, the same draws as ``rng.choice(values, n)``), for
    statistics that scipy's vectorised bootstrap cannot take (a dict of metrics from
    per-unit sums, a rank correlation over a subset)."""
    if n < 1:
        raise ValueError(f"a bootstrap needs at least 1 unit, got {n}")
    for _ in range(n_resamples):
        yield rng.integers(0, n, n)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho of (x, y); 0 when y is constant. rho is undefined there, but a constant
    y (e.g. equal specialist counts at every depth) shows no association, and a NaN would be
    dropped from a bootstrap, conditioning its interval on the resamples that happened to vary."""
    if len(set(np.asarray(y).tolist())) < 2:
        return 0.0
    return float(stats.spearmanr(x, y).statistic)


def fraction_variance_explained(sse: Any, total: Any) -> Any:
    """FVE = 1 - SSE / total, with SSE = sum_i ||x_i - x_hat_i||^2 and total the sum of
    squares it is compared with: sum_i ||x_i - mean x||^2 (the FVE, sae-lens' R^2; see
    :func:`centred_sum_of_squares`) or sum_i ||x_i||^2 (the "uncentred" reading). The suite's
    one FVE formula (synthetic data, the SAE quality table, R2 and S7); elementwise on arrays,
    so a vectorised bootstrap can pass per-resample sums. An identity reconstruction gives 1,
    reconstructing every x by the mean gives 0 (centred total)."""
    return 1.0 - sse / total


def centred_sum_of_squares(sum_sq: Any, sum_x: np.ndarray, n: Any) -> Any:
    """sum_i ||x_i - mean x||^2 from sufficient statistics: sum_i ||x_i||^2 - ||sum_i x_i||^2 / n
    (``sum_x`` the (d,) vector sum), so per-row sums can be combined over any rows (a
    bootstrap over texts or contexts) without keeping the activations."""
    return sum_sq - np.square(sum_x).sum() / n


def slope(y: np.ndarray) -> float:
    """Least-squares slope of ``y`` against 0, 1, 2, ... (one step per depth or layer), written
    out so that equal y give exactly 0: np.polyfit returned -2e-16 for four equal values, a
    'falling' trend made of rounding (it decided S3 once)."""
    y = np.asarray(y, dtype=float)
    if y.ndim != 1 or y.size < 2:
        raise ValueError(f"a slope needs a 1-d series of at least 2 values, got shape {y.shape}")
    x = np.arange(y.size, dtype=float) - (y.size - 1) / 2  # centred: exact in float64
    return float(np.dot(x, y - y[0]) / np.dot(x, x))  # y - y[0] is exactly 0 where y is constant


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
