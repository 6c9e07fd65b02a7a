"""Known answers for the count baselines of the ladder's model card (harness.models.ngram)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.models.ngram import baseline_losses


def test_hand_computed_unigram_and_bigram():
    # Fit on 0 1 0 1 (V = 3): c = (2, 2, 0), N = 4; pairs 0->1 twice, 1->0 once.
    # unigram p = (3/7, 3/7, 1/7); Witten-Bell: c(0) = 2, T(0) = 1; c(1) = 1, T(1) = 1.
    train = torch.tensor([[0, 1, 0, 1]])
    heldout = torch.tensor([[0, 1, 2]])  # predictions: 1 after 0, 2 after 1
    p_uni = [3 / 7, 3 / 7, 1 / 7]
    p_1_after_0 = (2 + 1 * p_uni[1]) / (2 + 1)
    p_2_after_1 = (0 + 1 * p_uni[2]) / (1 + 1)
    got = baseline_losses(train, heldout, vocab_size=3)
    assert got.unigram == pytest.approx(-(math.log(p_uni[1]) + math.log(p_uni[2])) / 2, rel=1e-12)
    assert got.bigram == pytest.approx(-(math.log(p_1_after_0) + math.log(p_2_after_1)) / 2, rel=1e-12)
    assert (got.fit_tokens, got.heldout_predictions) == (4, 2)


def test_a_context_never_seen_falls_back_to_the_unigram():
    train = torch.tensor([[0, 1, 0, 1]])
    heldout = torch.tensor([[2, 0]])  # 2 never starts a pair in training
    got = baseline_losses(train, heldout, vocab_size=3)
    assert got.bigram == pytest.approx(-math.log(3 / 7), rel=1e-12)
    assert got.unigram == pytest.approx(got.bigram, rel=1e-12)


def test_a_deterministic_chain_makes_the_bigram_win():
    # 0 1 2 3 0 1 2 3 ...: each token fixes the next; the unigram is uniform.
    train = torch.arange(400).remainder(4).view(10, 40)
    heldout = torch.arange(40).remainder(4).view(1, 40)
    got = baseline_losses(train, heldout, vocab_size=4)
    assert got.bigram < 0.01 < math.log(4) - 0.01 < got.unigram


def test_out_of_vocabulary_ids_are_refused():
    with pytest.raises(ValueError, match="vocabulary"):
        baseline_losses(torch.tensor([[0, 5]]), torch.tensor([[0, 1]]), vocab_size=3)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=6, max_size=40), st.lists(st.integers(0, 5), min_size=2, max_size=20))
def test_probabilities_are_proper(train_ids, heldout_ids):
    """Both baselines give every held-out prediction a probability in (0, 1]: finite, >= 0."""
    got = baseline_losses(torch.tensor([train_ids]), torch.tensor([heldout_ids]), vocab_size=6)
    assert 0 <= got.bigram < math.inf and 0 < got.unigram < math.inf
