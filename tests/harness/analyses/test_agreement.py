"""Family W's agreement metrics: known answers, the thesis's normalisation, the null."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.analyses.agreement import (
    METRICS,
    Vocabulary,
    dominant_token_ratio,
    dominant_type,
    neuron_metrics,
    normalize_token,
    null_metrics,
    token_type,
)

RAW_STRINGS = ("", "the", " the", "cat", "=", "42", "и", "\ufffd", "the\ufffd", "ｆｕｌｌ")
VOCAB = Vocabulary(tuple(normalize_token(s) for s in RAW_STRINGS))  # as from_tokenizer builds it


@pytest.mark.parametrize(("raw", "norm"), [
    (" the", "the"), ("the\ufffd", "the"), ("ｆｕｌｌ", "full"), ("\n\t", ""), ("½", "1⁄2"),
])
def test_normalize_token(raw, norm):
    assert normalize_token(raw) == norm


@pytest.mark.parametrize(("s", "kind"), [
    ("the", "latin"), ("и", "non_latin"), ("Éé", "latin"), ("42", "numeric"), ("==", "symbol"),
    ("a1", "other"), ("", "other"), ("😀", "symbol"),
])
def test_token_type(s, kind):
    assert token_type(s) == kind


def test_dominant_type_uses_first_five_and_breaks_ties_in_order():
    assert dominant_type(["=", "a", "=", "b", "1", "b", "b", "b"]) == "symbol"  # 2 symbol vs 2 latin -> symbol first
    assert dominant_type([]) == "other"


def test_neuron_metrics_known_answer():
    W_E = torch.eye(10)
    # neuron 0: Method 1 {the, cat} (ids 1, 2=" the", 3); Method 2 {the, =, cat} (ids 2, 4, 3)
    m1 = np.array([[1, 5], [2, 5], [3, -1]])
    m2 = np.array([[2, 6], [4, 6], [3, -1]])
    out = neuron_metrics(m1, m2, VOCAB, W_E)
    assert out["overlap"].tolist() == [2.0, 0.0]
    assert out["overlap_any"].tolist() == [1.0, 0.0]
    assert out["jaccard"][0] == pytest.approx(2 / 3) and out["jaccard"][1] == 0.0
    assert out["top1_match"].tolist() == [1.0, 0.0]  # "the" == " the" after normalisation
    # embed_cos over distinct ids: mean(e1, e2, e3) . mean(e2, e3, e4) = 2/9, norms 1/sqrt(3)
    assert out["embed_cos"][0] == pytest.approx(2 / 3)
    assert out["type_match"].tolist() == [1.0, 0.0]  # latin/latin; numeric vs non_latin


def test_null_of_identical_lists_is_below_observed():
    rng = np.random.default_rng(0)
    m = rng.integers(1, 7, size=(5, 40))
    W_E = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    obs = neuron_metrics(m, m, VOCAB, W_E)
    null = null_metrics(m, m, VOCAB, W_E, np.random.default_rng(1), n_perm=5)
    assert set(obs) == set(null) == set(METRICS)
    assert obs["jaccard"].mean() == 1.0 or obs["jaccard"].mean() > null["jaccard"].mean()


def test_mis_paired_lists_show_no_excess():
    """The deliberately mis-paired control: Method-2 lists shuffled across neurons carry no
    information, so the excess over the null must not be clearly positive."""
    rng = np.random.default_rng(2)
    m1 = rng.integers(1, 7, size=(5, 400))
    m2 = m1[:, rng.permutation(400)]
    W_E = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    obs = neuron_metrics(m1, m2, VOCAB, W_E)
    null = null_metrics(m1, m2, VOCAB, W_E, np.random.default_rng(3), n_perm=10)
    excess = obs["jaccard"] - null["jaccard"]
    assert abs(excess.mean()) < 3 * excess.std() / np.sqrt(len(excess))


def test_dominant_token_ratio():
    m1 = np.array([[1, 3, 4], [2, 3, 5], [1, 3, -1], [3, 3, -1]])  # "the" x3 (1,2,1), "cat"
    assert dominant_token_ratio(m1, VOCAB).tolist() == [0.75, 1.0, 0.25]


# --- the vectorised metrics equal the per-neuron definitions ---------------------------------

def _reference_metrics(m1, m2, vocab, W_E, pairing):
    """The module docstring's definitions, one neuron at a time (the implementation before
    vectorisation), for the equivalence test below."""
    from harness.analyses.agreement import mean_embeddings

    k, n_units = m1.shape
    out = {m: np.zeros(n_units) for m in METRICS}
    e1, ok1 = mean_embeddings(W_E, m1)
    e2, ok2 = mean_embeddings(W_E, m2[:, pairing])
    cos = torch.nn.functional.cosine_similarity(e1.double(), e2.double(), dim=1)
    out["embed_cos"] = torch.where(ok1 & ok2, cos, torch.nan).numpy()
    for n in range(n_units):
        s1 = vocab.normalise([int(i) for i in m1[:, n]])
        s2 = vocab.normalise([int(i) for i in m2[:, pairing[n]]])
        a, b = {s for s in s1 if s}, {s for s in s2 if s}
        out["overlap"][n] = len(a & b)
        out["overlap_any"][n] = float(len(a & b) > 0)
        out["jaccard"][n] = len(a & b) / len(a | b) if a | b else 0.0
        out["top1_match"][n] = float(bool(s1) and bool(s2) and s1[0] == s2[0] and s1[0] != "")
        out["type_match"][n] = float(dominant_type(s1) == dominant_type(s2))
    return out


def _reference_dtr(m1, vocab):
    from collections import Counter

    k, n_units = m1.shape
    out = np.zeros(n_units)
    for n in range(n_units):
        counts = Counter(s for s in vocab.normalise([int(i) for i in m1[:, n]]) if s)
        out[n] = max(counts.values()) / k if counts else 0.0
    return out


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_metrics_equal_the_per_neuron_definitions(seed):
    rng = np.random.default_rng(seed)
    k, n = int(rng.integers(1, 9)), int(rng.integers(1, 60))
    ids = rng.integers(-1, len(RAW_STRINGS), size=(2, k, n))  # -1 = unfilled; ids 0 and 7 are ""
    ids[:, :, : n // 4] = -1 if seed % 2 else ids[:, :, : n // 4]  # some all-unfilled neurons
    W_E = torch.randn(len(RAW_STRINGS), 6, generator=torch.Generator().manual_seed(seed))
    pairing = rng.permutation(n)
    got = neuron_metrics(ids[0], ids[1], VOCAB, W_E, pairing=pairing)
    want = _reference_metrics(ids[0], ids[1], VOCAB, W_E, pairing)
    for m in METRICS:  # embed_cos: float32 means summed in another memory order
        if m == "embed_cos":
            np.testing.assert_allclose(got[m], want[m], rtol=0, atol=1e-6, err_msg=m)
        else:
            np.testing.assert_array_equal(got[m], want[m], err_msg=m)
    np.testing.assert_array_equal(dominant_token_ratio(ids[0], VOCAB), _reference_dtr(ids[0], VOCAB))
