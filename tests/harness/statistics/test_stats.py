"""Known answers and properties of harness/statistics/stats.py."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import stats as scipy_stats

from harness.evidence.errors import HarnessError
from harness.evidence.registry import Decision, RegistryError
from harness.statistics.stats import (
    Estimate,
    bootstrap,
    claim_rng,
    columnwise_pearson,
    decide,
    exact,
    pearson,
)

# --- Estimate and exact -------------------------------------------------------------------


def test_exact_has_a_zero_width_interval() -> None:
    e = exact(3, n=7)
    assert e == Estimate(3.0, 3.0, 3.0, 7, "exact", 1.0)
    assert str(e) == "3 (exact, n=7)"


def test_estimate_rejects_an_inverted_interval_but_keeps_nan() -> None:
    with pytest.raises(ValueError, match="inverted"):
        Estimate(0.5, 0.6, 0.4, 10, "bootstrap-percentile")
    nan = Estimate(math.nan, math.nan, math.nan, 10, "bootstrap-percentile")
    assert math.isnan(nan.to_dict()["value"])


# --- pearson ------------------------------------------------------------------------------


def test_pearson_of_a_perfect_line_is_one_with_a_degenerate_interval() -> None:
    x = np.arange(10.0)
    up, down = pearson(x, 2 * x + 1), pearson(x, -3 * x)
    assert (up.value, up.ci_low, up.ci_high) == pytest.approx((1.0, 1.0, 1.0))
    assert (down.value, down.ci_low, down.ci_high) == pytest.approx((-1.0, -1.0, -1.0))
    assert up.n == 10 and up.method == "pearson-fisher-z"


def test_pearson_hand_computed_with_fisher_z_interval() -> None:
    # dx = dy-permuted (-1.5, -.5, .5, 1.5): sum dx dy = 4, sum dx^2 = sum dy^2 = 5 -> r = 0.8.
    # Fisher z: atanh(0.8) +- 1.959964 / sqrt(n - 3), n = 4.
    e = pearson(np.array([1, 2, 3, 4]), np.array([1, 3, 2, 4]))
    z, half = math.atanh(0.8), scipy_stats.norm.ppf(0.975)
    assert e.value == pytest.approx(0.8)
    assert e.ci_low == pytest.approx(math.tanh(z - half))
    assert e.ci_high == pytest.approx(math.tanh(z + half))


@pytest.mark.parametrize("value", [0.1, 0.7, 123.456])
def test_pearson_of_a_constant_input_is_nan_everywhere(value: float) -> None:
    # np.full(3, 0.1).std() is 1.4e-17, not 0: the check must be exact.
    e = pearson(np.full(3, value), np.arange(3.0))
    assert math.isnan(e.value) and math.isnan(e.ci_low) and math.isnan(e.ci_high)


# --- columnwise_pearson -------------------------------------------------------------------


def test_columnwise_pearson_matches_scipy_per_column() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6))
    y = 0.5 * x + rng.normal(size=(40, 6)) * np.linspace(0.1, 3, 6)
    expected = [scipy_stats.pearsonr(x[:, j], y[:, j]).statistic for j in range(6)]
    np.testing.assert_allclose(columnwise_pearson(x, y), expected, rtol=1e-12, atol=1e-14)


def test_columnwise_pearson_is_nan_for_constant_columns() -> None:
    x = np.arange(10.0)
    # 0.1 repeated: its column mean rounds to 0.09999999999999999 when reduced along axis 0.
    X = np.stack([x, np.full(10, 0.1), x, np.zeros(10)], axis=1)
    Y = np.stack([x**2, x, np.full(10, 0.1), np.zeros(10)], axis=1)
    r = columnwise_pearson(X, Y)
    assert r[0] == pytest.approx(scipy_stats.pearsonr(x, x**2).statistic)
    assert np.isnan(r[1:]).all()


def test_columnwise_pearson_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="one shape"):
        columnwise_pearson(np.zeros((5, 2)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="one shape"):
        columnwise_pearson(np.zeros(5), np.zeros(5))


# Integer-valued floats: the properties are about the formula, not about catastrophic
# cancellation in 1e300-scale inputs.
_columns = st.integers(2, 12).flatmap(
    lambda n: st.tuples(
        *[arrays(np.float64, (n, 3), elements=st.integers(-50, 50).map(float)) for _ in range(2)]
    )
)


@settings(max_examples=60, deadline=None)
@given(_columns)
def test_columnwise_pearson_is_bounded_and_symmetric(xy: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = xy
    r = columnwise_pearson(x, y)
    finite = r[~np.isnan(r)]
    assert ((finite >= -1.0) & (finite <= 1.0)).all()
    np.testing.assert_array_equal(r, columnwise_pearson(y, x))


@settings(max_examples=60, deadline=None)
@given(
    _columns,
    st.floats(0.1, 10.0),
    st.floats(-100.0, 100.0),
    st.integers(0, 2),
)
def test_columnwise_pearson_is_invariant_to_positive_affine_maps(
    xy: tuple[np.ndarray, np.ndarray], scale: float, shift: float, column: int
) -> None:
    x, y = xy
    x2 = x.copy()
    x2[:, column] = scale * x[:, column] + shift
    np.testing.assert_allclose(columnwise_pearson(x2, y), columnwise_pearson(x, y), atol=1e-9)


# --- bootstrap ----------------------------------------------------------------------------


def test_bootstrap_is_deterministic_given_the_generator() -> None:
    data = np.random.default_rng(1).normal(size=60)
    first = bootstrap(data, np.mean, np.random.default_rng(7), n_resamples=300)
    again = bootstrap(data, np.mean, np.random.default_rng(7), n_resamples=300)
    other = bootstrap(data, np.mean, np.random.default_rng(8), n_resamples=300)
    assert first == again
    assert (first.ci_low, first.ci_high) != (other.ci_low, other.ci_high)
    assert first.value == pytest.approx(data.mean())
    assert first.ci_low < first.value < first.ci_high
    assert (first.n, first.method) == (60, "bootstrap-percentile")


def test_bootstrap_propagates_nan_and_needs_two_observations() -> None:
    e = bootstrap(np.array([1.0, np.nan, 3.0]), np.mean, np.random.default_rng(0))
    assert math.isnan(e.value) and math.isnan(e.ci_low) and math.isnan(e.ci_high)
    with pytest.raises(ValueError, match="at least 2"):
        bootstrap(np.array([1.0]), np.mean, np.random.default_rng(0))


# --- claim_rng ----------------------------------------------------------------------------


def test_claim_rng_does_not_depend_on_call_order() -> None:
    h1_first = claim_rng(0, "H1").random(5)
    claim_rng(0, "H2").random(5)
    h2_second = claim_rng(0, "H2").random(5)
    claim_rng(0, "H1").random(100)  # drawing from one claim's generator moves no other
    assert np.array_equal(claim_rng(0, "H1").random(5), h1_first)
    assert np.array_equal(claim_rng(0, "H2").random(5), h2_second)


def test_claim_rng_differs_by_claim_and_by_seed() -> None:
    base = claim_rng(0, "H1").random(5)
    assert not np.array_equal(base, claim_rng(0, "H2").random(5))
    assert not np.array_equal(base, claim_rng(1, "H1").random(5))


# --- decide -------------------------------------------------------------------------------

ABOVE = Decision(statistic="s", direction="above", threshold=0.5)
BELOW = Decision(statistic="s", direction="below", threshold={"float32": 0.5, "float64": 0.1})
BETWEEN = Decision(statistic="s", direction="between", bounds=(-0.1, 0.1))


def _iv(lo: float, hi: float) -> Estimate:
    return Estimate((lo + hi) / 2, lo, hi, 30, "bootstrap-percentile")


@pytest.mark.parametrize(
    ("decision", "lo", "hi", "verdict"),
    [
        (ABOVE, 0.6, 0.9, "supported"),
        (ABOVE, 0.5, 0.9, "inconclusive"),  # touching the threshold is not above it
        (ABOVE, 0.4, 0.6, "inconclusive"),
        (ABOVE, 0.1, 0.5, "refuted"),  # entirely at or below
        (BELOW, 0.1, 0.4, "supported"),
        (BELOW, 0.1, 0.5, "inconclusive"),
        (BELOW, 0.5, 0.9, "refuted"),
        (BETWEEN, -0.05, 0.05, "supported"),
        (BETWEEN, -0.1, 0.05, "inconclusive"),  # touching a bound is not inside
        (BETWEEN, -0.2, 0.2, "inconclusive"),
        (BETWEEN, 0.1, 0.3, "refuted"),
        (BETWEEN, -0.3, -0.1, "refuted"),
    ],
)
def test_decide(decision: Decision, lo: float, hi: float, verdict: str) -> None:
    assert decide(_iv(lo, hi), decision, "float32") == verdict


def test_decide_on_exact_values_at_the_threshold() -> None:
    assert decide(exact(0.5, 1), ABOVE, "float32") == "refuted"
    assert decide(exact(0.5000001, 1), ABOVE, "float32") == "supported"
    assert decide(exact(0.5, 1), BELOW, "float32") == "refuted"


def test_decide_uses_the_dtype_threshold_and_raises_for_a_missing_one() -> None:
    assert decide(exact(0.3, 1), BELOW, "float32") == "supported"
    assert decide(exact(0.3, 1), BELOW, "float64") == "refuted"
    with pytest.raises(RegistryError, match="no threshold for dtype 'bfloat16'"):
        decide(exact(0.3, 1), BELOW, "bfloat16")


@pytest.mark.parametrize("decision", [ABOVE, BELOW, BETWEEN])
@pytest.mark.parametrize("fields", [("value",), ("ci_low", "ci_high"), ("value", "ci_low", "ci_high"),
                                    ("ci_high",)])
def test_decide_refuses_a_nan(decision: Decision, fields: tuple[str, ...]) -> None:
    """A NaN anywhere in the estimate is an error naming the statistic (it used to read as
    inconclusive, and a NaN point estimate with a finite interval used to decide)."""
    est = dataclasses.replace(Estimate(0.5, 0.4, 0.6, 5, "b"), **dict.fromkeys(fields, math.nan))
    with pytest.raises(HarnessError, match=f"{decision.statistic} = .* non-finite {', '.join(fields)}"):
        decide(est, decision, "float32")


def test_cluster_bootstrap_resamples_equal_explicit_resampling() -> None:
    """Each draw from sufficient statistics equals Pearson r on the data with the drawn texts
    repeated (the known answer), and the point is columnwise_pearson."""
    from harness.statistics.stats import cluster_bootstrap_columnwise_pearson

    gen = np.random.default_rng(0)
    clusters = np.repeat(np.arange(6), [3, 5, 2, 4, 6, 3])
    x = gen.normal(size=(clusters.size, 7)) * 100 + 1e4  # offset: centring must be right
    y = x * 0.3 + gen.normal(size=x.shape)
    seen = []

    def stat(r, axis):
        seen.append(r.copy())
        return np.nanmedian(r, axis=axis)

    r, est = cluster_bootstrap_columnwise_pearson(x, y, clusters, stat, np.random.default_rng(5),
                                                  n_resamples=20, chunk=7)
    np.testing.assert_allclose(r, columnwise_pearson(x, y))
    replay = np.random.default_rng(5)
    draws = np.concatenate(seen[1:])  # seen[0] is the point
    k = 0
    for size in (7, 7, 6):
        w = replay.multinomial(6, np.full(6, 1 / 6), size=size)
        for counts in w:
            rows = np.concatenate([np.flatnonzero(clusters == c).repeat(n) for c, n in enumerate(counts)])
            np.testing.assert_allclose(draws[k], columnwise_pearson(x[rows], y[rows]), rtol=1e-9, atol=1e-12)
            k += 1
    assert est.n == 6 and est.ci_low <= est.value <= est.ci_high


def test_cluster_bootstrap_widens_what_a_neuron_bootstrap_calls_exact() -> None:
    """Columns that share positions (every neuron on the same tokens) and nearly the same signal:
    resampling columns gives a zero-width interval, resampling texts does not."""
    from harness.statistics.stats import cluster_bootstrap_columnwise_pearson

    gen = np.random.default_rng(1)
    clusters = np.repeat(np.arange(10), 8)
    base = gen.normal(size=(80, 1))
    x = base + 1e-9 * gen.normal(size=(80, 50))
    y = base + 0.8 * gen.normal(size=(80, 1)) + 1e-9 * gen.normal(size=(80, 50))
    r, clustered = cluster_bootstrap_columnwise_pearson(x, y, clusters, np.nanmedian,
                                                        np.random.default_rng(2), n_resamples=300)
    by_neuron = bootstrap(r, np.nanmedian, np.random.default_rng(2), n_resamples=300)
    assert by_neuron.ci_high - by_neuron.ci_low < 1e-6
    assert clustered.ci_high - clustered.ci_low > 0.05


def test_slope_known_answers() -> None:
    from harness.statistics.stats import slope

    assert slope([1.0, 1.0, 1.0, 1.0]) == 0.0  # exactly: np.polyfit gave -2e-16
    assert slope([0.514, 0.514, 0.514]) == 0.0
    assert slope([0.0, 1.0, 2.0, 3.0]) == pytest.approx(1.0)
    assert slope([3.0, 1.0]) == pytest.approx(-2.0)
    np.testing.assert_allclose(slope(np.array([0.3, 0.1, 0.9, 0.2])),
                               np.polyfit(np.arange(4.0), [0.3, 0.1, 0.9, 0.2], 1)[0], rtol=1e-12)
    with pytest.raises(ValueError):
        slope([1.0])


def test_percentile_estimate_refuses_non_finite_draws() -> None:
    from harness.statistics.stats import percentile_estimate

    est = percentile_estimate(0.5, np.linspace(0, 1, 101), 9, "m")
    assert (est.value, est.n, est.method) == (0.5, 9, "m")
    assert (est.ci_low, est.ci_high) == (pytest.approx(0.025), pytest.approx(0.975))
    with pytest.raises(HarnessError, match="1 of 3 resampled values are not finite"):
        percentile_estimate(0.5, np.array([0.1, np.nan, 0.2]), 3, "m")


# --- one percentile rule, nulls, resampling, rank correlation, FVE --------------------------


def test_percentile_interval_known_answer_and_nan() -> None:
    from harness.statistics.stats import percentile_interval

    lo, hi = percentile_interval(np.arange(101.0))  # 0..100: the 2.5th and 97.5th are 2.5, 97.5
    assert (lo, hi) == (pytest.approx(2.5), pytest.approx(97.5))
    assert percentile_interval(np.arange(11.0), confidence=0.8) == (pytest.approx(1.0), pytest.approx(9.0))
    assert all(math.isnan(b) for b in percentile_interval(np.array([0.1, np.nan, 0.3])))


def test_null_estimate_is_the_mean_with_the_central_range() -> None:
    from harness.statistics.stats import null_estimate

    est = null_estimate(np.arange(101.0))
    assert (est.value, est.n) == (50.0, 101)
    assert (est.ci_low, est.ci_high) == (pytest.approx(2.5), pytest.approx(97.5))
    assert est.method == "label-shuffle null (mean, 95% range)"


def test_bootstrap_indices_are_rng_choice_draws() -> None:
    from harness.statistics.stats import bootstrap_indices

    values = np.array([0.3, 1.7, -2.0, 5.0, 0.0, 9.5, 4.4])
    a, b = np.random.default_rng(11), np.random.default_rng(11)
    ours = [np.median(values[idx]) for idx in bootstrap_indices(values.size, a, 200)]
    choice = [np.median(b.choice(values, values.size)) for _ in range(200)]
    assert ours == choice  # the same stream as the rng.choice loops it replaced
    with pytest.raises(ValueError):
        next(bootstrap_indices(0, a, 1))


def test_spearman_known_answers_and_constant_zero() -> None:
    from harness.statistics.stats import spearman

    assert spearman([6, 8, 10, 11], [1, 2, 3, 4]) == pytest.approx(1.0)
    assert spearman([6, 8, 10, 11], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([6, 8, 10, 11], [2, 2, 3, 3]) == pytest.approx(2 / math.sqrt(5))  # ties: average ranks
    assert spearman([6, 8, 10, 11], [3, 3, 3, 3]) == 0.0  # undefined rho: no association


def test_fve_identity_is_one_and_mean_reconstruction_is_zero() -> None:
    from harness.statistics.stats import centred_sum_of_squares, fraction_variance_explained

    x = np.array([[1.0, 2.0], [3.0, -1.0], [0.0, 0.0], [4.0, 3.0]])  # (n, d)
    centred = centred_sum_of_squares((x**2).sum(), x.sum(0), len(x))
    assert centred == pytest.approx(((x - x.mean(0)) ** 2).sum())
    assert centred == pytest.approx(20.0)  # by hand: mean (2, 1), squared deviations 2 + 5 + 5 + 8
    assert fraction_variance_explained(0.0, centred) == 1.0  # x_hat = x
    mean_sse = ((x - x.mean(0)) ** 2).sum()  # x_hat = mean x
    assert fraction_variance_explained(mean_sse, centred) == pytest.approx(0.0, abs=1e-12)
    assert fraction_variance_explained(5.0, centred) == pytest.approx(0.75)
    # uncentred reading: against sum ||x||^2 = 40; elementwise over resamples
    np.testing.assert_allclose(fraction_variance_explained(np.array([0.0, 10.0]), (x**2).sum()), [1.0, 0.75])
