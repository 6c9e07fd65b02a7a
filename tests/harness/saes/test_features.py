"""Feature usage (harness/saes/features.py) against brute force on a tiny model with a hand-built
SAE, token concentration on hand arrays, the token HTML view and the figures."""

from __future__ import annotations

import hashlib
import math
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.activations.cache import ContentCache
from harness.activations.capture import capture
from harness.activations.topk import brute_force_topk
from harness.data.corpus import Corpus, CorpusRecipe
from harness.evidence.figures import pyplot
from harness.models.loaders import LoadedSubject, weights_hash
from harness.models.subjects import SubjectSpec
from harness.saes import features
from harness.saes.features import (
    FeatureUsageAccumulator,
    cached_feature_usage,
    concentration_vs_frequency_figure,
    distinct_share,
    frequency_histogram_figure,
    sae_feature_usage,
    token_concentration,
    token_html,
)
from harness.saes.sources import sae_from_state

N_CTX, CTX_LEN, D_MLP, BOS = 24, 16, 64, 0
HOOK = "blocks.0.mlp.hook_post"
N_TOP, N_RANDOM = 6, 5
DEAD, CONSTANT, RARE = 0, 1, 2
"""Feature roles: never fires; code 1.0 on every token (all ties); fires on ~2 tokens."""


@pytest.fixture(scope="module")
def subject() -> LoadedSubject:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_ctx=CTX_LEN, d_head=8, n_heads=4,
                                  d_mlp=D_MLP, d_vocab=300, act_fn="gelu", normalization_type="LN",
                                  seed=0)
    model = HookedTransformer(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    spec = SubjectSpec(name="tiny", kind="path", source="built in test_features")
    return LoadedSubject(spec=spec, model=model, weight_hash=weights_hash(model), load_seconds=0.0)


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    t = torch.randint(1, 40, (N_CTX, CTX_LEN), generator=g)  # (n_ctx, L): few ids, repeats
    t[:, 0] = BOS
    return t


@pytest.fixture(scope="module")
def acts(subject, tokens) -> torch.Tensor:
    return capture(subject.model, tokens, [HOOK])[HOOK]  # (n_ctx, L, d_mlp)


def _standard_sae(w_enc: torch.Tensor, b_enc: torch.Tensor, hook: str = HOOK):
    d_in, d_sae = w_enc.shape
    cfg = {"architecture": "standard", "d_in": d_in, "d_sae": d_sae, "dtype": "float32",
           "apply_b_dec_to_input": False, "normalize_activations": "none",
           "metadata": {"hook_name": hook}}
    state = {"W_enc": w_enc, "b_enc": b_enc, "W_dec": torch.randn(d_sae, d_in),
             "b_dec": torch.zeros(d_in)}
    return sae_from_state(cfg, state)


@pytest.fixture(scope="module")
def sae(acts):
    """code_f = relu(x . w_f + b_f) with b_f set from the kept tokens' quantiles, so the
    features fire on shares from ~50 % down to ~2 tokens, plus the three special roles."""
    d_sae = 40
    g = torch.Generator().manual_seed(1)
    w = torch.randn(D_MLP, d_sae, generator=g)
    pre = acts[:, 1:].reshape(-1, D_MLP) @ w  # (n_kept, d_sae)
    q = torch.linspace(0.5, 0.99, d_sae)
    b = -torch.quantile(pre, q, dim=0).diagonal()  # (d_sae,): feature f at quantile q[f]
    w[:, DEAD], b[DEAD] = 0.0, -1.0
    w[:, CONSTANT], b[CONSTANT] = 0.0, 1.0
    b[RARE] = -torch.quantile(pre[:, RARE], 0.995)
    return _standard_sae(w, b)


def _brute(sae, acts, tokens, seed=0, skip_bos=True):
    """Every statistic from the full code tensor at once."""
    first = 1 if skip_bos else 0
    codes = sae.encode(acts)[:, first:]  # (n_ctx, kept, d_sae)
    n, kept, d_sae = codes.shape
    flat = codes.reshape(n * kept, d_sae)
    ctx = torch.arange(n).repeat_interleave(kept)
    pos = torch.arange(first, CTX_LEN).repeat(n)
    fires = flat > 0
    top = brute_force_topk(flat, ctx, pos, N_TOP)
    top_ok = top.values > 0
    g = torch.Generator().manual_seed(seed)
    keys = torch.stack([torch.rand(CTX_LEN, generator=g) for _ in range(n)])[:, first:]
    rnd = brute_force_topk(torch.where(fires, keys.reshape(-1, 1), -1.0), ctx, pos, N_RANDOM)
    rnd_ok = rnd.values >= 0

    def ids(c, p, ok):
        return torch.where(ok, tokens[c.clamp(min=0), p.clamp(min=0)], -1).numpy()

    return {"fire_count": fires.sum(0).numpy(), "n_tokens": n * kept,
            "max": flat.amax(0).numpy(), "code_sum": flat.double().sum(0).numpy(),
            "top_values": torch.where(top_ok, top.values, -math.inf).numpy(),
            "top_context": torch.where(top_ok, top.context, -1).numpy(),
            "top_position": torch.where(top_ok, top.position, -1).numpy(),
            "top_tokens": ids(top.context, top.position, top_ok),
            "random_context": torch.where(rnd_ok, rnd.context, -1).numpy(),
            "random_position": torch.where(rnd_ok, rnd.position, -1).numpy(),
            "random_tokens": ids(rnd.context, rnd.position, rnd_ok), "fires": fires, "ctx": ctx,
            "pos": pos}


ARRAYS = ("fire_count", "max", "top_values", "top_context", "top_position", "top_tokens",
          "random_context", "random_position", "random_tokens")


def _usage(subject, sae, tokens, **kw):
    return sae_feature_usage(subject, sae, tokens, n_top=N_TOP, n_random=N_RANDOM, **kw)


@pytest.fixture(scope="module")
def usage(subject, sae, tokens):
    return _usage(subject, sae, tokens, batch_size=5)


def test_usage_equals_brute_force(usage, sae, acts, tokens):
    ref = _brute(sae, acts, tokens)
    assert usage.n_tokens == ref["n_tokens"] == N_CTX * (CTX_LEN - 1)
    for name in ARRAYS:
        np.testing.assert_array_equal(getattr(usage, name), ref[name], err_msg=name)
    np.testing.assert_allclose(usage.code_sum, ref["code_sum"], rtol=1e-6)
    assert usage.hook_name == HOOK and usage.top_tokens.shape == (N_TOP, 40)


def test_known_features(usage, sae, acts, tokens):
    n = usage.n_tokens
    assert usage.dead.tolist() == [True] + [False] * 39
    assert usage.frequency[DEAD] == 0 and (usage.top_tokens[:, DEAD] == -1).all()
    assert (usage.random_tokens[:, DEAD] == -1).all() and usage.top_values[0, DEAD] == -math.inf
    # The constant feature ties everywhere: the tie rule takes the first tokens in order.
    assert usage.fire_count[CONSTANT] == n and usage.frequency[CONSTANT] == 1.0
    assert usage.top_context[:, CONSTANT].tolist() == [0] * N_TOP
    assert usage.top_position[:, CONSTANT].tolist() == list(range(1, N_TOP + 1))
    assert usage.top_tokens[:, CONSTANT].tolist() == tokens[0, 1:N_TOP + 1].tolist()
    assert usage.mean[CONSTANT] == pytest.approx(1.0)
    assert usage.mean_when_firing[CONSTANT] == pytest.approx(1.0)
    assert np.isnan(usage.mean_when_firing[DEAD])
    # Fewer firings than slots: only the firings are filled, the rest -1.
    k = int(usage.fire_count[RARE])
    assert 1 <= k < N_RANDOM  # the fixture's precondition: without it the lines below test nothing
    assert (usage.top_tokens[:k, RARE] >= 0).all() and (usage.top_tokens[k:, RARE] == -1).all()
    assert sorted(usage.random_context[:k, RARE]) == sorted(usage.top_context[:k, RARE])
    assert (usage.random_tokens[k:, RARE] == -1).all()
    freq = usage.frequency[3:]
    assert freq.max() > 0.4 and freq.min() < 0.03  # a range of frequencies


def test_random_sample_is_a_subset_of_firings_and_batch_independent(subject, sae, tokens, usage, acts):
    ref = _brute(sae, acts, tokens)
    firing = {(int(c), int(p), f) for (t, f) in ref["fires"].nonzero().tolist()
              for c, p in [(ref["ctx"][t], ref["pos"][t])]}
    ok = usage.random_context >= 0
    for slot, f in zip(*ok.nonzero(), strict=True):
        assert (usage.random_context[slot, f], usage.random_position[slot, f], f) in firing
    np.testing.assert_array_equal(ok.sum(0), np.minimum(usage.fire_count, N_RANDOM))
    for batch_size in (1, N_CTX):
        other = _usage(subject, sae, tokens, batch_size=batch_size)
        for name in ARRAYS:
            np.testing.assert_array_equal(getattr(other, name), getattr(usage, name), err_msg=name)
    reseeded = _usage(subject, sae, tokens, batch_size=N_CTX, seed=1)
    assert not np.array_equal(reseeded.random_context, usage.random_context)
    np.testing.assert_array_equal(reseeded.top_context, usage.top_context)
    # Not just the first firings in (context, position) order.
    assert not np.array_equal(usage.random_context[:, CONSTANT], np.zeros(N_RANDOM))


def test_keep_bos(subject, sae, tokens, acts):
    got = _usage(subject, sae, tokens, batch_size=N_CTX, skip_bos=False, seed=3)
    ref = _brute(sae, acts, tokens, seed=3, skip_bos=False)
    assert got.n_tokens == N_CTX * CTX_LEN and not got.skip_bos
    for name in ARRAYS:
        np.testing.assert_array_equal(getattr(got, name), ref[name], err_msg=name)


def test_priority_sample_is_uniform():
    """Each of 12 firings is kept by about n_random / 12 of the seeds."""
    codes = torch.zeros(4, 7, 1)  # (b, L, d_sae)
    where = [(0, 1), (0, 2), (0, 6), (1, 3), (1, 4), (2, 1), (2, 2), (2, 3), (2, 5), (3, 1),
             (3, 4), (3, 6)]
    for c, p in where:
        codes[c, p, 0] = 1.0 + c  # values do not matter to the sample
    hits: Counter = Counter()
    n_seeds, n_random = 600, 3
    for seed in range(n_seeds):
        acc = FeatureUsageAccumulator(1, 7, n_top=1, n_random=n_random, seed=seed)
        acc.update(codes[:2])
        acc.update(codes[2:])
        u = acc.result(torch.zeros(4, 7, dtype=torch.long), "h")
        hits.update(zip(u.random_context[:, 0].tolist(), u.random_position[:, 0].tolist(),
                        strict=True))
    assert set(hits) == set(where)
    expected = n_seeds * n_random / len(where)  # 150; binomial sd ~10.6
    assert all(abs(h - expected) < 45 for h in hits.values()), hits


def test_accumulator_state_does_not_grow():
    acc = FeatureUsageAccumulator(8, 5, n_top=3, n_random=2)
    sizes = []
    for _ in range(4):
        acc.update(torch.rand(3, 5, 8))
        sizes.append(acc.top.nbytes + acc.random.nbytes)
    assert len(set(sizes)) == 1 and acc.n_tokens == 4 * 3 * 4 and acc.n_contexts == 12


def test_bad_input(subject, sae, tokens):
    with pytest.raises(ValueError, match="int64"):
        sae_feature_usage(subject, sae, tokens.int())
    with pytest.raises(ValueError, match="batch_size"):
        sae_feature_usage(subject, sae, tokens, batch_size=0)
    wrong = _standard_sae(torch.zeros(32, 4), torch.zeros(4))
    with pytest.raises(ValueError, match="d_in = 32"):
        sae_feature_usage(subject, wrong, tokens[:2])
    acc = FeatureUsageAccumulator(4, 5)
    with pytest.raises(ValueError, match="codes must be"):
        acc.update(torch.zeros(2, 5, 3))
    with pytest.raises(ValueError, match="NaN"):
        acc.update(torch.full((1, 5, 4), math.nan))
    with pytest.raises(ValueError, match="no tokens"):
        acc.result(torch.zeros(0, 5, dtype=torch.long), "h")
    with pytest.raises(ValueError, match="ctx_len"):
        FeatureUsageAccumulator(4, 1)


def test_cached_equals_fresh_and_is_not_recomputed(subject, sae, tokens, usage, tmp_path, monkeypatch):
    cache = ContentCache(tmp_path)
    first = cached_feature_usage(cache, subject, sae, tokens, n_top=N_TOP, n_random=N_RANDOM,
                                 batch_size=7)

    def boom(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(features, "sae_feature_usage", boom)
    corpus = Corpus(tokens=tokens, source_of=torch.zeros(N_CTX, dtype=torch.long),
                    recipe=CorpusRecipe(n_contexts=N_CTX, context_len=CTX_LEN),
                    sha256=hashlib.sha256(tokens.numpy().tobytes()).hexdigest(),
                    tokenizer_sha256="none")
    second = cached_feature_usage(cache, subject, sae, corpus, n_top=N_TOP, n_random=N_RANDOM)
    for got in (first, second):
        for name in (*ARRAYS, "code_sum"):
            np.testing.assert_array_equal(getattr(got, name), getattr(usage, name), err_msg=name)
        assert got.meta() == usage.meta()
    with pytest.raises(AssertionError, match="recomputed"):  # another seed is another entry
        cached_feature_usage(cache, subject, sae, tokens, n_top=N_TOP, n_random=N_RANDOM, seed=9)


def test_usage_from_the_shared_pass_equals_the_fresh_one_and_is_read_from_cache(
        subject, sae, tokens, usage, acts, tmp_path, monkeypatch):
    """The corpus pass hands the build BOS-less activations; the usage computed from them,
    stored under cached_feature_usage's key, is what the R claims then read."""
    flat = acts[:, 1:].reshape(-1, acts.shape[-1])  # what harness.activations.corpus_pass keeps
    shared = features.usage_from_activations(sae, flat, tokens, n_top=N_TOP, n_random=N_RANDOM,
                                             batch_size=3)
    for name in ARRAYS:
        np.testing.assert_array_equal(getattr(shared, name), getattr(usage, name), err_msg=name)
    np.testing.assert_allclose(shared.code_sum, usage.code_sum, rtol=1e-6)
    cache = ContentCache(tmp_path)
    features.store_usage(cache, subject, sae, tokens, shared, n_top=N_TOP, n_random=N_RANDOM)
    monkeypatch.setattr(features, "sae_feature_usage", lambda *a, **k: pytest.fail("recomputed"))
    got = cached_feature_usage(cache, subject, sae, tokens, n_top=N_TOP, n_random=N_RANDOM)
    np.testing.assert_array_equal(got.top_context, shared.top_context)
    with pytest.raises(ValueError, match="cannot cover"):
        features.usage_from_activations(sae, flat[:-1], tokens)


# --- concentration ---------------------------------------------------------------------------

IDS = np.array([[5, 7, -1, 3],
                [5, 8, -1, 3],
                [6, 7, -1, -1],
                [5, 9, 2, -1]])


def test_concentration_by_hand():
    np.testing.assert_array_equal(token_concentration(IDS, min_valid=2), [0.75, 0.5, np.nan, 1.0])
    np.testing.assert_array_equal(token_concentration(IDS, min_valid=1), [0.75, 0.5, 1.0, 1.0])
    np.testing.assert_array_equal(distinct_share(IDS, min_valid=2), [0.5, 0.75, np.nan, 0.5])
    assert np.isnan(token_concentration(np.full((3, 2), -1))).all()
    assert token_concentration(np.zeros((0, 3), dtype=np.int64), min_valid=1).shape == (3,)
    with pytest.raises(ValueError, match="integer"):
        token_concentration(IDS.astype(float))
    with pytest.raises(ValueError, match=">= 0, or -1"):
        token_concentration(IDS - 2)
    with pytest.raises(ValueError, match="min_valid"):
        distinct_share(IDS, min_valid=0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(-1, 4), min_size=3, max_size=3), min_size=1, max_size=12),
       st.integers(1, 4))
def test_concentration_matches_counter(rows, min_valid):
    ids = np.array(rows, dtype=np.int64)  # (n, 3)
    conc, dist = token_concentration(ids, min_valid), distinct_share(ids, min_valid)
    for j in range(ids.shape[1]):
        valid = [int(x) for x in ids[:, j] if x >= 0]
        if len(valid) < min_valid:
            assert np.isnan(conc[j]) and np.isnan(dist[j])
        else:
            assert conc[j] == Counter(valid).most_common(1)[0][1] / len(valid)
            assert dist[j] == len(set(valid)) / len(valid)


# --- figures and HTML ------------------------------------------------------------------------


def test_figures(usage):
    plt = pyplot()
    fig = frequency_histogram_figure(usage, "tiny")
    texts = " ".join(t.get_text() for t in fig.axes[0].texts)
    assert "dead (never fired): 1 of 40" in texts
    assert len(fig.axes[0].lines) == 1  # the mean line
    plt.close(fig)
    conc = token_concentration(usage.top_tokens, min_valid=2)
    rnd = token_concentration(usage.random_tokens, min_valid=2)
    fig = concentration_vs_frequency_figure(usage.frequency, conc, rnd)
    assert fig.axes[0].get_xscale() == "log"
    plt.close(fig)
    with pytest.raises(ValueError, match="one length"):
        concentration_vs_frequency_figure(usage.frequency, conc[:3], rnd)


def test_token_html_scales_escapes_and_shows_whitespace():
    page = token_html([("row <1>", ["<script>", " foo", "a\nb"], [2.0, 1.0, 0.0]),
                       ("row 2", ['"q"'], [4.0])], "T & <b>", "cap <i>")
    assert "<script" not in page and "&lt;script&gt;" in page
    assert "<title>T &amp; &lt;b&gt;</title>" in page and "cap &lt;i&gt;" in page
    assert "row &lt;1&gt;" in page
    assert "rgba(255, 128, 0, 0.500)" in page and "rgba(255, 128, 0, 1.000)" in page
    assert "rgba(255, 128, 0, 0.250)" in page and "rgba(255, 128, 0, 0.000)" in page
    assert '<span class="ws">\u00b7</span>foo' in page
    assert 'a<span class="ws">\u21b5</span>b' in page
    assert 'title="&#x27;&quot;q&quot;&#x27;: 4"' in page  # repr of the token, quotes escaped
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page and "<link" not in page


def test_token_html_edge_cases():
    empty = token_html([], "nothing", "")
    assert "(no rows)" in empty and "</html>" in empty
    zeros = token_html([("z", ["a", "b"], [0.0, 0.0]), ("e", [], [])], "zeros", "")
    assert zeros.count("rgba(255, 128, 0, 0.000)") == 2 and "nan" not in zeros
    with pytest.raises(ValueError, match="2 tokens but 1 values"):
        token_html([("x", ["a", "b"], [1.0])], "t", "c")
    with pytest.raises(ValueError, match="non-finite"):
        token_html([("x", ["a"], [math.nan])], "t", "c")
