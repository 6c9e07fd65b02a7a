"""The simplified Spotlight Resonance Method (harness/analyses/srm.py, with its planes from
harness/analyses/plane.py), claim N1: its closed forms as hypothesis properties over arbitrary
vectors, dimensions and planes; hand-computed answers; the three conventions; the errors.

Properties run in float64, where the closed forms hold to ~1e-15; TOL leaves three orders of
magnitude. Counts compared between two computations of the same cosines (a rotated or rescaled
input, another chunking) may differ only for cosines within TOL of a threshold (near ties);
:func:`_assert_counts_match` allows exactly those.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import Tensor

from harness.analyses.srm import (
    CONVENTIONS,
    Convention,
    Plane,
    angle_grid,
    cosines,
    in_plane_norms,
    mean_curve_coefficients,
    mean_curve_peak,
    predicted_profile,
    srm,
    substitute_coordinate,
)

F64 = torch.float64
TOL = 1e-12
FINE = 3600  # angles for max-over-theta checks: grid max >= norm * cos(0.05 degrees)

# --- strategies ---------------------------------------------------------------------------------


magnitudes = st.floats(1e-3, 1e3)
entries = st.one_of(st.just(0.0), magnitudes, magnitudes.map(lambda x: -x))
"""0 or +-(1e-3..1e3): squares stay far from float64 underflow."""


@st.composite
def vector_sets(draw, max_n: int = 8, max_d: int = 10) -> Tensor:
    """(n, d) float64 vectors: exact zeros, signs and magnitudes 1e-3..1e3 mixed in one row; a
    row that came out all zero gets a 1 in coordinate 0 (zero rows are an error, tested apart)."""
    n, d = draw(st.integers(1, max_n)), draw(st.integers(2, max_d))
    X = torch.tensor(draw(st.lists(entries, min_size=n * d, max_size=n * d)), dtype=F64)
    X = X.reshape(n, d)
    X[(X == 0).all(1), 0] = 1.0
    return X


@st.composite
def planes(draw, d: int) -> Plane:
    """A coordinate plane (i, j), or the span of two seeded Gaussian vectors, orthonormalised."""
    if draw(st.booleans()):
        i, j = draw(st.permutations(range(d)))[:2]
        return Plane.coordinates(i, j, d)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    u, v = torch.randn(2, d, generator=gen, dtype=F64)
    return Plane.spanned_by(u, v, orthonormalise=True)


@st.composite
def problems(draw) -> tuple[Tensor, Plane, int]:
    """(X, plane, n_angles)."""
    X = draw(vector_sets())
    return X, draw(planes(X.shape[1])), draw(st.integers(1, 400))


thresholds = st.floats(-1.1, 1.1, allow_nan=False)


def _near_ties(c: Tensor, t: float) -> Tensor:
    """(n_angles,) how many cosines of c (n, n_angles) are within TOL of t."""
    return ((c - t).abs() <= TOL).sum(0)


def _assert_counts_match(a: Tensor, b: Tensor, c: Tensor, ts: tuple[float, ...]) -> None:
    """Counts a, b (n_thresholds, n_angles) agree but for near ties of the cosines c."""
    for k, t in enumerate(ts):
        assert bool(((a[k] - b[k]).abs() <= _near_ties(c, t)).all()), f"threshold {t}"


def _curve(a: float, b: float, n_angles: int) -> Tensor:
    rad = torch.deg2rad(angle_grid(n_angles))
    return a * rad.cos() + b * rad.sin()  # (n_angles,)


# --- N1 closed forms ----------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(problems())
def test_mean_curve_is_a_cos_plus_b_sin(problem) -> None:
    """mean_v c[v, theta] = A cos(theta) + B sin(theta), (A, B) the mean in-plane coordinates."""
    X, plane, n_angles = problem
    profile = srm(X, plane, n_angles)
    a, b = mean_curve_coefficients(X, plane)
    assert torch.allclose(profile.mean_cosine, _curve(a, b, n_angles), rtol=0, atol=TOL)
    peak, amplitude = mean_curve_peak(a, b)
    assert max(profile.mean_cosine.abs()) <= amplitude + TOL
    assert (
        abs(a * math.cos(math.radians(peak)) + b * math.sin(math.radians(peak)) - amplitude) <= TOL
    )


@settings(max_examples=60, deadline=None)
@given(vector_sets().flatmap(lambda X: st.tuples(st.just(X), planes(X.shape[1]))))
def test_max_cosine_is_the_in_plane_norm(problem) -> None:
    """max_theta c[v, theta] <= ||p_v|| <= 1, and a grid of 3600 angles comes within cos(0.05 deg)."""
    X, plane = problem
    r = in_plane_norms(X, plane)  # (n,)
    top = cosines(X, plane, FINE).amax(1)  # (n,)
    assert bool((r <= 1 + TOL).all())
    assert bool((top <= r + TOL).all())
    assert bool((top >= r * math.cos(math.pi / FINE) - TOL).all())


@settings(max_examples=60, deadline=None)
@given(problems(), st.lists(thresholds, min_size=1, max_size=4), st.booleans())
def test_only_vectors_with_in_plane_norm_above_t_are_counted(problem, ts, strict: bool) -> None:
    """A vector passes t at some angle only if ||p_v|| > t (>= t non-strict), and does pass
    somewhere on the grid when ||p_v|| cos(half a step) > t; so count(t) <= #{||p_v|| > t}."""
    X, plane, n_angles = problem
    ts = tuple(ts)
    profile = srm(X, plane, n_angles, convention="source" if strict else "bird", thresholds=ts)
    r = in_plane_norms(X, plane)  # (n,)
    c = cosines(X, plane, n_angles)  # (n, n_angles)
    for k, t in enumerate(ts):
        passes = (c > t if strict else c >= t).any(1)  # (n,)
        assert bool((passes <= (r > t - TOL)).all())
        assert bool((passes >= (r * math.cos(math.pi / n_angles) > t + TOL)).all())
        assert int(profile.counts[k].max()) <= int((r > t - TOL).sum())


@settings(max_examples=60, deadline=None)
@given(problems(), st.integers(0, 10**6), st.sampled_from([torch.float32, F64]))
def test_strict_and_non_strict_differ_exactly_on_ties(problem, pick: int, dtype) -> None:
    """With t set to one of the cosines: count(c >= t) - count(c > t) = #{c == t}, per angle."""
    X, plane, n_angles = problem
    c = cosines(X, plane, n_angles, dtype=dtype)  # (n, n_angles)
    t = float(c.flatten()[pick % c.numel()])
    gt = srm(X, plane, n_angles, convention="source", thresholds=(t,), dtype=dtype).counts[0]
    ge = srm(X, plane, n_angles, convention="bird", thresholds=(t,), dtype=dtype).counts[0]
    assert torch.equal(ge - gt, (c == t).sum(0))
    assert int((ge - gt).sum()) >= 1


@settings(max_examples=60, deadline=None)
@given(problems(), st.integers(0, 10**6), st.booleans())
def test_thresholds_compare_as_the_float64_values_given(problem, pick: int, up: bool) -> None:
    """In float32, a threshold halfway between two float32 cosines (so not a float32 number)
    splits them as in float64, for both comparisons: no rounding of t to float32 first."""
    X, plane, n_angles = problem
    c = cosines(X, plane, n_angles, dtype=torch.float32)  # (n, n_angles)
    v = c.flatten()[pick % c.numel()]
    other = torch.nextafter(v, torch.tensor(math.inf if up else -math.inf))
    t = (float(v) + float(other)) / 2  # exact in float64, a tie for float32 rounding
    c64 = c.to(F64)
    for convention, want in (("source", c64 > t), ("bird", c64 >= t)):
        got = srm(X, plane, n_angles, convention=convention, thresholds=(t,), dtype=torch.float32)
        assert torch.equal(got.counts[0], want.sum(0)), convention


@settings(max_examples=60, deadline=None)
@given(problems(), st.sampled_from(sorted(CONVENTIONS)), st.integers(1, 9))
def test_counts_follow_the_definition_in_any_chunking(problem, name: str, chunk: int) -> None:
    """counts[k] = #{c > t_k} (strict) or #{c >= t_k}; fraction = count / n; chunking changes
    nothing but near ties."""
    X, plane, n_angles = problem
    conv = CONVENTIONS[name]
    profile = srm(X, plane, n_angles, convention=name)
    c = cosines(X, plane, n_angles)  # (n, n_angles)
    want = torch.stack([(c > t if conv.strict else c >= t).sum(0) for t in conv.thresholds])
    assert torch.equal(profile.counts, want)
    assert torch.equal(profile.fractions, want.to(F64) / X.shape[0])
    assert torch.equal(profile.reported, profile.fractions if conv.fraction else profile.counts)
    chunked = srm(X, plane, n_angles, convention=name, chunk=chunk)
    _assert_counts_match(chunked.counts, profile.counts, c, conv.thresholds)
    assert torch.allclose(chunked.mean_cosine, profile.mean_cosine, rtol=0, atol=TOL)


@settings(max_examples=60, deadline=None)
@given(problems(), st.integers(0, 10**6))
def test_rotating_the_plane_basis_shifts_the_profile(problem, pick: int) -> None:
    """Basis turned by alpha = steps * 360 / n_angles: profile'(theta) = profile(theta + alpha)."""
    X, plane, n_angles = problem
    steps = pick % (3 * n_angles) - n_angles  # alpha in [-360, 720)
    alpha = steps * 360.0 / n_angles
    base = srm(X, plane, n_angles)
    turned = srm(X, plane.rotated(alpha), n_angles)
    shifted = torch.roll(base.mean_cosine, -steps)
    assert torch.allclose(turned.mean_cosine, shifted, rtol=0, atol=TOL)
    c = torch.roll(cosines(X, plane, n_angles), -steps, dims=1)  # (n, n_angles)
    _assert_counts_match(turned.counts, torch.roll(base.counts, -steps, 1), c, base.thresholds)


@settings(max_examples=60, deadline=None)
@given(
    problems().flatmap(
        lambda p: st.tuples(
            st.just(p), st.lists(magnitudes, min_size=len(p[0]), max_size=len(p[0]))
        )
    )
)
def test_invariant_to_positive_scaling_of_each_vector(drawn) -> None:
    (X, plane, n_angles), scales = drawn
    base = srm(X, plane, n_angles)
    scaled = srm(X * torch.tensor(scales, dtype=F64)[:, None], plane, n_angles)
    assert torch.allclose(scaled.mean_cosine, base.mean_cosine, rtol=0, atol=TOL)
    c = cosines(X, plane, n_angles)
    _assert_counts_match(scaled.counts, base.counts, c, base.thresholds)


@settings(max_examples=60, deadline=None)
@given(vector_sets(), st.integers(0, 100), entries)
def test_substitution_closed_form(X: Tensor, i: int, v: float) -> None:
    """After writing v into coordinate i: p_i = v / sqrt(v^2 + ||x without i||^2), so A is its
    mean in any plane with b1 = e_i; X itself is unchanged."""
    d = X.shape[1]
    i %= d
    before = X.clone()
    rest = torch.cat([X[:, :i], X[:, i + 1 :]], 1).pow(2).sum(1)  # (n,)
    assume(v != 0 or bool((rest > 0).all()))  # else a vector c e_i becomes zero: an error, below
    a, _ = mean_curve_coefficients(substitute_coordinate(X, i, v), ((i, (i + 1) % d)))
    assert math.isclose(a, float((v / (v**2 + rest).sqrt()).mean()), rel_tol=0, abs_tol=TOL)
    assert torch.equal(X, before)


# --- known answers ------------------------------------------------------------------------------


def test_axis_vectors_peak_where_they_point() -> None:
    """x = e_0 in the plane (0, 1): c = cos(theta), peak at 0; x = -e_1: c = -sin(theta), 270."""
    X = torch.tensor([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0]], dtype=F64)
    c = cosines(X, (0, 1), 360)  # (2, 360)
    rad = torch.deg2rad(angle_grid(360))
    assert torch.allclose(c[0], rad.cos(), rtol=0, atol=TOL)
    assert torch.allclose(c[1], -rad.sin(), rtol=0, atol=TOL)
    assert c.argmax(1).tolist() == [0, 270]
    for row, peak in ((0, 0.0), (1, 270.0)):
        got = mean_curve_peak(*mean_curve_coefficients(X[row : row + 1], (0, 1)))
        assert got == pytest.approx((peak, 1.0), abs=TOL)


def test_two_diagonals_known_profile() -> None:
    """u = (1, 1)/sqrt2 and (1, -1)/sqrt2: c = cos(theta -+ 45), mean = cos(theta)/sqrt2."""
    X = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=F64)
    profile = srm(X, (0, 1), 8)  # 0, 45, ..., 315 degrees
    assert mean_curve_coefficients(X, (0, 1)) == pytest.approx((2**-0.5, 0.0), abs=TOL)
    # cosines at 0: (.707, .707); 45: (1, 0); 90: (.707, -.707); 135: (0, -1); 180: -(.707, .707)
    # 225: (-1, 0); 270: (-.707, .707); 315: (0, 1)
    assert profile.counts[0].tolist() == [2, 1, 1, 0, 0, 0, 1, 1]  # > 0.7
    assert profile.counts[3].tolist() == [2, 1, 1, 0, 0, 0, 1, 1]  # > 0.1
    assert srm(X, (0, 1), 8, convention="sweeper").counts.tolist() == [[0, 1, 0, 0, 0, 0, 0, 1]]


def test_three_by_three_known_profile() -> None:
    """Rows (3, 4, 0), (0, 0, 5), (0, -2, 0) in the plane (0, 1): p = (.6, .8), (0, 0), (0, -1)."""
    X = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 5.0], [0.0, -2.0, 0.0]], dtype=F64)
    assert in_plane_norms(X, (0, 1)).tolist() == pytest.approx([1.0, 0.0, 1.0], abs=TOL)
    assert mean_curve_coefficients(X, (0, 1)) == pytest.approx((0.2, -0.2 / 3), abs=TOL)
    # angles 0, 90, 180, 270: c = (.6, 0, 0), (.8, 0, -1), (-.6, 0, -s), (-.8, 0, 1), where
    # s = sin(180 deg) = 1.2e-16 in floating point (as in the source's np.sin(np.radians(180)))
    profile = srm(X, (0, 1), 4)
    assert profile.counts.T.tolist() == [[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]]
    # The orthogonal row's cosine is exactly 0 everywhere: counted by >= 0, never by > 0.
    ge = srm(X, (0, 1), 4, convention="bird", thresholds=(0.0,)).counts[0]
    gt = srm(X, (0, 1), 4, convention="source", thresholds=(0.0,)).counts[0]
    assert ge.tolist() == [3, 2, 1, 2] and gt.tolist() == [1, 1, 0, 1]
    bird = srm(X, (0, 1), 4, convention="bird", thresholds=(0.7,))
    assert bird.reported[0].tolist() == pytest.approx([0.0, 1 / 3, 0.0, 1 / 3])


def test_tie_at_one() -> None:
    """x = e_0: c = 1 exactly at 0 degrees, counted by >= 1 and not by > 1."""
    X = torch.tensor([[2.0, 0.0]])
    assert srm(X, (0, 1), 4, convention="bird", thresholds=(1.0,)).counts[0].tolist() == [
        1,
        0,
        0,
        0,
    ]
    assert srm(X, (0, 1), 4, convention="source", thresholds=(1.0,)).counts[0].tolist() == [0] * 4


def test_large_clamp_predicts_spikes_at_0_and_180() -> None:
    """Writing a large +-v into coordinate i points every vector along +-e_i."""
    X = torch.randn(50, 64, generator=torch.Generator().manual_seed(0), dtype=F64)
    for v, spike in ((1e6, 0), (-1e6, 180)):
        clamped = substitute_coordinate(X, 5, v)  # (50, 64)
        profile = predicted_profile(X, 5, v, (5, 9), 360)
        assert torch.equal(profile.counts, srm(clamped, (5, 9)).counts)
        assert profile.counts[:, spike].tolist() == [50] * 4
        assert profile.counts[:, (spike + 90) % 360].tolist() == [0] * 4
        peak, amplitude = mean_curve_peak(*mean_curve_coefficients(clamped, (5, 9)))
        assert (peak - spike + 180) % 360 - 180 == pytest.approx(0, abs=1e-3)
        assert amplitude == pytest.approx(1, abs=1e-9)


def test_conventions_as_published() -> None:
    assert CONVENTIONS["source"] == Convention("source", (0.7, 0.5, 0.3, 0.1), True, False)
    assert CONVENTIONS["sweeper"] == Convention("sweeper", (0.9,), True, False)
    assert CONVENTIONS["bird"] == Convention("bird", (0.9,), False, True)


def test_angle_grid_is_numpy_linspace_without_endpoint() -> None:
    for n in (1, 7, 72, 360, 1000):
        assert np.array_equal(angle_grid(n).numpy(), np.linspace(0, 360, n, endpoint=False))


def test_inputs_numpy_float32_and_vector_planes_agree() -> None:
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(30, 12, generator=gen, dtype=F64)
    base = srm(X, (3, 7))
    e = torch.eye(12, dtype=F64)
    for other in (
        srm(X.numpy(), (3, 7)),
        srm(X, Plane.coordinates(3, 7, 12)),
        srm(X, Plane.spanned_by(e[3], e[7])),
        srm(X, Plane.spanned_by(2 * e[3], e[7] - 5 * e[3], orthonormalise=True)),
        srm(X.float(), (3, 7)),
    ):
        assert torch.allclose(other.mean_cosine, base.mean_cosine, rtol=0, atol=1e-6)
    assert srm(X.float(), (3, 7)).counts.dtype == torch.int64
    assert substitute_coordinate(np.arange(6).reshape(2, 3), 0, 2.5).dtype == torch.float32


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("X", "match"),
    [
        ([[1.0, 2.0], [0.0, 0.0], [3.0, 1.0], [0.0, 0.0]], r"zero vectors.*2 rows, e.g. \[1, 3\]"),
        ([[1.0, math.nan], [1.0, 2.0]], r"NaN or infinite.*\[0\]"),
        ([[1.0, 2.0], [math.inf, 2.0]], r"NaN or infinite.*\[1\]"),
        (np.array([[1e30, 1e30], [1.0, 1.0]], dtype=np.float32), r"overflow.*\[0\].*float64"),
        (np.array([[1.0, 1.0], [1e-30, 0.0]], dtype=np.float32), r"underflow.*\[1\].*float64"),
        ([1.0, 2.0], r"shape \(n >= 1, d >= 2\)"),
        (np.zeros((0, 3)), r"shape \(n >= 1, d >= 2\)"),
        ([[1.0], [2.0]], r"shape \(n >= 1, d >= 2\)"),
    ],
    ids=["zero", "nan", "inf", "overflow", "underflow", "1d", "empty", "d=1"],
)
def test_bad_vectors_are_named(X, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        srm(torch.as_tensor(X), (0, 1))


def test_float32_overflow_and_underflow_pass_in_float64() -> None:
    for X in ([[1e30, 1e30], [1.0, 1.0]], [[1.0, 1.0], [1e-30, 0.0]]):
        profile = srm(np.array(X, dtype=np.float32), (0, 1), dtype=F64)
        assert bool(torch.isfinite(profile.mean_cosine).all())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"plane": (1, 1)}, "must differ"),
        ({"plane": (0, 3)}, r"out of range 0\.\.2"),
        ({"plane": (-1, 0)}, "out of range"),
        ({"plane": (0, 1.5)}, "must be integers"),
        ({"plane": Plane.coordinates(0, 1, 4)}, "dimension 4, the vectors in 3"),
        ({"n_angles": 0}, "n_angles must be an int >= 1"),
        ({"n_angles": 2.5}, "n_angles must be an int >= 1"),
        ({"n_angles": True}, "n_angles must be an int >= 1"),
        ({"convention": "srm"}, "unknown convention"),
        ({"thresholds": ()}, "one or more finite thresholds"),
        ({"thresholds": (0.5, math.nan)}, "one or more finite thresholds"),
        ({"chunk": 0}, "chunk must be >= 1"),
        ({"dtype": torch.float16}, "float32 or torch.float64"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    args = {"plane": (0, 1)} | kwargs
    plane = args.pop("plane")
    with pytest.raises(ValueError, match=match):
        srm(torch.ones(2, 3), plane, **args)


def test_bad_planes() -> None:
    u = torch.tensor([1.0, 2.0, 0.0])
    with pytest.raises(ValueError, match="linearly dependent"):
        Plane.spanned_by(u, -3 * u, orthonormalise=True)
    with pytest.raises(ValueError, match="not orthonormal"):
        Plane.spanned_by(u, torch.tensor([0.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="nonzero"):
        Plane.spanned_by(torch.zeros(3), u, orthonormalise=True)
    with pytest.raises(ValueError, match="NaN or infinite"):
        Plane.spanned_by(u, torch.tensor([0.0, math.nan, 1.0]), orthonormalise=True)
    with pytest.raises(ValueError, match=r"two \(d,\) vectors"):
        Plane.spanned_by(u, torch.ones(4))
    with pytest.raises(ValueError, match="exactly one"):
        Plane(3)


def test_bad_substitutions() -> None:
    X = torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"index 3 out of range 0\.\.2"):
        substitute_coordinate(X, 3, 1.0)
    with pytest.raises(ValueError, match="finite"):
        substitute_coordinate(X, 0, math.nan)
    with pytest.raises(ValueError, match=r"zero vectors.*\[0\]"):  # c e_i clamped to 0
        predicted_profile(torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 0.0]]), 0, 0.0, (0, 1))
