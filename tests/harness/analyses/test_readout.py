"""Known answers for the ridge read-out heads and their cluster bootstrap (H6, H7)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import Ridge

from harness.analyses.readout import (
    cluster_bootstrap_head_cosines,
    cluster_bootstrap_share,
    cosine_columns,
    ridge_heads,
)


def test_ridge_heads_match_sklearn() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 6)), rng.normal(size=(200, 3))
    y += x @ rng.normal(size=(6, 3))
    ours = ridge_heads(x, y, alpha=2.5)
    ref = Ridge(alpha=2.5).fit(x, y).coef_.T
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-12)


def test_cosine_columns_known_values() -> None:
    a = np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    b = np.array([[2.0, -1.0, 1.0], [0.0, -1.0, 0.0]])
    np.testing.assert_allclose(cosine_columns(a, b)[:2], [1.0, -1.0])
    assert np.isnan(cosine_columns(a, b)[2])  # a zero column has no direction


def test_planted_heads_recover_their_direction() -> None:
    # y_n = x @ w_n + noise: the head of neuron n points along w_n (cosine near 1), and the
    # cosine with another neuron's w is near 0: the null separates.
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3000, 8))
    w = np.linalg.qr(rng.normal(size=(8, 8)))[0][:, :4]
    y = x @ w + 0.1 * rng.normal(size=(3000, 4))
    clusters = np.repeat(np.arange(30), 100)
    cos, est = cluster_bootstrap_head_cosines(x, y, w, clusters, 1.0, np.median, rng, n_resamples=50)
    assert est.ci_low > 0.99 and cos.min() > 0.99
    _, null = cluster_bootstrap_head_cosines(x, y, np.roll(w, 1, axis=1), clusters, 1.0, np.median,
                                             rng, n_resamples=50)
    assert abs(null.value) < 0.1


def test_one_cluster_is_refused() -> None:
    x, y = np.ones((5, 2)), np.ones((5, 1))
    with pytest.raises(ValueError, match="at least 2 clusters"):
        cluster_bootstrap_head_cosines(x, y, np.ones((2, 1)), np.zeros(5), 1.0, np.median,
                                       np.random.default_rng(0))


def test_share_is_pooled_ratio_with_interval() -> None:
    est = cluster_bootstrap_share(np.array([1, 3, 0, 4]), np.array([10, 10, 10, 10]),
                                  np.random.default_rng(0), n_resamples=500)
    assert est.value == pytest.approx(8 / 40)
    assert 0.0 <= est.ci_low <= est.value <= est.ci_high <= 0.4
    with pytest.raises(ValueError):
        cluster_bootstrap_share(np.array([1]), np.array([2]), np.random.default_rng(0))
