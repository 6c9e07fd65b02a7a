"""Harvest: streaming top-k over a corpus equals brute force, and the cached path equals fresh."""

from __future__ import annotations

import pytest
import torch

from harness.activations.cache import ContentCache
from harness.activations.capture import HookNameError
from harness.activations.harvest import HarvestSpec, cached_corpus, harvest
from harness.activations.topk import brute_force_topk
from harness.data.corpus import CorpusRecipe
from harness.models import loaders
from harness.models.subjects import parse_subject
from tests.standins import make_llama_checkpoint

RECIPE = CorpusRecipe(n_contexts=24, context_len=16, seed=3, weights=(1.0, 0.0, 1.0))
HOOKS = ("blocks.0.mlp.hook_post", "blocks.1.hook_resid_post")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("harvest")
    loaded = loaders.load_subject(parse_subject(str(make_llama_checkpoint(root / "m", seed=4))))
    cache = ContentCache(root / "cache")
    corpus = cached_corpus(cache, loaded.model.tokenizer, RECIPE)
    return loaded, corpus, cache


def test_harvest_equals_brute_force(setup):
    loaded, corpus, _ = setup
    spec = HarvestSpec(hooks=HOOKS, k=5, batch_size=5)  # 24 is not a multiple: a ragged chunk
    got = harvest(loaded, corpus, spec, cache=None)
    _, cache = loaded.model.run_with_cache(corpus.tokens)
    n, length = corpus.tokens.shape
    ctx = torch.arange(n).repeat_interleave(length)
    pos = torch.arange(length).repeat(n)
    for h in HOOKS:
        acts = cache[h].reshape(n * length, -1).float()
        ref = brute_force_topk(acts, ctx, pos, 5, mask=pos > 0)
        assert torch.equal(got[h].topk.context, ref.context)
        assert torch.equal(got[h].topk.position, ref.position)
        torch.testing.assert_close(got[h].topk.values, ref.values)
        real = acts[pos > 0]
        torch.testing.assert_close(got[h].frequency, (real > 0).float().mean(0))
        torch.testing.assert_close(got[h].max, real.max(0).values)
        assert (got[h].topk.position > 0).all()  # BOS excluded


def test_cached_equals_fresh_and_is_reused(setup):
    loaded, corpus, cache = setup
    spec = HarvestSpec(hooks=HOOKS, k=4, batch_size=8, quantiles=True)
    fresh = harvest(loaded, corpus, spec, cache=None)
    first = harvest(loaded, corpus, spec, cache=cache)
    entries = list((cache.root / "harvest").rglob("meta.json"))
    second = harvest(loaded, corpus, spec, cache=cache)
    assert list((cache.root / "harvest").rglob("meta.json")) == entries
    for h in HOOKS:
        for a, b, c in ((fresh[h].topk.values, first[h].topk.values, second[h].topk.values),
                        (fresh[h].topk.context, first[h].topk.context, second[h].topk.context),
                        (fresh[h].quantiles, first[h].quantiles, second[h].quantiles)):
            assert torch.equal(a, b) and torch.equal(b, c)


def test_corpus_from_cache_equals_fresh(setup):
    loaded, corpus, cache = setup
    again = cached_corpus(cache, loaded.model.tokenizer, RECIPE)
    assert again.sha256 == corpus.sha256 and torch.equal(again.tokens, corpus.tokens)


def test_top_tokens_and_bad_hook(setup):
    loaded, corpus, _ = setup
    res = harvest(loaded, corpus, HarvestSpec(hooks=HOOKS[:1], k=3), cache=None)[HOOKS[0]]
    toks = res.top_tokens(corpus)
    assert toks.shape == res.topk.context.shape and (toks >= 0).all()
    with pytest.raises(HookNameError):
        harvest(loaded, corpus, HarvestSpec(hooks=("blocks.9.mlp.hook_post",)), cache=None)


def test_k_larger_than_corpus_leaves_marked_slots(setup):
    loaded, corpus, _ = setup
    res = harvest(loaded, corpus, HarvestSpec(hooks=HOOKS[:1], k=500), cache=None)[HOOKS[0]]
    n_real = corpus.tokens.shape[0] * (corpus.tokens.shape[1] - 1)
    assert (res.topk.n_valid == n_real).all()
    assert (res.topk.context[n_real:] == -1).all()


def test_per_context_harvest_equals_brute_force(setup):
    loaded, corpus, _ = setup
    spec = HarvestSpec(hooks=HOOKS[:1], k=6, batch_size=7, per_context=True)
    got = harvest(loaded, corpus, spec, cache=None)[HOOKS[0]]
    _, cache = loaded.model.run_with_cache(corpus.tokens)
    acts = cache[HOOKS[0]].float()[:, 1:]  # (n_ctx, L-1, n_units), BOS excluded
    vals, pos = acts.max(dim=1)  # (n_ctx, n_units)
    for unit in range(0, vals.shape[1], 17):
        order = sorted(range(vals.shape[0]), key=lambda c: (-vals[c, unit].item(), c))[:6]
        assert got.topk.context[:, unit].tolist() == order
        assert got.topk.position[:, unit].tolist() == [int(pos[c, unit]) + 1 for c in order]
    assert len(set(got.topk.context[:, 0].tolist())) == 6  # distinct contexts
