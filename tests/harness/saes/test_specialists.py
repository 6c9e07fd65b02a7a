"""Family S's specialist search: hand-computed cases and properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.saes.specialists import (
    find_specialists,
    most_frequent_coverage,
    peak_activation,
    resample_within_categories,
    scale_free_threshold,
)

LABELS = ["a", "a", "b", "b", "c", "c"]


def test_known_answer():
    codes = np.zeros((6, 4))
    codes[0:2, 1] = 9.0  # feature 1: strong in both "a" texts only -> specialist for a, score 2
    codes[:, 2] = 6.0  # feature 2: strong everywhere -> score 2 - 4 = -2
    codes[2, 3] = 7.0  # feature 3: strong in one "b" text and one "c" text -> b: 1 - 1 = 0
    codes[4, 3] = 7.0
    t = find_specialists(codes, LABELS, threshold=5.0, n_candidates=3)
    by = t.by_category()
    assert by["a"].best_feature == 1 and by["a"].best_score == 2 and by["a"].has_specialist
    assert by["b"].best_score == 0 and not by["b"].has_specialist
    assert by["c"].best_score == 0
    assert t.count == 1


def test_threshold_is_strict():
    codes = np.full((6, 2), 5.0)
    assert find_specialists(codes, LABELS, threshold=5.0).count == 0


def test_candidates_are_top_by_max_activation_with_id_ties():
    codes = np.zeros((6, 8))
    codes[0, [3, 5, 6]] = 1.0
    assert find_specialists(codes, LABELS, 0.5, n_candidates=3).by_category()["a"].candidates == (3, 5, 6)


def test_coverage_peak_and_scale_free_threshold():
    codes = np.array([[0.0, 2.0], [1.0, 3.0], [0.0, 0.5], [0.0, 0.0]])
    assert most_frequent_coverage(codes) == (1, 0.75)
    assert peak_activation(codes) == 3.0
    assert scale_free_threshold(codes, 0.5) == pytest.approx(np.quantile([2.0, 1.0, 3.0, 0.5], 0.5))
    assert scale_free_threshold(np.zeros((2, 2))) == float("inf")


def test_bad_input():
    with pytest.raises(ValueError):
        find_specialists(np.zeros((5, 3)), LABELS, 1.0)
    with pytest.raises(ValueError, match="NaN"):
        find_specialists(np.full((6, 3), np.nan), LABELS, 1.0)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(0.1, 3.0))
def test_count_bounds_and_label_permutation_invariance(seed, threshold):
    rng = np.random.default_rng(seed)
    codes = rng.exponential(1.0, size=(6, 10))
    t = find_specialists(codes, LABELS, threshold)
    assert 0 <= t.count <= 3
    perm = rng.permutation(6)  # permuting texts together with their labels changes nothing
    t2 = find_specialists(codes[perm], [LABELS[i] for i in perm], threshold)
    assert t2.to_dict() == t.to_dict()


def test_stratified_resample_keeps_category_sizes():
    idx = resample_within_categories(LABELS, np.random.default_rng(0))
    assert sorted(LABELS[i] for i in idx) == sorted(LABELS)
