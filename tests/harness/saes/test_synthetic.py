"""Known answers and properties of harness/saes/synthetic.py (recovery metric, FVE, determinism)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from harness.saes import synthetic
from harness.saes.synthetic import (
    Heldout,
    SyntheticConfig,
    fve_bootstrap,
    heldout_fve,
    max_cosine_per_feature,
    random_dictionary,
)

TINY = SyntheticConfig(num_features=32, hidden_dim=12, max_firing_prob=0.15, min_firing_prob=0.05,
                       d_sae=32, k=4, training_steps=25, batch_size=64, n_heldout=256)


def _unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    x = random_dictionary(n, d, seed)
    return x / x.norm(dim=1, keepdim=True)


# --- max_cosine_per_feature -----------------------------------------------------------------


def test_decoder_equal_to_the_true_dictionary_recovers_everything() -> None:
    true = _unit_rows(256, 64, 0)
    np.testing.assert_allclose(max_cosine_per_feature(true, true), 1.0, atol=1e-12)


def test_hand_computed_two_by_two() -> None:
    # e1, e2 against the single row (1, 1): cos = 1/sqrt(2) for both.
    m = max_cosine_per_feature(torch.eye(2), torch.tensor([[1.0, 1.0]]))
    np.testing.assert_allclose(m, [1 / math.sqrt(2)] * 2)


def test_sign_matters_unless_absolute() -> None:
    # Decoder -I against I: signed max_j -delta_ij = 0; absolute = 1.
    np.testing.assert_allclose(max_cosine_per_feature(torch.eye(4), -torch.eye(4)), 0.0)
    np.testing.assert_allclose(max_cosine_per_feature(torch.eye(4), -torch.eye(4), absolute=True), 1.0)


def test_a_random_decoder_is_well_below_one() -> None:
    true = _unit_rows(256, 64, 0)
    m = max_cosine_per_feature(true, random_dictionary(256, 64, 1))
    # Max of 256 cosines of random directions in 64 dims: about 0.35, never near 1.
    assert 0.2 < m.mean() < 0.5
    assert m.max() < 0.8


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), absolute=st.booleans())
@example(seed=34566, absolute=False)
def test_invariant_to_decoder_row_permutation_and_positive_scale(seed: int, absolute: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    # float64 inputs: rescaling a float32 row rounds its direction by ~1e-7 (relative), which the
    # 1e-12 tolerance would read as a broken invariance (hypothesis found seed 34566).
    f64 = torch.float64
    true, dec = torch.randn(10, 6, generator=g, dtype=f64), torch.randn(15, 6, generator=g, dtype=f64)
    base = max_cosine_per_feature(true, dec, absolute=absolute)
    perm = torch.randperm(15, generator=g)
    scale = torch.rand(15, 1, generator=g, dtype=f64) * 10 + 0.1
    np.testing.assert_allclose(max_cosine_per_feature(true, dec[perm] * scale, absolute=absolute), base,
                               atol=1e-12)
    # Permuting the true features permutes the answer.
    tperm = torch.randperm(10, generator=g)
    np.testing.assert_allclose(max_cosine_per_feature(true[tperm], dec, absolute=absolute), base[tperm.numpy()],
                               atol=1e-12)
    # Absolute: flipping signs of decoder rows changes nothing; and it bounds the signed one.
    signs = torch.where(torch.rand(15, 1, generator=g) < 0.5, -1.0, 1.0)
    flipped = max_cosine_per_feature(true, dec * signs, absolute=True)
    np.testing.assert_allclose(flipped, max_cosine_per_feature(true, dec, absolute=True), atol=1e-12)
    assert np.all(max_cosine_per_feature(true, dec) <= flipped + 1e-12)
    assert np.all(np.abs(base) <= 1 + 1e-12)


def test_rejects_zero_rows_and_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="zero row"):
        max_cosine_per_feature(torch.eye(3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="matrices"):
        max_cosine_per_feature(torch.eye(3), torch.eye(4))


# --- fraction of variance explained ---------------------------------------------------------


def test_fve_known_answers() -> None:
    dev = np.array([1.0, 2.0, 3.0, 2.0])
    one = np.ones(4)
    assert heldout_fve(Heldout(one, one, np.zeros(4), dev)) == 1.0
    assert heldout_fve(Heldout(one, one, dev, dev)) == 0.0
    assert heldout_fve(Heldout(one, one, np.full(4, 0.5), dev)) == pytest.approx(1 - 2 / 8)


def test_fve_bootstrap_interval_contains_the_value() -> None:
    rng = np.random.default_rng(0)
    dev = rng.exponential(size=500)
    err = 0.2 * dev * rng.uniform(size=500)
    h = Heldout(np.ones(500), np.ones(500), err, dev)
    e = fve_bootstrap(h, np.random.default_rng(1), n_resamples=500)
    assert e.ci_low <= e.value <= e.ci_high and e.n == 500
    assert e.value == pytest.approx(heldout_fve(h))


# --- config, seeds, determinism -------------------------------------------------------------


def test_config_rejects_no_superposition_and_bad_k() -> None:
    with pytest.raises(ValueError, match="superposition"):
        SyntheticConfig(num_features=64, hidden_dim=64)
    with pytest.raises(ValueError, match="k"):
        SyntheticConfig(k=0)
    assert SyntheticConfig().expected_true_l0 == pytest.approx(6.4)


def test_seeds_are_distinct_and_reproducible() -> None:
    s = synthetic.SyntheticSeeds.from_int(7)
    assert s == synthetic.SyntheticSeeds.from_int(7)
    assert len({s.dictionary, s.training, s.null, s.heldout}) == 4
    assert s != synthetic.SyntheticSeeds.from_int(8)


def test_a_seed_determines_the_run_and_restores_torch_state() -> None:
    before = torch.random.get_rng_state()
    threads = torch.get_num_threads()
    a, b, c = synthetic.run(TINY, 3), synthetic.run(TINY, 3), synthetic.run(TINY, 4)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.get_num_threads() == threads
    assert torch.equal(a.true_features, b.true_features)
    assert torch.equal(a.decoder, b.decoder)
    assert torch.equal(a.null_decoder, b.null_decoder)
    assert not torch.equal(a.true_features, c.true_features)
    assert not torch.equal(a.decoder, c.decoder)
    ha = synthetic.heldout(a.sae, a.feature_dict, a.generator, 64, a.seeds.heldout)
    hb = synthetic.heldout(b.sae, b.feature_dict, b.generator, 64, b.seeds.heldout)
    np.testing.assert_array_equal(ha.sq_err, hb.sq_err)


def test_cached_run_equals_a_fresh_one_and_trains_once(tmp_path, monkeypatch) -> None:
    from harness.activations.cache import ContentCache

    cache = ContentCache(tmp_path)
    before = torch.random.get_rng_state()
    fresh, first = synthetic.run(TINY, 3), synthetic.run(TINY, 3, cache)
    monkeypatch.setattr(synthetic, "train_sae", lambda *a, **k: pytest.fail("trained again"))
    again = synthetic.run(TINY, 3, cache)
    assert torch.equal(torch.random.get_rng_state(), before)
    for run in (first, again):
        assert torch.equal(run.decoder, fresh.decoder)
        assert torch.equal(run.shuffled_decoder, fresh.shuffled_decoder)
        assert not torch.equal(run.decoder, run.shuffled_decoder)
        h, hf = (synthetic.heldout(r.sae, r.feature_dict, r.generator, 64, r.seeds.heldout)
                 for r in (run, fresh))
        np.testing.assert_array_equal(h.sq_err, hf.sq_err)
    with pytest.raises(pytest.fail.Exception, match="trained again"):  # the key names the seed
        synthetic.run(TINY, 4, cache)


def test_true_features_are_unit_norm_and_heldout_matches_sae_lens_eval() -> None:
    r = synthetic.run(TINY, 0)
    np.testing.assert_allclose(r.true_features.norm(dim=1).numpy(), 1.0, atol=1e-5)
    assert r.decoder.shape == (TINY.d_sae, TINY.hidden_dim) == r.null_decoder.shape
    h = synthetic.heldout(r.sae, r.feature_dict, r.generator, TINY.n_heldout, r.seeds.heldout)
    ev = synthetic.sae_lens_eval(r.sae, r.feature_dict, r.generator, TINY.n_heldout, r.seeds.heldout)
    # Same seed, same draw: our per-sample computation agrees with sae-lens' streaming one.
    assert h.sae_l0.mean() == pytest.approx(ev.sae_l0)
    assert h.true_l0.mean() == pytest.approx(ev.true_l0)
    assert heldout_fve(h) == pytest.approx(ev.explained_variance, abs=1e-4)
    assert np.all(h.sae_l0 <= TINY.k)


def test_shuffled_dimensions_keep_each_marginal_and_lose_the_features() -> None:
    """R1's null data: every column is a permutation of the real column (marginals kept), the
    rows are no longer sums of the dictionary's features, and a seed fixes the shuffle."""
    import torch

    from harness.saes.synthetic import ShuffledDimensions, make_data

    cfg = synthetic.SyntheticConfig()
    fd, gen = make_data(cfg, seed=3)
    feats = gen.sample(512)
    real = fd(feats)
    a = ShuffledDimensions(fd, seed=7)(feats)
    b = ShuffledDimensions(fd, seed=7)(feats)
    assert torch.equal(a, b)
    assert torch.equal(a.sort(dim=0).values, real.sort(dim=0).values)
    assert not torch.equal(a, real)
    # the real rows lie in the features' span with sparse codes; shuffled rows do not match them
    assert (a - real).abs().mean() > 0.1 * real.abs().mean()
