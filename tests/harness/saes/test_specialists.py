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


def test_stratified_bootstrap_keeps_sizes_and_is_seeded():
    from harness.saes.specialists import stratified_bootstrap

    def inside_a(rows):  # texts of category "a" in a resample: always 2
        return sum(LABELS[i] == "a" for i in rows)

    draws = stratified_bootstrap(LABELS, inside_a, np.random.default_rng(0), 20)
    assert draws.dtype == float and (draws == 2).all()
    again = stratified_bootstrap(LABELS, lambda rows: float(rows[0]), np.random.default_rng(5), 30)
    assert (again == stratified_bootstrap(LABELS, lambda rows: float(rows[0]), np.random.default_rng(5), 30)).all()


# --- held-out scoring --------------------------------------------------------------------------

# 12 texts: per category, 2 train then 2 held-out
SPLIT_LABELS = ["a"] * 4 + ["b"] * 4 + ["c"] * 4
SPLITS = ["train", "train", "heldout", "heldout"] * 3


def test_split_rows_from_the_texts_split():
    from harness.saes.specialists import SplitRows

    rows = SplitRows.from_splits(SPLIT_LABELS, SPLITS)
    assert rows.select.tolist() == [0, 1, 4, 5, 8, 9] and rows.score.tolist() == [2, 3, 6, 7, 10, 11]
    assert rows.labels_of(rows.score) == ["a", "a", "b", "b", "c", "c"]
    empty = SplitRows.from_splits(SPLIT_LABELS, ["train"] * 12)
    assert empty.score.size == 0


def test_heldout_scoring_known_answer():
    """Feature 1 is the luckiest candidate on the train texts of "a" and does not hold up on the
    held-out ones; feature 2 holds up for "b"."""
    from harness.saes.specialists import SplitRows, heldout_specialists

    codes = np.zeros((12, 4))
    codes[[0, 1], 1] = 9.0  # feature 1: both train "a" texts, no held-out one -> train 2, held-out 0
    codes[[4, 5, 6, 7], 2] = 8.0  # feature 2: every "b" text -> train 2, held-out 2
    codes[10, 2] = 8.0  # ... and one held-out "c" text -> held-out score for b: 2 - 1 = 1
    rows = SplitRows.from_splits(SPLIT_LABELS, SPLITS)
    t = heldout_specialists(codes, rows, threshold=5.0, n_candidates=2)
    by = t.by_category()
    assert (by["a"].best_feature, by["a"].selection_score, by["a"].best_score) == (1, 2, 0)
    assert not by["a"].has_specialist
    assert (by["b"].best_feature, by["b"].selection_score, by["b"].best_score) == (2, 2, 1)
    assert (by["b"].inside_strong, by["b"].outside_strong) == (2, 1) and by["b"].has_specialist
    assert t.count == 1  # on the train texts alone both a and b would count
    assert find_specialists(codes[rows.select], rows.labels_of(rows.select), 5.0, 2).count == 2
    assert t.to_dict()["categories"]["a"]["selection_score"] == 2


def test_split_resamples_and_shuffles_stay_within_their_split():
    from harness.saes.specialists import SplitRows, resample_split, shuffle_within_splits

    rows = SplitRows.from_splits(SPLIT_LABELS, SPLITS)
    rng = np.random.default_rng(0)
    for _ in range(20):
        r = resample_split(rows, rng)
        assert set(r.select) <= set(rows.select) and set(r.score) <= set(rows.score)
        assert sorted(r.labels_of(r.select)) == sorted(rows.labels_of(rows.select))  # category sizes kept
        assert sorted(r.labels_of(r.score)) == sorted(rows.labels_of(rows.score))
        sh = shuffle_within_splits(rows, rng)
        assert sorted(sh.labels_of(rows.select)) == sorted(rows.labels_of(rows.select))
        assert sorted(sh.labels_of(rows.score)) == sorted(rows.labels_of(rows.score))
    moved = [shuffle_within_splits(rows, np.random.default_rng(s)).labels != rows.labels for s in range(5)]
    assert any(moved)


def test_split_bootstrap_and_null_are_seeded():
    from harness.saes.specialists import SplitRows, split_bootstrap, split_label_null

    rows = SplitRows.from_splits(SPLIT_LABELS, SPLITS)

    def first_scored_is_a(r):
        return float(r.labels[r.score[0]] == "a")

    a = split_label_null(rows, first_scored_is_a, np.random.default_rng(3), 200)
    assert set(a) == {0.0, 1.0} and 0.2 < a.mean() < 0.5  # 1/3 expected
    assert (a == split_label_null(rows, first_scored_is_a, np.random.default_rng(3), 200)).all()
    b = split_bootstrap(rows, lambda r: float(r.select.size + r.score.size), np.random.default_rng(0), 10)
    assert (b == 12).all()


def test_most_frequent_coverage_scored_on_other_texts():
    train = np.array([[1.0, 1.0], [1.0, 0.0], [1.0, 0.0]])  # feature 0 on all 3
    heldout = np.array([[0.0, 1.0], [2.0, 1.0]])  # feature 0 on 1 of 2
    assert most_frequent_coverage(train) == (0, 1.0)
    assert most_frequent_coverage(train, heldout) == (0, 0.5)


def test_positive_quantile_and_coverage_slope():
    from harness.saes.specialists import coverage_slope, positive_quantile

    codes = np.array([[0.0, 2.0], [-1.0, 4.0]])
    assert positive_quantile(codes, 0.5) == 3.0  # of the positive values [2, 4]
    assert positive_quantile(codes.astype(np.float32), 0.5).dtype == np.float32  # the codes' dtype
    assert np.isnan(positive_quantile(np.zeros((2, 2)), 0.5))
    # coverages 10/10, 9/10, 8/10, 7/10: one text fewer per depth step
    assert coverage_slope([1.0, 0.9, 0.8, 0.7], 10) == pytest.approx(-0.1)
    # equal counts give exactly 0, whatever the shares' float rounding
    assert coverage_slope([167 / 168, 1 - 1 / 168, 167 / 168], 168) == 0.0


def test_trigger_ratio_known_answer():
    from harness.saes.specialists import trigger_ratio

    # 4 texts x 4 positions; texts 0, 1 are the category's. Position 0 is BOS (not kept).
    tokens = np.array([[0, 7, 7, 5], [0, 7, 8, 9], [0, 7, 7, 7], [0, 7, 8, 7]])
    keep = np.ones_like(tokens, dtype=bool)
    keep[:, 0] = False
    z = np.zeros(tokens.shape)
    z[0, 1:3] = 2.0  # token 7 fires inside: mass 2 + 2 + 1 = 5
    z[1, 1] = 1.0
    z[0, 3] = 0.5  # token 5: mass 0.5, never outside
    z[2, 1] = 3.0  # outside, token 7 fires on 1 of its 4 outside occurrences (z[3, 3] = 0)
    inside = np.array([True, True, False, False])
    r = trigger_ratio(z, tokens, keep, inside, n_triggers=2, min_outside=3)
    assert r["triggers"] == [7, 5] and r["kept"] == [7]
    assert (r["n_in"], r["n_out"]) == (3, 5)
    assert r["rate_in"] == 1.0 and r["rate_out"] == pytest.approx(1 / 5)
    assert r["ratio"] == pytest.approx(1 / 5)
    assert r["inside_mass_share"] == pytest.approx(5.5 / 8.5)
    assert np.isnan(trigger_ratio(z, tokens, keep, inside, min_outside=6)["ratio"])  # nothing kept


def test_trigger_ratio_chooses_on_one_split_and_measures_on_the_other():
    from harness.saes.specialists import trigger_ratio

    # texts 0-3 inside, 4-7 outside; even texts select, odd texts score
    tokens = np.array([[0, 7, 5]] * 8)
    keep = np.ones_like(tokens, dtype=bool)
    keep[:, 0] = False
    z = np.zeros(tokens.shape)
    z[[0, 2], 1] = 1.0  # token 7 fires in the selecting inside texts (mass 2)
    z[0, 2] = 0.5  # token 5 less (mass 0.5)
    z[[1, 3], 1] = 1.0  # scoring inside texts: token 7 fires on both
    z[5, 1] = 1.0  # scoring outside texts 5, 7: token 7 fires on 1 of 2
    inside = np.arange(8) < 4
    select, score = np.arange(8) % 2 == 0, np.arange(8) % 2 == 1
    r = trigger_ratio(z, tokens, keep, inside, select, score, n_triggers=1, min_outside=2)
    assert r["triggers"] == [7] and r["kept"] == [7]
    assert (r["n_in"], r["n_out"]) == (2, 2)  # occurrences among the scoring texts only
    assert (r["rate_in"], r["rate_out"], r["ratio"]) == (1.0, 0.5, 0.5)
    # a trigger that never occurs inside among the scoring texts: no inside rate, no ratio
    gone = tokens.copy()
    gone[[1, 3], 1] = 9
    r = trigger_ratio(z, gone, keep, inside, select, score, n_triggers=1, min_outside=2)
    assert r["n_in"] == 0 and np.isnan(r["rate_in"]) and np.isnan(r["ratio"])


def test_feature_token_codes_of_an_identity_sae():
    import torch

    from harness.saes.sources import identity_sae
    from harness.saes.specialists import feature_token_codes

    sae = identity_sae(3).sae  # codes [relu(x), relu(-x)]: feature j < 3 is x_j's positive part
    acts = torch.tensor([[[1.0, -2.0, 0.5], [3.0, 4.0, -1.0]]])  # (1 text, 2 pos, d_in 3)
    keep = torch.tensor([[False, True]])
    z = feature_token_codes(sae, acts, keep, [0, 4, 0])
    assert set(z) == {0, 4}
    np.testing.assert_array_equal(z[0], [[0.0, 3.0]])  # position 0 zeroed (not kept)
    np.testing.assert_array_equal(z[4], [[0.0, 0.0]])  # relu(-x_1) at position 1: relu(-4) = 0


def _direct_search(codes, labels, threshold, n_candidates):
    """The search written directly (float64 copy, full stable argsort, every column compared):
    the definition find_specialists' faster path must reproduce."""
    codes = np.asarray(codes, dtype=float)
    labels_arr = np.asarray(labels)
    strong = codes > threshold
    out = []
    for cat in sorted(set(labels)):
        inside = labels_arr == cat
        candidates = np.argsort(-codes[inside].max(axis=0), kind="stable")[:n_candidates]
        ins = strong[inside][:, candidates].sum(axis=0)
        outs = strong[~inside][:, candidates].sum(axis=0)
        j = int(np.argmax(ins - outs))
        out.append((cat, int(candidates[j]), int(ins[j] - outs[j]), int(ins[j]), int(outs[j]),
                    tuple(int(c) for c in candidates)))
    return out


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 12), st.integers(1, 40), st.integers(0, 45),
       st.sampled_from([np.float32, np.float64]), st.booleans())
def test_find_specialists_equals_the_direct_search(seed, n_texts, d_sae, n_candidates, dtype, ties):
    """Ties (small integer codes), float32 codes against a threshold float32 cannot hold, any
    number of candidates (0 and more than d_sae included)."""
    from harness.saes.specialists import find_specialists, top_first

    rng = np.random.default_rng(seed)
    codes = (rng.integers(0, 4, (n_texts, d_sae)) if ties else rng.normal(size=(n_texts, d_sae))).astype(dtype)
    labels = [str(c) for c in rng.integers(0, 3, n_texts)]
    threshold = float(rng.choice([0.1, 1.0000000001, 1.5, 2.0, -0.3]))
    if n_candidates == 0:
        assert top_first(codes[0], 0).size == 0
        return
    got = find_specialists(codes, labels, threshold, n_candidates)
    want = _direct_search(codes, labels, threshold, n_candidates)
    assert [(r.category, r.best_feature, r.best_score, r.inside_strong, r.outside_strong, r.candidates)
            for r in got.per_category] == want
    np.testing.assert_array_equal(top_first(codes[0], n_candidates),
                                  np.argsort(-codes[0], kind="stable")[:n_candidates])


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_per=st.integers(1, 6), d_sae=st.integers(1, 12),
       n_cand=st.integers(1, 5), integer_codes=st.booleans(), float32=st.booleans())
def test_heldout_specialists_equals_select_then_score(seed, n_per, d_sae, n_cand, integer_codes, float32):
    """The in-place path equals find_specialists on the selected rows followed by
    score_selected on the scored rows, on bootstrap resamples, label shuffles and tied codes
    (small integers make ties and threshold hits common)."""
    from harness.saes.specialists import (
        SplitRows,
        heldout_specialists,
        resample_split,
        row_tops,
        score_selected,
        shuffle_within_splits,
    )

    rng = np.random.default_rng(seed)
    labels = [c for c in "abc" for _ in range(2 * n_per)]
    splits = ["train", "heldout"] * (3 * n_per)
    codes = (rng.integers(0, 4, (len(labels), d_sae)).astype(float) if integer_codes
             else rng.standard_normal((len(labels), d_sae)) * 2)
    codes = codes.astype(np.float32) if float32 else codes
    base = SplitRows.from_splits(labels, splits)
    for rows in (base, resample_split(base, rng), shuffle_within_splits(base, rng)):
        for threshold in (0.0, 1.0, 2.5):
            want = score_selected(
                find_specialists(codes[rows.select], rows.labels_of(rows.select), threshold, n_cand),
                codes[rows.score], rows.labels_of(rows.score))
            assert heldout_specialists(codes, rows, threshold, n_cand) == want
            assert heldout_specialists(codes, rows, threshold, n_cand, check=False,
                                       tops=row_tops(codes, n_cand)) == want


def test_heldout_specialists_rejects_nan_and_bad_shapes():
    from harness.saes.specialists import SplitRows, heldout_specialists

    rows = SplitRows.from_splits(SPLIT_LABELS, SPLITS)
    codes = np.zeros((12, 4))
    codes[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        heldout_specialists(codes, rows, 5.0)
    with pytest.raises(ValueError, match="n_texts=12"):
        heldout_specialists(np.zeros((11, 4)), rows, 5.0)
    with pytest.raises(ValueError, match="tops must be"):
        heldout_specialists(np.zeros((12, 4)), rows, 5.0, 2, tops=np.zeros((12, 3), dtype=int))
