"""Linear read-outs of neurons from the residual stream, with cluster-bootstrap intervals
(claims H6 and H7, the projection conversation's readings of a neuron's output weight).

Ridge head for neuron n on centred data (X: (N, d_model) residuals, y_n: (N,) activations)::

    beta_n = (Xc' Xc + alpha I)^-1 Xc' yc_n

Every neuron is measured on the same positions, so intervals resample texts (clusters), never
neurons: each resample re-solves the ridge system from per-text sufficient statistics
(sum x, sum x x', sum x y per text), which costs one (d, d) solve per resample instead of a pass
over the data. sklearn's ``RidgeCV`` chooses alpha (once, on all the data: the interval is of
the heads' directions at that penalty); it has no cluster bootstrap, hence this module.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from harness.statistics.stats import Estimate, percentile_estimate


def cosine_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine between matching columns of a and b, both (d, k): (k,). 0-norm columns -> NaN."""
    num = (a * b).sum(axis=0)
    den = np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _suff(x: np.ndarray, y: np.ndarray, clusters: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per-cluster (n, sum x, sum y, sum x x', sum x y'): (c,), (c, d), (c, k), (c, d, d), (c, d, k)."""
    labels, index = np.unique(clusters, return_inverse=True)
    onehot = np.zeros((labels.size, x.shape[0]))
    onehot[index, np.arange(x.shape[0])] = 1.0
    n = onehot.sum(axis=1)
    sx, sy = onehot @ x, onehot @ y
    sxx = np.stack([x[index == c].T @ x[index == c] for c in range(labels.size)])
    sxy = np.stack([x[index == c].T @ y[index == c] for c in range(labels.size)])
    return n, sx, sy, sxx, sxy


def _solve(w: np.ndarray, suff: tuple[np.ndarray, ...], alpha: float) -> np.ndarray:
    """Ridge heads (d, k) from cluster weights w (c,) and per-cluster sufficient statistics."""
    n, sx, sy, sxx, sxy = suff
    total = w @ n
    mx, my = (w @ sx) / total, (w @ sy) / total
    cxx = np.tensordot(w, sxx, axes=1) - total * np.outer(mx, mx)
    cxy = np.tensordot(w, sxy, axes=1) - total * np.outer(mx, my)
    return np.linalg.solve(cxx + alpha * np.eye(cxx.shape[0]), cxy)


def ridge_heads(x: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    """beta (d, k): the ridge heads of every column of y (N, k) on x (N, d), centred, penalty alpha."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return _solve(np.ones(1), _suff(x, y, np.zeros(x.shape[0], dtype=int)), alpha)


def cluster_bootstrap_head_cosines(
    x: np.ndarray,
    y: np.ndarray,
    targets: np.ndarray,
    clusters: np.ndarray,
    alpha: float,
    statistic: Callable[..., np.ndarray],
    rng: np.random.Generator,
    *,
    n_resamples: int = 200,
) -> tuple[np.ndarray, Estimate]:
    """(cosine per neuron, Estimate of ``statistic`` over neurons) for the ridge heads of y's
    columns on x against ``targets`` (d, k), one target direction per neuron; the interval
    resamples clusters (texts) with replacement and re-solves the heads each time."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0] or targets.shape != (x.shape[1], y.shape[1]):
        raise ValueError(f"need x (N, d), y (N, k), targets (d, k); got {x.shape}, {y.shape}, {targets.shape}")
    suff = _suff(x, y, np.asarray(clusters))
    n_clusters = suff[0].size
    if n_clusters < 2:
        raise ValueError(f"a cluster bootstrap needs at least 2 clusters, got {n_clusters}")
    cos = cosine_columns(_solve(np.ones(n_clusters), suff, alpha), targets)
    value = float(statistic(cos))
    draws = np.empty(n_resamples)
    for i in range(n_resamples):
        w = np.bincount(rng.integers(0, n_clusters, n_clusters), minlength=n_clusters).astype(float)
        draws[i] = statistic(cosine_columns(_solve(w, suff, alpha), targets))
    return cos, percentile_estimate(value, draws, x.shape[0], f"cluster-bootstrap ({n_clusters} texts)")


def cluster_bootstrap_share(hits: np.ndarray, totals: np.ndarray, rng: np.random.Generator,
                            *, n_resamples: int = 2000) -> Estimate:
    """sum(hits) / sum(totals) over clusters, interval by resampling clusters (texts)."""
    hits, totals = np.asarray(hits, dtype=float), np.asarray(totals, dtype=float)
    if hits.shape != totals.shape or hits.ndim != 1 or hits.size < 2 or totals.sum() <= 0:
        raise ValueError(f"need >= 2 clusters of hits and positive totals; got {hits.shape}, {totals.shape}")
    idx = rng.integers(0, hits.size, (n_resamples, hits.size))
    draws = hits[idx].sum(axis=1) / np.maximum(totals[idx].sum(axis=1), 1.0)
    return percentile_estimate(hits.sum() / totals.sum(), draws, int(totals.sum()),
                               f"cluster-bootstrap ({hits.size} texts)")
