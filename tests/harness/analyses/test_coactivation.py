"""Claim N4's rankings (harness/analyses/coactivation.py): known answers, properties, the
clamp-term prediction on synthetic runs, and the halves statistics inside the cluster bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from harness.analyses.coactivation import (
    halves_spearman,
    halves_topk_overlap,
    predicted_signs,
    repairing_null,
    spearman_vector,
    topk_overlap,
    unit_directions,
)
from harness.statistics.stats import cluster_bootstrap_columnwise_pearson, columnwise_pearson


def test_topk_overlap_known_answers():
    a = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    assert topk_overlap(a, a, 2) == 1.0
    assert topk_overlap(a, a[::-1], 2) == 0.0
    assert topk_overlap(a, np.array([5.0, 0.0, 3.0, 2.0, 1.0]), 2) == 0.5
    assert topk_overlap(np.array([1.0, np.nan, 0.0]), np.array([1.0, 2.0, 0.0]), 2) == 0.5
    with pytest.raises(ValueError, match="k <= d"):
        topk_overlap(a, a, 6)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float64, 12, elements=st.floats(-1, 1)), arrays(np.float64, 12, elements=st.floats(-1, 1)),
       st.integers(1, 12))
def test_topk_overlap_properties(a, b, k):
    o = topk_overlap(a, b, k)
    assert o == topk_overlap(b, a, k) and 0 <= o <= 1 and topk_overlap(a, a, k) == 1.0
    assert topk_overlap(a, b, 12) == 1.0


def test_spearman_vector_and_halves():
    a = np.arange(6.0)
    assert spearman_vector(a, a ** 3) == pytest.approx(1.0)
    assert spearman_vector(a, -a) == pytest.approx(-1.0)
    assert spearman_vector(np.array([0.0, 1.0, np.nan, 3.0]), np.array([0.0, 1.0, 9.0, 2.0])) == pytest.approx(1.0)
    assert math.isnan(spearman_vector(a, np.ones(6)))
    rows = np.stack([np.r_[a, a], np.r_[a, -a]])  # (2, 12): halves agree, then reverse
    np.testing.assert_allclose(halves_spearman(rows), [1.0, -1.0])
    np.testing.assert_allclose(halves_topk_overlap(2)(rows), [1.0, 0.0])


def test_repairing_null_is_the_statistic_under_random_labels():
    rng = np.random.default_rng(0)
    a = rng.normal(size=200)
    draws = repairing_null(a, a.copy(), spearman_vector, np.random.default_rng(1), 300)
    assert draws.shape == (300,) and abs(draws.mean()) < 0.02 and draws.max() < 0.3
    again = repairing_null(a, a.copy(), spearman_vector, np.random.default_rng(1), 300)
    assert np.array_equal(draws, again)


def test_unit_directions_and_predicted_signs():
    w_out = np.array([[3.0, 4.0], [0.0, -2.0], [1.0, 0.0]])  # (d_mlp 3, d_model 2)
    u = unit_directions(w_out)
    np.testing.assert_allclose(u, [[0.6, 0.0, 1.0], [0.8, -1.0, 0.0]])
    assert predicted_signs(np.array([2.0, -1.0, 0.0, 3.0]), 0).tolist() == [1.0, -1.0, 0.0, 1.0]
    assert predicted_signs(np.array([2.0, -1.0, 0.0, -3.0]), 3).tolist() == [-1.0, 1.0, -0.0, 1.0]
    with pytest.raises(ValueError, match="residual coordinate"):
        predicted_signs(np.ones(4), 4)
    with pytest.raises(ValueError, match="zero output row"):
        unit_directions(np.zeros((2, 3)))


def test_the_clamp_term_predicts_the_sources_residual_correlations():
    """Synthetic clamped runs: resid = per-prompt offset + (v - a) W_out[n] + noise. Across
    prompts x v the residual coordinates correlate with coordinate n by sign(W[j] W[n])."""
    rng = np.random.default_rng(3)
    d_model, n = 40, 7
    w = rng.normal(size=d_model)
    prompts, doses = rng.normal(size=(12, d_model)), np.array([-20, -10, -3, 0, 3, 10, 20.0])
    resid = np.concatenate([prompts + (v - 0.5) * w + 0.1 * rng.normal(size=(12, d_model))
                            for v in doses])  # (84, d_model)
    r = columnwise_pearson(np.repeat(resid[:, [n]], d_model, axis=1), resid)
    agree = np.sign(r) == predicted_signs(w, n)
    agree[n] = True
    assert agree.all()


def test_halves_statistics_in_the_cluster_bootstrap():
    rng = np.random.default_rng(0)
    clusters = np.repeat(np.arange(10), 20)
    x = rng.normal(size=200)
    y = x[:, None] * rng.uniform(0.1, 1, size=6) + rng.normal(size=(200, 6))  # ranked by weight
    X, Y = np.tile(x[:, None], 12), np.hstack([y, y])
    r, est = cluster_bootstrap_columnwise_pearson(X, Y, clusters, halves_spearman, rng, n_resamples=50)
    assert est.value == pytest.approx(1.0) and est.ci_low == pytest.approx(1.0)
    _, est = cluster_bootstrap_columnwise_pearson(X, np.hstack([y, -y]), clusters, halves_spearman, rng,
                                                  n_resamples=50)
    assert est.value == pytest.approx(-1.0)
