"""The planted-tokens subject (family W's positive control): both of the thesis' methods find
the wired token, and the random neurons beside the wired ones do not look wired.

The subject is loaded through ``load_subject`` as ``--subject planted-tokens`` would load it;
only its two slow inputs are swapped for test-sized ones: the tokenizer is loaded once per
module, and the corpus it picks wired tokens from is a small one (the real load builds the
default corpus: ~25 s of tokenizing, ~1 s for the pydoc topics alone).
"""

from __future__ import annotations

import pytest
import torch

from harness.activations.harvest import harvest, mlp_neurons_spec
from harness.data.corpus import CorpusRecipe, build_corpus
from harness.models import loaders
from harness.models.planted import (
    PlantedSpec,
    PlantingError,
    build_planted,
    check_planted,
    choose_wired_tokens,
)
from harness.models.subjects import SubjectError, parse_subject

SEED = 0
# The smallest pydoc-topics corpus tried in which 64 tokens occur in >= 40 contexts (the
# subject wires 64; 256 x 64 tokens of any source mix hold only ~33). The harvest's forward,
# unembedding included, is most of this file's time: fewer tokens, faster file.
RECIPE = CorpusRecipe(
    n_contexts=768, context_len=32, seed=SEED, sources=("pydoc_topics",), weights=(1.0,)
)
K = 20
N_PLANTED = PlantedSpec().n_planted


@pytest.fixture(scope="module")
def inputs():
    """(tokenizer, small corpus). Read-only."""
    tokenizer = loaders.planted_tokenizer()
    return tokenizer, build_corpus(tokenizer, RECIPE)


def _load(inputs, seed: int, requested: list[CorpusRecipe]):
    tokenizer, corpus = inputs

    def fake_build_corpus(tok, recipe):
        requested.append(recipe)
        return corpus

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loaders, "planted_tokenizer", lambda: tokenizer)
        mp.setattr(loaders, "build_corpus", fake_build_corpus)
        return loaders.load_subject(parse_subject("planted-tokens", seed=seed))


@pytest.fixture(scope="module")
def planted(inputs):
    """(LoadedSubject, the corpus recipes load_subject asked for). Read-only."""
    requested: list[CorpusRecipe] = []
    return _load(inputs, SEED, requested), requested


@pytest.fixture(scope="module")
def top_tokens(planted, inputs):
    """Method 1 as family W runs it: the token at the argmax position of each of the K
    distinct top contexts, per layer: [(K, d_mlp)] * n_layers."""
    loaded, _ = planted
    _, corpus = inputs
    spec = mlp_neurons_spec(loaded.model.cfg.n_layers, k=K)
    got = harvest(loaded, corpus, spec, cache=None)
    return [got[h].top_tokens(corpus) for h in spec.hooks]


def _cosines(model) -> torch.Tensor:
    """Method 2 on the processed weights: cos(W_E[t], W_in[:, n]), (n_layers, d_vocab, d_mlp)."""
    w_e = torch.nn.functional.normalize(model.W_E, dim=-1)  # (d_vocab, d_model)
    w_in = torch.nn.functional.normalize(model.W_in, dim=-2)  # (n_layers, d_model, d_mlp)
    return torch.einsum("vd,ldn->lvn", w_e, w_in)


def test_wiring_is_recorded_and_chosen_from_the_seeded_default_corpus(planted, inputs):
    loaded, requested = planted
    tokenizer, corpus = inputs
    assert requested == [CorpusRecipe(seed=SEED)]  # what the plugin builds for --seed SEED
    wired = choose_wired_tokens(corpus, tokenizer, N_PLANTED)
    assert loaded.planted == dict(enumerate(wired))
    assert loaded.provenance()["planted"] == {str(n): t for n, t in enumerate(wired)}
    assert not set(wired) & set(tokenizer.all_special_ids)
    assert all(tokenizer.decode([t]).strip() for t in wired)
    body = corpus.tokens[:, 1:]
    assert all(int((body == t).any(dim=1).sum()) >= 40 for t in wired)
    cfg = loaded.model.cfg
    assert cfg.d_vocab == len(tokenizer) and cfg.n_ctx >= 128
    assert cfg.normalization_type == "LNPre"  # fold_ln applied (TL's default processing)


def test_method2_weight_geometry_ranks_the_wired_token_first(planted):
    loaded, _ = planted
    cos = _cosines(loaded.model)  # (n_layers, d_vocab, d_mlp)
    wired = torch.tensor([loaded.planted[n] for n in range(N_PLANTED)])
    top = cos[:, :, :N_PLANTED].argmax(dim=1)  # (n_layers, n_planted)
    assert torch.equal(top, wired.expand_as(top))
    # fold_ln turns W_in[:, n] into a multiple of the centred W_E[t]: cosine 1.
    on = cos[:, wired, torch.arange(N_PLANTED)]
    assert on.min() > 1 - 1e-5
    # Random neurons: nothing close to an exact match.
    assert cos[:, :, N_PLANTED:].amax() < 0.9


def test_method1_top_contexts_all_show_the_wired_token(planted, top_tokens):
    loaded, _ = planted
    wired = torch.tensor([loaded.planted[n] for n in range(N_PLANTED)])
    for layer, tokens in enumerate(top_tokens):  # (K, d_mlp)
        got = tokens[:, :N_PLANTED]
        assert torch.equal(got, wired.expand_as(got)), f"layer {layer}"


def test_unwired_neurons_are_mostly_not_perfectly_selective(top_tokens):
    """In a model whose activations depend on the current token only, a random neuron is
    perfectly selective (DTR = 1) exactly when its best corpus token occurs >= K times; the
    best token of a random direction is mostly a rare one."""
    for tokens in top_tokens:  # (K, d_mlp)
        rest = tokens[:, N_PLANTED:]
        all_equal = (rest == rest[:1]).all(dim=0).float().mean().item()
        assert all_equal < 0.25


def test_same_seed_same_weights(planted, inputs):
    loaded, _ = planted
    again = _load(inputs, SEED, [])
    assert again.weight_hash == loaded.weight_hash
    assert again.planted == loaded.planted


def test_identity_is_the_unprocessed_planted_weights(planted, inputs, monkeypatch):
    """Processed bits may differ between loads (simulated): the cache identity may not."""
    import uuid

    loaded, _ = planted
    monkeypatch.setattr(loaders, "weights_hash", lambda model: uuid.uuid4().hex)
    again = _load(inputs, SEED, [])
    assert again.processed_weight_hash != loaded.processed_weight_hash
    assert again.weight_hash == loaded.weight_hash
    assert _load(inputs, SEED + 1, []).weight_hash != loaded.weight_hash


def test_builder_check_catches_a_miswired_neuron(planted):
    """The builder's own check (it passed for ``planted``, or loading would have raised)
    fails when neurons are held to another neuron's token."""
    loaded, _ = planted
    swapped = {0: loaded.planted[1], 1: loaded.planted[0]}
    with pytest.raises(PlantingError, match="4 wired .* layer 0 neuron 0"):
        check_planted(loaded.model, swapped)


def test_bad_wiring_requests_fail(inputs):
    tokenizer, corpus = inputs
    spec = PlantedSpec(n_planted=2)
    with pytest.raises(PlantingError, match="distinct"):
        build_planted(tokenizer, [5, 5], spec)
    with pytest.raises(PlantingError, match="only"):
        choose_wired_tokens(corpus, tokenizer, 4, min_count=10**6)
    with pytest.raises(ValueError, match="cutoff"):
        PlantedSpec(cutoff=1.5)


def test_rmsnorm_variant_is_wired_too(inputs):
    """RMSNorm (no centring, no bias): the same construction, checked by the builder; after
    fold_ln Method 2's cosine is again 1 for the wired token."""
    tokenizer, corpus = inputs
    spec = PlantedSpec(d_mlp=32, n_planted=8, normalization="RMS", seed=3)
    wired = choose_wired_tokens(corpus, tokenizer, spec.n_planted)
    model = build_planted(tokenizer, wired, spec)
    model.load_and_process_state_dict({k: v.clone() for k, v in model.state_dict().items()})
    assert model.cfg.normalization_type == "RMSPre"
    cos = _cosines(model)[:, :, : spec.n_planted]  # (n_layers, d_vocab, n_planted)
    top = cos.argmax(dim=1)
    assert torch.equal(top, torch.tensor(wired).expand_as(top))


def test_random_twin_of_a_planted_subject_is_refused():
    with pytest.raises(SubjectError, match="random"):
        parse_subject("planted-tokens:random")
