"""The neuron choice of family N: known answers on planted data, the source's ids on gpt2-small,
and the cached end-to-end path on an in-process stand-in."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from harness.analyses import neuron_choice as nc


def _planted(rng: np.random.Generator, d: int = 64, n: int = 500, big: int = 7, partner: int = 40):
    """Unit ``big`` has the largest variance; ``partner`` follows it closely; the rest is noise."""
    acts = rng.normal(size=(n, d))
    acts[:, big] *= 5.0
    acts[:, partner] = 0.3 * acts[:, big] + 0.05 * rng.normal(size=n)
    return acts


def test_procedure_picks_the_highest_variance_unit_and_its_top_coactivator() -> None:
    acts = _planted(np.random.default_rng(0))
    neuron, partner, published, variance, r = nc.pick(acts, "last", "smollm2-135m")
    assert (neuron, partner, published) == (7, 40, False)
    assert np.argmax(variance) == 7 and np.isnan(r[7]) and r[40] > 0.99
    assert np.nanargmax(r) == 40


def test_gpt2_small_keeps_the_published_ids_in_its_last_layer_only() -> None:
    acts = np.random.default_rng(1).normal(size=(50, 3072))
    neuron, partner, published, _, r = nc.pick(acts, "last", "gpt2-small")
    assert (neuron, partner, published) == (373, 2202, True)
    assert np.isfinite(r[2202]) and np.isnan(r[373])
    assert nc.pick(acts, "mid", "gpt2-small")[2] is False  # the mid role follows the procedure
    assert nc.layer_for("last", 12, "gpt2-small") == 11
    with pytest.raises(ValueError, match="not the source's layer"):
        nc.pick(acts[:, :1000], "last", "gpt2-small")


@pytest.mark.parametrize(("n_layers", "last", "mid"), [(12, 11, 6), (30, 29, 15), (2, 1, 0), (1, 0, 0)])
def test_layers_by_role(n_layers: int, last: int, mid: int) -> None:
    assert nc.layer_for("last", n_layers, "x") == last
    assert nc.layer_for("mid", n_layers, "x") == mid
    z = np.zeros(1)
    choices = {role: nc.NeuronChoice(role, nc.layer_for(role, n_layers, "x"), 0, 1, False, z, z, z)
               for role in nc.ROLES}
    assert nc.has_downstream(choices) is (mid < last)  # 1 layer: no block after the mid role's


def test_constant_units_never_partner_and_bad_inputs_raise() -> None:
    acts = _planted(np.random.default_rng(2))
    acts[:, 3] = 1.0
    _, partner, _, _, r = nc.pick(acts, "last", "x")
    assert np.isnan(r[3]) and partner != 3
    with pytest.raises(ValueError, match="non-finite"):
        nc.pick(np.full((4, 3), np.nan), "last", "x")
    with pytest.raises(ValueError, match="every unit is constant"):
        nc.pick(np.ones((4, 3)), "last", "x")


def test_top_contexts_rank_contexts_by_their_max() -> None:
    act = np.array([[0.0, 1.0, 0.5], [3.0, 0.0, 0.0], [0.0, 0.0, 2.0]], dtype=np.float32)
    choice = nc.NeuronChoice("last", 0, 0, 1, False, np.ones(2), np.zeros(2), act)
    # position counted in the corpus context: sample column j is position j + 1 (BOS = 0)
    assert nc.top_contexts(choice, 2) == [(1, 1, 3.0), (2, 3, 2.0)]


def _loaded(name: str, n_layers: int, d_mlp: int):
    """A LoadedSubject-like stand-in: an in-process HookedTransformer named ``name``."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=n_layers, d_model=16, d_head=8, n_heads=2, d_mlp=d_mlp,
                                  n_ctx=32, d_vocab=50, act_fn="gelu", seed=0)
    model = HookedTransformer(cfg).eval()
    return SimpleNamespace(model=model, spec=SimpleNamespace(name=name), weight_hash=f"{name}-w")


def _corpus(n: int = 8, length: int = 16):
    tokens = torch.randint(0, 50, (n, length), generator=torch.Generator().manual_seed(0))
    return SimpleNamespace(tokens=tokens, sha256="corpus-sha")


def test_gpt2_small_standin_gets_373_and_2202_at_block_11() -> None:
    """The gpt2-small path on a locally built 12-layer model with GPT-2 small's d_mlp."""
    spec = nc.ChoiceSpec(n_contexts=4, batch_size=2)
    choices = nc.choose_neurons(_loaded("gpt2-small", 12, 3072), _corpus(), spec)
    last = choices["last"]
    assert (last.hook, last.neuron, last.partner, last.published) == (
        "blocks.11.mlp.hook_post", 373, 2202, True)
    assert choices["mid"].layer == 6 and not choices["mid"].published
    assert last.activation.shape == (4, 15)


def test_choose_neurons_is_cached_and_reproduces_the_procedure(tmp_path, monkeypatch) -> None:
    from harness.activations.cache import ContentCache

    loaded, corpus = _loaded("tiny", 3, 64), _corpus()
    spec = nc.ChoiceSpec(n_contexts=6, batch_size=4)
    cache = ContentCache(tmp_path)
    first = nc.choose_neurons(loaded, corpus, spec, cache)
    fresh = nc.choose_neurons(loaded, corpus, spec, None)
    from harness.activations.capture import capture

    acts = capture(loaded.model, corpus.tokens[:6], ["blocks.2.mlp.hook_post"])["blocks.2.mlp.hook_post"]
    expected = nc.pick(acts[:, 1:].reshape(-1, 64).numpy(), "last", "tiny")
    assert (first["last"].layer, first["mid"].layer) == (2, 1)
    assert (first["last"].neuron, first["last"].partner) == expected[:2]
    monkeypatch.setattr(nc, "_sample", lambda *a, **k: pytest.fail("recomputed despite the cache"))
    again = nc.choose_neurons(loaded, corpus, spec, cache)
    for role in nc.ROLES:
        assert (again[role].neuron, again[role].partner) == (fresh[role].neuron, fresh[role].partner)
        np.testing.assert_array_equal(again[role].variance, first[role].variance)
    with pytest.raises(ValueError, match="the choice reads"):
        nc.choose_neurons(loaded, _corpus(n=2), spec)
