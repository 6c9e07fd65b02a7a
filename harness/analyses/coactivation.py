"""Co-activation rankings in the MLP basis and in the residual basis (claim N4, CLAIMS.md
family N).

The source ranked "neurons correlated with neuron 373" once among hook_post units and once
among the 768 ``resid_post`` coordinates, reading coordinate 373 of the residual as if it were
the neuron (family H's index-namespace mix-up). Two things are measured here: the source's
reading on clamped runs, which the clamp term predicts (every clamped position gets
(v - a_n) W_out[n] added to the residual, so across runs with different v the residual's
coordinates j and n move together with the sign of W_out[n, j] W_out[n, n]); and the
meaningful comparison on unclamped tokens, ranking every unit m by r(post_n, post_m) against
r(post_n, resid . W_out[m] / |W_out[m]|), the residual read along the direction m writes.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

__all__ = ["halves_spearman", "halves_topk_overlap", "predicted_signs", "repairing_null",
           "spearman_vector", "topk_overlap", "unit_directions"]


def unit_directions(w_out: np.ndarray) -> np.ndarray:
    """(d_model, d_mlp) columns W_out[m] / |W_out[m]| from W_out (d_mlp, d_model): resid @
    this reads the residual along each unit's output direction."""
    w = np.asarray(w_out, dtype=np.float64).T  # (d_model, d_mlp)
    norms = np.linalg.norm(w, axis=0, keepdims=True)
    if not (norms > 0).all():
        raise ValueError("a unit with a zero output row has no direction")
    return w / norms


def spearman_vector(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho of two equally long vectors over the entries finite in both (NaN when
    fewer than 3 remain or one side is constant)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return math.nan
    return float(stats.spearmanr(a[ok], b[ok]).statistic)


def topk_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """|top-k(a) & top-k(b)| / k, top-k by value (largest first; NaN entries never rank;
    ties: the lower index)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or not 1 <= k <= a.size:
        raise ValueError(f"need two (d,) vectors and 1 <= k <= d, got {a.shape}, {b.shape}, k={k}")

    def top(x: np.ndarray) -> set[int]:
        x = np.where(np.isnan(x), -np.inf, x)
        return set(np.lexsort((np.arange(x.size), -x))[:k].tolist())

    return len(top(a) & top(b)) / k


def halves_spearman(r: np.ndarray, axis: int = 1) -> np.ndarray:
    """Per row of (B, 2k): Spearman's rho between its first and second halves (a statistic for
    harness.statistics.stats.cluster_bootstrap_columnwise_pearson on [x | x] vs [Y1 | Y2])."""
    r = np.atleast_2d(np.moveaxis(np.asarray(r, dtype=np.float64), axis, -1))
    k = r.shape[-1] // 2
    return np.array([spearman_vector(row[:k], row[k:]) for row in r.reshape(-1, 2 * k)])


def halves_topk_overlap(k: int):
    """The top-k overlap between the halves of each row, as :func:`halves_spearman`."""
    def statistic(r: np.ndarray, axis: int = 1) -> np.ndarray:
        r = np.atleast_2d(np.moveaxis(np.asarray(r, dtype=np.float64), axis, -1))
        h = r.shape[-1] // 2
        return np.array([topk_overlap(row[:h], row[h:], k) for row in r.reshape(-1, 2 * h)])
    return statistic


def repairing_null(a: np.ndarray, b: np.ndarray, statistic, rng: np.random.Generator,
                   n_permutations: int) -> np.ndarray:
    """(n_permutations,) ``statistic(a, b[perm])``: the same comparison after pairing each
    unit's value in one basis with a random unit's in the other (labels permuted)."""
    b = np.asarray(b)
    return np.array([statistic(a, b[rng.permutation(b.size)]) for _ in range(n_permutations)])


def predicted_signs(w_row: np.ndarray, n: int) -> np.ndarray:
    """sign(W_out[n, j] W_out[n, n]) for every residual coordinate j (d_model,): the sign of
    r(resid_n, resid_j) across runs when the clamp term v W_out[n] dominates both."""
    w = np.asarray(w_row, dtype=np.float64)
    if w.ndim != 1 or not 0 <= n < w.size:
        raise ValueError(f"coordinate {n} is not in a residual of width {w.size}: the source's "
                         "reading needs the neuron's index to be a residual coordinate")
    return np.sign(w * w[n])
