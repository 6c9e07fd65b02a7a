"""Rereading fixed texts (harness/activations/rerun.py) and the per-row clamp
(harness/activations/clamp.py): per-row writes as a hypothesis property and a known answer; a
reread under a rerun-only clamp equals the run that clamps the rerun only, and its KL is the KL
between that run's and the baseline's log-probs; the errors and the cache."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.activations import rerun as rerun_module
from harness.activations.cache import ContentCache
from harness.activations.clamp import Clamp, clamp_hooks
from harness.activations.generation import GenerationSpec, run_generation
from harness.activations.rerun import reread
from tests.harness.activations.test_generation import POST, PROMPTS, RESID, _leaked, _model

N_NEW = 10
H = "blocks.0.mlp.hook_post"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tests.standins import train_tokenizer

    return train_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=300, model_max_length=64)


@pytest.fixture(scope="module")
def gpt(tokenizer):
    """Read-only use only: shared by the module's tests."""
    return _model(tokenizer, "standard")


@pytest.fixture(scope="module")
def base(gpt):
    return run_generation(gpt, GenerationSpec(PROMPTS, N_NEW, hooks=(POST, RESID), logprobs=True))


# --- per-row clamps -----------------------------------------------------------------------------


class _Hook:
    name = H


def _apply(hooks, act: torch.Tensor) -> torch.Tensor:
    for _, fn in hooks:
        act = fn(act, _Hook())
    return act


def test_per_row_clamp_known_answer():
    act = torch.arange(3 * 2 * 5, dtype=torch.float32).reshape(3, 2, 5)  # (batch, pos, d)
    clamps = [Clamp(H, 1, 2.0), None, Clamp(H, 4, -1.0, where="generation-only")]
    gen = _apply(clamp_hooks(clamps, "generation"), act.clone())
    expected = act.clone()
    expected[0, :, 1], expected[2, :, 4] = 2.0, -1.0
    assert torch.equal(gen, expected)
    rer = _apply(clamp_hooks(clamps, "rerun"), act.clone())
    expected = act.clone()
    expected[0, :, 1] = 2.0
    assert torch.equal(rer, expected)
    assert clamp_hooks([None, Clamp(H, 0, 1.0, where="rerun-only")], "generation") == []
    with pytest.raises(ValueError, match="phase"):
        clamp_hooks(clamps, "both")


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_per_row_clamp_writes_exactly_the_clamped_entries(data):
    b, p, d = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 4)), data.draw(st.integers(1, 7))
    clamps = data.draw(st.lists(st.one_of(st.none(), st.builds(
        Clamp, st.just(H), st.integers(0, d - 1), st.floats(-50, 50),
        st.sampled_from(["both", "generation-only", "rerun-only"]))), min_size=b, max_size=b))
    phase = data.draw(st.sampled_from(["generation", "rerun"]))
    act = torch.randn(b, p, d, generator=torch.Generator().manual_seed(b * 100 + d))
    out = _apply(clamp_hooks(clamps, phase), act.clone())
    skip = "rerun-only" if phase == "generation" else "generation-only"
    written = torch.zeros(b, p, d, dtype=torch.bool)
    for r, c in enumerate(clamps):
        if c is not None and c.where != skip:
            assert (out[r, :, c.neuron] == torch.tensor(c.value, dtype=torch.float32)).all()
            written[r, :, c.neuron] = True
    assert torch.equal(out[~written], act[~written])


# --- reread ---------------------------------------------------------------------------------------


def test_unclamped_reread_is_the_run_itself_with_zero_kl(gpt, base):
    (r,) = reread(gpt, base, [None], hooks=(POST, RESID), kl=True)
    for h in (POST, RESID):
        torch.testing.assert_close(r.means[h], base.means[h])
    valid = base.new_mask
    assert torch.equal(r.kl[valid], torch.zeros(int(valid.sum())))
    assert r.kl[~valid].isnan().all()


@pytest.mark.parametrize("hook", [POST, H])
def test_reread_under_a_clamp_is_the_rerun_only_run(gpt, base, hook):
    clamp = Clamp(hook, 7, 20.0, where="rerun-only")
    only = run_generation(gpt, GenerationSpec(PROMPTS, N_NEW, clamp=clamp, hooks=(POST, RESID),
                                              logprobs=True))
    assert torch.equal(only.new_tokens, base.new_tokens)
    none, got = reread(gpt, base, [None, clamp], hooks=(POST, RESID), kl=True)
    for h in (POST, RESID):
        torch.testing.assert_close(got.means[h], only.means[h])
    p, q = base.logprobs, only.logprobs  # (n, N, d_vocab)
    expected = (p.exp() * (p - q)).sum(-1)
    torch.testing.assert_close(got.kl, expected, equal_nan=True)
    valid = base.new_mask
    assert (got.kl[valid] > 0).all() and (got.kl[valid] > -1e-6).all()
    if hook == H:  # a layer-0 clamp moves layer 1: the reading is not the unclamped one
        assert not torch.allclose(got.means[RESID], none.means[RESID])
    assert not _leaked(gpt)


def test_batches_do_not_change_a_reread(gpt, base):
    clamp = Clamp(H, 3, -5.0, where="rerun-only")
    one = reread(gpt, base, [clamp], hooks=(RESID,), kl=True, batch_size=1)[0]
    all_ = reread(gpt, base, [clamp], hooks=(RESID,), kl=True, batch_size=len(PROMPTS))[0]
    torch.testing.assert_close(one.means[RESID], all_.means[RESID])
    torch.testing.assert_close(one.kl, all_.kl, equal_nan=True, atol=1e-6, rtol=1e-4)


def test_reread_cache(gpt, base, tmp_path, monkeypatch):
    cache = ContentCache(tmp_path)
    clamps = [None, Clamp(H, 3, -5.0, where="rerun-only")]
    first = reread(gpt, base, clamps, hooks=(RESID,), kl=True, cache=cache, subject="a")

    def no_run(*args, **kwargs):
        raise AssertionError("a cache hit must not run the model")

    monkeypatch.setattr(rerun_module, "_compute", no_run)
    hit = reread(gpt, base, clamps, hooks=(RESID,), kl=True, cache=cache, subject="a")
    for a, b in zip(first, hit, strict=True):
        assert a.clamp == b.clamp
        assert torch.equal(a.means[RESID], b.means[RESID])
        assert torch.equal(a.kl.isnan(), b.kl.isnan()) and torch.equal(a.kl.nan_to_num(), b.kl.nan_to_num())
    with pytest.raises(AssertionError, match="must not run"):  # another value: another key
        reread(gpt, base, [Clamp(H, 3, -5.5, where="rerun-only")], hooks=(RESID,), kl=True,
               cache=cache, subject="a")
    with pytest.raises(ValueError, match="identity"):
        reread(gpt, base, clamps, hooks=(RESID,), cache=cache)


@pytest.mark.parametrize(("clamps", "kwargs", "message"), [
    ([], {"kl": True}, "no clamps"),
    ([Clamp(H, 1, 1.0)], {"kl": True}, "rerun-only"),
    ([None], {}, "nothing to read"),
    ([None], {"hooks": ("blocks.0.mlp.hook_pots",)}, "did you mean"),
    ([None], {"kl": True, "batch_size": 0}, "batch_size"),
])
def test_reread_errors(gpt, base, clamps, kwargs, message):
    with pytest.raises(ValueError, match=message):
        reread(gpt, base, clamps, **kwargs)
    assert not _leaked(gpt)
