"""The background corpus builds offline, deterministically, with its recipe validated."""

from __future__ import annotations

import pytest
import torch

from harness.data.corpus import CorpusError, CorpusRecipe, build_corpus, documents
from tests.standins import train_tokenizer

SMALL = CorpusRecipe(n_contexts=64, context_len=32, seed=1)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=400)


def test_sources_are_nonempty_and_ordered():
    for name in ("pydoc_topics", "stdlib_source"):
        docs = documents(name)
        assert len(docs) > 50 and docs == documents(name)


def test_corpus_is_deterministic_and_shaped(tokenizer):
    a, b = build_corpus(tokenizer, SMALL), build_corpus(tokenizer, SMALL)
    assert a.sha256 == b.sha256 and torch.equal(a.tokens, b.tokens)
    assert a.tokens.shape == (64, 32)
    assert (a.tokens[:, 0] == tokenizer.bos_token_id).all()
    prov = a.provenance()
    assert sum(prov["contexts_per_source"].values()) == 64
    assert prov["n_tokens"] == 64 * 32 and len(prov["tokenizer_sha256"]) == 64


def test_seed_changes_the_corpus(tokenizer):
    other = build_corpus(tokenizer, CorpusRecipe(n_contexts=64, context_len=32, seed=2))
    assert other.sha256 != build_corpus(tokenizer, SMALL).sha256


def test_weights_decide_the_mix(tokenizer):
    only_topics = CorpusRecipe(n_contexts=16, context_len=32, weights=(1.0, 0.0, 0.0))
    c = build_corpus(tokenizer, only_topics)
    assert c.provenance()["contexts_per_source"] == {
        "pydoc_topics": 16, "stdlib_docstrings": 0, "stdlib_source": 0}


@pytest.mark.parametrize("kwargs", [
    {"n_contexts": 0}, {"context_len": 1}, {"sources": ("wikipedia",), "weights": (1.0,)},
    {"weights": (1.0, 1.0)}, {"weights": (0.0, 0.0, 0.0)}, {"weights": (-1.0, 1.0, 1.0)},
])
def test_bad_recipes(kwargs):
    with pytest.raises(CorpusError):
        CorpusRecipe(**kwargs)


def test_a_recipe_larger_than_a_source_is_a_clear_error(tokenizer):
    huge = CorpusRecipe(n_contexts=10**7, context_len=512, weights=(1.0, 0.0, 0.0))
    with pytest.raises(CorpusError, match="pydoc_topics yields"):
        build_corpus(tokenizer, huge)
