"""Capture, tokenisation and pooling: known answers and padding invariance."""

from __future__ import annotations

import pytest
import torch

from harness.activations.capture import (
    POOLING_POLICIES,
    Batch,
    PoolingPolicy,
    capture,
    pool,
    tokenize,
)
from harness.models import loaders
from harness.models.subjects import parse_subject
from tests.standins import make_llama_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    ckpt = make_llama_checkpoint(tmp_path_factory.mktemp("llama") / "m", seed=3)
    return loaders.load_subject(parse_subject(str(ckpt))).model


def _batch(lengths: list[int], pos: int, has_bos: bool = True) -> Batch:
    lengths_t = torch.tensor(lengths)
    mask = torch.arange(pos)[None, :] < lengths_t[:, None]
    return Batch(tokens=torch.zeros(len(lengths), pos, dtype=torch.long), mask=mask,
                 lengths=lengths_t, has_bos=has_bos)


def test_pool_known_answers():
    acts = torch.arange(8, dtype=torch.float64).view(2, 4, 1)  # rows [0,1,2,3], [4,5,6,7]
    batch = _batch([2, 4], 4)
    expect = {
        "masked-bos": [0.5, 5.5],      # mean of [0,1] and [4..7]
        "masked-nobos": [1.0, 6.0],    # [1] and [5,6,7]
        "unmasked-bos": [1.5, 5.5],    # pads averaged in: [0..3]
        "unmasked-nobos": [2.0, 6.0],  # [1,2,3] and [5,6,7]
    }
    for policy in POOLING_POLICIES:
        got = pool(acts, batch, policy)[:, 0].tolist()
        assert got == expect[policy.name], policy.name


def test_pool_refuses_a_text_with_nothing_left():
    acts = torch.ones(1, 3, 2)
    with pytest.raises(ValueError, match="no position left"):
        pool(acts, _batch([1], 3), PoolingPolicy(mask_padding=True, keep_bos=False))


def test_masked_pooling_is_padding_invariant(model):
    short, long = "a short text", "a much longer text that forces padding onto the first one"
    alone = tokenize(model, [short])
    both = tokenize(model, [short, long])
    assert both.tokens.shape[1] > alone.tokens.shape[1]
    name = "blocks.1.hook_resid_post"
    a = capture(model, alone.tokens, [name])[name]
    b = capture(model, both.tokens, [name])[name]
    for policy in (PoolingPolicy(True, True), PoolingPolicy(True, False)):
        torch.testing.assert_close(pool(a, alone, policy)[0], pool(b, both, policy)[0])
    unmasked = PoolingPolicy(mask_padding=False, keep_bos=True)
    assert not torch.allclose(pool(a, alone, unmasked)[0], pool(b, both, unmasked)[0])


def test_tokenize_rejects_empty_and_reports_truncation(model):
    with pytest.raises(ValueError, match="text 1 is empty"):
        tokenize(model, ["fine", "   "])
    with pytest.raises(ValueError, match="no texts"):
        tokenize(model, [])
    too_long = " ".join(["word"] * (model.cfg.n_ctx * 2))
    batch = tokenize(model, ["short", too_long])
    assert batch.truncated == (1,)
    assert batch.tokens.shape[1] == model.cfg.n_ctx


def test_cached_capture_equals_capture_and_reads_on_a_hit(tmp_path, monkeypatch):
    from harness.activations import capture as capture_mod
    from harness.activations.cache import ContentCache
    from harness.activations.capture import cached_capture

    ckpt = make_llama_checkpoint(tmp_path / "m", seed=3)
    loaded = loaders.load_subject(parse_subject(str(ckpt)))
    cache = ContentCache(tmp_path / "cache")
    tokens = torch.tensor([[1, 5, 9, 2], [1, 7, 7, 0]])
    hooks = ["blocks.0.hook_resid_pre", "blocks.1.mlp.hook_post"]
    fresh = capture(loaded.model, tokens, hooks)
    first = cached_capture(cache, loaded, tokens, hooks)
    for h in hooks:
        assert torch.equal(first[h], fresh[h])

    def no_forward(*args, **kwargs):
        raise AssertionError("a cache hit must not run the model")

    monkeypatch.setattr(capture_mod, "capture", no_forward)
    again = cached_capture(cache, loaded, tokens, hooks)
    assert all(torch.equal(again[h], fresh[h]) for h in hooks)
    with pytest.raises(AssertionError, match="must not run"):  # other tokens: another key
        cached_capture(cache, loaded, tokens.flip(1), hooks)
    with pytest.raises(AssertionError, match="must not run"):  # other hooks: another key
        cached_capture(cache, loaded, tokens, hooks[:1])


def test_the_one_bos_convention():
    from harness.activations.capture import content_positions, first_content_position

    assert first_content_position(True) == 1 and first_content_position(False) == 0
    assert content_positions(4).tolist() == [False, True, True, True]
    assert content_positions(3, has_bos=False).tolist() == [True, True, True]
    batch = _batch([2, 4], 4)
    assert batch.content_mask.tolist() == [[False, True, False, False], [False, True, True, True]]
    assert _batch([2, 4], 4, has_bos=False).content_mask.tolist() == batch.mask.tolist()
