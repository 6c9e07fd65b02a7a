"""incremental_attention: KV-cached decoding with the rotated keys and the attention matmuls'
layouts carried from step to step is bit-identical to TransformerLens' own forward (logits
and every hook, left padding, steps of several tokens, buffers outgrown), falls back to
TransformerLens wherever its premise fails (a hook replaced the keys, a frozen cache, a
forward without the cache), and leaves nothing behind."""

from __future__ import annotations

import contextlib

import pytest
import torch

from harness.activations.incremental import incremental_attention
from harness.activations.layouts import decode_layouts

ARCHS = {
    "gpt2-like": {},
    "rotary-gqa-gated": dict(positional_embedding_type="rotary", rotary_dim=16, n_key_value_heads=2,
                             normalization_type="RMS", act_fn="silu", gated_mlp=True),
    "rotary-partial-mha": dict(positional_embedding_type="rotary", rotary_dim=8),
    "rotary-adjacent-gqa": dict(positional_embedding_type="rotary", rotary_dim=16,
                                rotary_adjacent_pairs=True, n_key_value_heads=1),
    "softcap-gqa": dict(n_key_value_heads=2, attn_scores_soft_cap=30.0),
    "split-qkv": dict(use_split_qkv_input=True),
}
HOOKS = ("hook_k", "hook_v", "hook_rot_k", "hook_attn_scores", "hook_pattern", "hook_z")


def _model(arch: str):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = dict(n_layers=2, d_model=64, d_head=16, n_heads=4, d_mlp=256, n_ctx=64, d_vocab=300,
               act_fn="gelu", normalization_type="LN", seed=0, initializer_range=0.3)
    return HookedTransformer(HookedTransformerConfig(**{**cfg, **ARCHS[arch]})).eval()


def _decode(model, incremental: bool, *, steps: int = 6, capacity: int = 0, chunk: int = 1,
            fwd_hooks=(), frozen_at: int | None = None, relayout: bool = False):
    """Greedy decode of 3 left-padded rows; returns every step's logits and every hook read."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    tokens = torch.randint(0, 300, (3, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(tokens)
    mask[0, :4], mask[2, :1] = 0, 0  # left padding
    kv = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, 3)
    seen: list[torch.Tensor] = []

    def read(act, hook):
        seen.append(act.clone())

    reads = [(f"blocks.{i}.attn.{h}", read) for i in range(model.cfg.n_layers) for h in HOOKS
             if f"blocks.{i}.attn.{h}" in model.hook_dict]
    out = []
    with (torch.no_grad(), model.hooks(fwd_hooks=[*fwd_hooks, *reads]),
          incremental_attention(model, kv, capacity) if incremental else contextlib.nullcontext(),
          decode_layouts(model) if relayout else contextlib.nullcontext()):
        logits = model(tokens, attention_mask=mask, past_kv_cache=kv)[:, -chunk:]
        for step in range(steps):
            out.append(logits)
            if frozen_at == step:
                kv.freeze()
            nxt = logits.argmax(-1)  # (3, chunk): steps of `chunk` tokens
            logits = model(nxt, attention_mask=torch.ones_like(nxt), past_kv_cache=kv)[:, -chunk:]
        out.append(logits)
    return out, seen


def _same(a, b) -> None:
    (la, sa), (lb, sb) = a, b
    assert len(la) == len(lb) and len(sa) == len(sb)
    for x, y in zip(la + sa, lb + sb, strict=True):
        assert x.shape == y.shape and torch.equal(x, y)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_decoding_is_bit_identical(arch):
    model = _model(arch)
    _same(_decode(model, False), _decode(model, True, capacity=9 + 6))


@pytest.mark.parametrize("capacity", [0, 10, 64])
def test_buffers_outgrown_or_oversized_change_nothing(capacity):
    model = _model("rotary-gqa-gated")
    _same(_decode(model, False, steps=8), _decode(model, True, steps=8, capacity=capacity))


def test_steps_of_several_tokens_and_decode_layouts_together():
    model = _model("rotary-gqa-gated")
    _same(_decode(model, False, chunk=2), _decode(model, True, chunk=2, relayout=True))


def test_a_hook_that_replaces_the_rotated_keys_is_honoured():
    """The memo must not hide a hook's edit: the next step rotates and expands afresh."""
    def edit(act, hook):
        return act * 1.5

    model = _model("rotary-gqa-gated")
    hooks = [("blocks.1.attn.hook_rot_k", edit), ("blocks.0.attn.hook_k", edit)]
    _same(_decode(model, False, fwd_hooks=hooks), _decode(model, True, fwd_hooks=hooks))


def test_a_frozen_cache_falls_back():
    model = _model("rotary-gqa-gated")
    _same(_decode(model, False, frozen_at=2), _decode(model, True, frozen_at=2))


def test_nothing_is_left_behind_even_on_error():
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    model = _model("rotary-gqa-gated")
    kv = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, 1)
    with pytest.raises(RuntimeError, match="boom"), incremental_attention(model, kv, 8):
        assert "apply_rotary" in vars(model.blocks[0].attn)
        assert "append" in vars(kv.entries[0])
        with incremental_attention(model, kv, 8):  # nested: leaves the outer one in place
            pass
        assert "calculate_z_scores" in vars(model.blocks[1].attn)
        raise RuntimeError("boom")
    for block, entry in zip(model.blocks, kv.entries, strict=True):
        assert not {"apply_rotary", "calculate_attention_scores", "calculate_z_scores"} & set(
            vars(block.attn))
        assert "append" not in vars(entry)


def test_a_plain_forward_inside_is_unchanged():
    """Forwards without the cache (a rerun inside the same block) go through untouched."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    model = _model("rotary-gqa-gated")
    tokens = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(tokens)
        kv = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, 2)
        with incremental_attention(model, kv, 16):
            model(tokens, attention_mask=torch.ones_like(tokens), past_kv_cache=kv)
            got = model(tokens)
    assert torch.equal(want, got)


def test_the_buffers_are_what_the_steps_read():
    """The fast path is taken (not only its fallback): after the prompt and two steps the
    cache's keys are a view of a buffer of the given capacity, and the score matmul's keys
    are stored in the order it reads them."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    model = _model("rotary-gqa-gated")
    seen = {}

    def keep(act, hook):
        seen[hook.name] = act

    tokens = torch.randint(0, 300, (2, 5), generator=torch.Generator().manual_seed(5))
    kv = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, 2)
    with (torch.no_grad(), incremental_attention(model, kv, 32),
          model.hooks(fwd_hooks=[("blocks.0.attn.hook_rot_k", keep)])):
        model(tokens, attention_mask=torch.ones_like(tokens), past_kv_cache=kv)
        for _ in range(2):
            model(tokens[:, :1], attention_mask=torch.ones(2, 1, dtype=torch.long), past_kv_cache=kv)
        keys = kv.entries[0].past_keys
        assert keys.shape[1] == 7 and keys.untyped_storage().nbytes() == 2 * 32 * 2 * 16 * 4
        rot = seen["blocks.0.attn.hook_rot_k"]
        assert rot.shape == keys.shape and rot.untyped_storage().nbytes() == keys.untyped_storage().nbytes()
