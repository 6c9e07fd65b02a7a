"""Claim N3's measures (harness/analyses/clamp_effects.py): known answers, properties, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from harness.analyses.clamp_effects import curve_share_explained, matched_std_units, relative_shift
from harness.analyses.srm import mean_curve_coefficients, substitute_coordinate


def test_relative_shift_known_answers():
    base = np.array([[3.0, 4.0, 0.0], [1.0, 2.0, 0.0]])
    X = np.array([[9.0, 4.0, 0.0], [1.0, 2.0, 2.0]])  # row 0 moves in coordinate 0 only
    assert relative_shift(X, base, exclude=0).tolist() == [0.0, 1.0]
    np.testing.assert_allclose(relative_shift(X, base), [6.0 / 5.0, 2.0 / math.sqrt(5.0)])
    assert math.isnan(relative_shift(X, np.array([[5.0, 0, 0], [1, 0, 0]]), exclude=0)[0])
    assert relative_shift(torch.tensor(X, dtype=torch.float32), base, exclude=0)[0] == 0.0


finite = st.floats(-1e3, 1e3, allow_nan=False)


@settings(max_examples=80, deadline=None)
@given(arrays(np.float64, (4, 5), elements=finite), arrays(np.float64, (4, 5), elements=finite),
       st.integers(0, 4), st.floats(0.01, 100), st.floats(-1e3, 1e3))
def test_relative_shift_properties(X, base, e, c, v):
    base[:, (e + 1) % 5] += 1.0 + np.abs(base).max()  # nonzero outside e
    assert (relative_shift(base, base, exclude=e) == 0).all()
    # substituting v into the excluded coordinate moves nothing else: the clamp's arithmetic
    assert (relative_shift(substitute_coordinate(base, e, v).numpy(), base, exclude=e) == 0).all()
    np.testing.assert_allclose(relative_shift(c * X, c * base, exclude=e),
                               relative_shift(X, base, exclude=e), rtol=1e-9)
    assert (relative_shift(X, base, exclude=e) >= 0).all()


def test_relative_shift_errors():
    with pytest.raises(ValueError, match="one shape"):
        relative_shift(np.zeros((2, 3)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="out of range"):
        relative_shift(np.ones((2, 3)), np.ones((2, 3)), exclude=3)


def test_matched_std_units():
    std = np.array([1.0, 10.0, 8.0, 8.0, 0.0, 20.0, 11.0])
    # |log ratio| to 10: 11 -> 0.095, 8 -> 0.223 twice (tie: lower index first), 20 -> 0.693
    assert matched_std_units(std, 1, 4).tolist() == [6, 2, 3, 5]
    assert matched_std_units(std, 1, 2, exclude=[6]).tolist() == [2, 3]
    assert 4 not in matched_std_units(std, 0, 5).tolist()  # a constant unit is never a control
    with pytest.raises(ValueError, match="constant"):
        matched_std_units(std, 4, 1)
    with pytest.raises(ValueError, match="eligible"):
        matched_std_units(std, 1, 6)


def test_curve_share_explained():
    assert curve_share_explained((1.0, 0.0), (1.0, 0.0), (0.0, 0.0)) == 1.0
    assert curve_share_explained((1.0, 0.0), (0.0, 0.0), (0.0, 0.0)) == 0.0
    assert curve_share_explained((1.0, 1.0), (1.0, 0.0), (0.0, 0.0)) == 0.5
    assert math.isnan(curve_share_explained((0.2, 0.1), (1.0, 0.0), (0.2, 0.1)))


def test_a_clamp_that_moves_nothing_else_is_explained_entirely():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(8, 6, generator=gen, dtype=torch.float64)
    clamped = substitute_coordinate(base, 2, 7.0)
    plane = (2, 4)
    m = mean_curve_coefficients(clamped, plane)
    p = mean_curve_coefficients(substitute_coordinate(base, 2, 7.0), plane)
    assert curve_share_explained(m, p, mean_curve_coefficients(base, plane)) == 1.0
    moved = clamped.clone()
    moved[:, 4] += 3.0  # the partner moves too: the closed form no longer explains it all
    share = curve_share_explained(mean_curve_coefficients(moved, plane), p,
                                  mean_curve_coefficients(base, plane))
    assert share < 1.0
