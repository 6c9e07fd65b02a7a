"""decode_layouts: the weights TransformerLens copies on every call are stored in their read
order while decoding; every hook, logit and KV-cached step is bit-identical, and the ordinary
layout comes back afterwards (exceptions included)."""

from __future__ import annotations

import pytest
import torch

from harness.activations.layouts import _plan, decode_layouts
from harness.models.loaders import weights_hash

ARCHS = {
    "gpt2-like": {},
    "rotary-gqa-gated": dict(positional_embedding_type="rotary", rotary_dim=16, n_key_value_heads=2,
                             normalization_type="RMS", act_fn="silu", gated_mlp=True),
    "attn-result": dict(use_attn_result=True, gated_mlp=True, act_fn="silu"),
    "split-qkv": dict(use_split_qkv_input=True),
}


def _model(arch: str):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = dict(n_layers=2, d_model=64, d_head=16, n_heads=4, d_mlp=256, n_ctx=64, d_vocab=300,
               act_fn="gelu", normalization_type="LN", seed=0, initializer_range=0.3)
    return HookedTransformer(HookedTransformerConfig(**{**cfg, **ARCHS[arch]})).eval()


def _equal_everything(model, tokens: torch.Tensor) -> None:
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
        with decode_layouts(model):
            logits2, cache2 = model.run_with_cache(tokens)
    assert torch.equal(logits, logits2)
    names = list(cache.keys())
    assert names == list(cache2.keys())
    for k in names:
        assert torch.equal(cache[k], cache2[k]), k


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_hook_and_logit_is_bit_identical(arch):
    model = _model(arch)
    tokens = torch.randint(0, 300, (3, 12), generator=torch.Generator().manual_seed(1))
    before = weights_hash(model)
    _equal_everything(model, tokens)
    assert weights_hash(model) == before
    assert all(p.is_contiguous() for p in model.parameters())  # the ordinary layout is back


@pytest.mark.parametrize("arch", ["gpt2-like", "rotary-gqa-gated"])
def test_kv_cached_decoding_steps_are_bit_identical(arch):
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    model = _model(arch)
    tokens = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0  # left padding on one row

    def decode(relayout: bool) -> list[torch.Tensor]:
        kv = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, 2)
        out = []
        with torch.no_grad(), (decode_layouts(model) if relayout else torch.no_grad()):
            logits = model(tokens, attention_mask=mask, past_kv_cache=kv)[:, -1]
            for _ in range(5):
                out.append(logits)
                nxt = logits.argmax(-1)[:, None]
                logits = model(nxt, attention_mask=torch.ones_like(nxt), past_kv_cache=kv)[:, -1]
        return out

    for a, b in zip(decode(False), decode(True), strict=True):
        assert torch.equal(a, b)


def test_the_copied_weights_are_the_ones_relaid():
    """Inside, the forward's own transposes are contiguous (no copy); outside, not: a TL
    upgrade that reads the weights differently shows here, not as a silent slowdown."""
    model = _model("rotary-gqa-gated")
    mlp, attn = model.blocks[0].mlp, model.blocks[0].attn
    assert not mlp.W_in.T.is_contiguous() and not model.unembed.W_U.T.is_contiguous()
    with decode_layouts(model):
        assert mlp.W_in.T.is_contiguous() and mlp.W_gate.T.is_contiguous() and mlp.W_out.T.is_contiguous()
        assert model.unembed.W_U.T.is_contiguous()
        assert attn.W_Q.permute(0, 2, 1).is_contiguous() and attn._W_K.permute(0, 2, 1).is_contiguous()
        assert attn.W_O.permute(2, 0, 1).is_contiguous()
    assert mlp.W_in.is_contiguous() and model.unembed.W_U.is_contiguous()
    # paths that read a weight directly (split-QKV einsum, the plain MLP's addmm) are left alone
    plain = _model("split-qkv")
    names = {id(p) for p, _ in _plan(plain)}
    assert id(plain.blocks[0].attn.W_Q) not in names and id(plain.blocks[0].mlp.W_in) not in names


def test_layout_restored_after_an_exception():
    model = _model("rotary-gqa-gated")
    before = weights_hash(model)
    with pytest.raises(RuntimeError, match="boom"), decode_layouts(model):
        assert not model.unembed.W_U.is_contiguous()
        raise RuntimeError("boom")
    assert all(p.is_contiguous() for p in model.parameters()) and weights_hash(model) == before


def test_nested_use_is_a_no_op_and_the_outer_exit_restores():
    model = _model("rotary-gqa-gated")
    with decode_layouts(model):
        stored = model.unembed.W_U.data_ptr()
        with decode_layouts(model):
            assert model.unembed.W_U.data_ptr() == stored  # not copied again
        assert not model.unembed.W_U.is_contiguous()  # the inner exit left the outer's layout
    assert model.unembed.W_U.is_contiguous()
