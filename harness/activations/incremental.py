"""Rotary keys and grouped keys/values carried from one decoding step to the next.

TransformerLens 3.9's KV cache stores keys BEFORE the rotary embedding, so at every decoding
step ``AbstractAttention.forward`` re-rotates the whole cache (``apply_rotary(k, 0, mask)``:
a clone, two slice writes, two products, a sum and a concatenation over batch x cached
positions x heads x d_head), and ``GroupedQueryAttention`` re-expands the whole cache's keys
and values to every query head (``repeat_interleave``) for the scores and for z. On SmolLM2-135M
decoding 160 rows (2 cores) that was ~15 % of a step, for work whose result only grows by one
position per step.

:func:`incremental_attention` remembers, per attention module, the rotated keys and the
expanded keys/values it returned at the previous step; at the next step, when the tensor it is
handed is the cache's own (``x is entry.past_keys`` / ``past_values``: the cache appended to
what was seen, nothing else touched it) and one step longer, only the new positions are
rotated (by TransformerLens' own ``apply_rotary`` with the step's offset and mask, exactly as
the step's queries are) or expanded, and concatenated to what was kept. Every operation is
elementwise or a copy, so the result is bit-identical to TransformerLens' (tested on rotary,
GQA, partial-rotary and absolute-position stand-ins and on SmolLM2,
tests/harness/activations/test_incremental.py). Any other call (a hook that replaced the
keys, a frozen cache, a forward without the cache, an architecture it does not cover) goes to
TransformerLens' own method unchanged. The overrides are instance attributes, removed on exit
(exceptions included): nothing outside the ``with`` sees them.

Why not upstream: the cache layout is TransformerLens' (rotating before caching would change
what ``hook_rot_k`` and a cache entry mean); this is a scoped memo around its own methods.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["incremental_attention"]

_NAMES = ("apply_rotary", "calculate_attention_scores", "calculate_z_scores")


class _Layer:
    """One attention module's buffers while decoding. ``buf[kind]`` holds ``n[kind]``
    positions along its position dim, computed from the tensor ``src[kind]``: "rot" (b, cap,
    kv_heads, d_head) the rotated keys; "k_t" (b, heads, d_head, cap) the keys expanded to the
    query heads in the order the score matmul reads them; "v" (b, heads, cap, d_head) the
    expanded values as the z matmul reads them. ``grew[kind] = (child, parent)`` records that
    ``child`` is ``parent`` extended by new positions (the cache entry's append says so for
    its keys and values, :meth:`hold` for the rotated keys it returns): a buffer is extended
    only when its source is exactly what the new tensor extends, and rebuilt otherwise."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.buf: dict[str, torch.Tensor] = {}
        self.src: dict[str, torch.Tensor] = {}
        self.n: dict[str, int] = {}
        self.grew: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def parent(self, kind: str, x: torch.Tensor) -> torch.Tensor | None:
        child, parent = self.grew.get(kind, (None, None))
        return parent if child is x else None

    def hold(self, kind: str, x: torch.Tensor, parent: torch.Tensor | None, fill,
             pos_dim: int) -> tuple[torch.Tensor, bool]:
        """(the buffer ``kind`` holding ``fill(x, start)`` -- x's positions from ``start``, laid
        out as the buffer -- for all x.shape[1] positions, as a view; whether it was extended
        rather than rebuilt). Only the new positions are computed when ``x`` extends
        ``parent`` and ``parent`` is the buffer's source."""
        n, buf = x.shape[1], self.buf.get(kind)
        extend = buf is not None and parent is not None and parent is self.src.get(kind)
        start = self.n[kind] if extend else 0
        new = fill(x, start)
        prefix = buf.narrow(pos_dim, 0, start) if extend else None
        out = self.write(kind, new, prefix, pos_dim, reuse=extend)
        self.src[kind], self.n[kind] = x, n
        return out, extend

    def write(self, kind: str, new: torch.Tensor, prefix: torch.Tensor | None, pos_dim: int,
              reuse: bool) -> torch.Tensor:
        """The buffer ``kind`` holding ``prefix`` (its first positions, None: none) then
        ``new`` along ``pos_dim``, as a view of exactly those positions. ``reuse``: ``prefix``
        is already the buffer's own start, so only ``new`` is written when it fits; otherwise
        (or when outgrown) a fresh buffer of at least ``capacity`` positions is made, so views
        handed out earlier stay valid."""
        buf = self.buf.get(kind)
        start = 0 if prefix is None else prefix.shape[pos_dim]
        n = start + new.shape[pos_dim]
        if not reuse or buf is None or n > buf.shape[pos_dim]:
            size = list(new.shape)
            size[pos_dim] = max(n, self.capacity, 2 * buf.shape[pos_dim] if reuse and buf is not None
                                else 0)
            grown = new.new_empty(size)
            if start:
                grown.narrow(pos_dim, 0, start).copy_(prefix)
            buf = self.buf[kind] = grown
        buf.narrow(pos_dim, start, n - start).copy_(new)
        return buf.narrow(pos_dim, 0, n)


@contextmanager
def incremental_attention(model: Any, kv: Any, capacity: int = 0) -> Iterator[None]:
    """Inside: while decoding with ``kv`` (a ``TransformerLensKeyValueCache`` made for this
    decode), ``model``'s attention layers extend buffers of rotated keys and of keys/values in
    the layouts the attention matmuls read, instead of recomputing and copying the whole cache
    at every step; bit-identical to TransformerLens' own forward. ``capacity``: the positions
    the decode will reach (prompt + new tokens; buffers grow past it if needed). Memory: about
    (2 x heads / kv_heads + 1) x the KV cache's. Outside: nothing changed."""
    from transformer_lens.components.attention import Attention
    from transformer_lens.components.grouped_query_attention import GroupedQueryAttention

    cfg = model.cfg
    entries = list(getattr(kv, "entries", []))
    rotary = (cfg.positional_embedding_type == "rotary" and not cfg.use_dynamic_ntk_rope
              and not getattr(cfg, "load_in_4bit", False))
    installed: list[tuple[Any, tuple[str, ...]]] = []
    try:
        for layer, block in enumerate(getattr(model, "blocks", [])):
            attn = getattr(block, "attn", None)
            # exact classes: a subclass may compute its scores otherwise
            if type(attn) not in (Attention, GroupedQueryAttention) or layer >= len(entries):
                continue
            entry = entries[layer]
            if any(n in vars(attn) for n in _NAMES) or "append" in vars(entry):
                continue  # already overridden (nested use): leave it alone
            grouped = (type(attn) is GroupedQueryAttention
                       and not cfg.ungroup_grouped_query_attention)
            state = _Layer(capacity)
            entry.append = _append(entry, state)
            names: tuple[str, ...] = ("calculate_attention_scores", "calculate_z_scores")
            if rotary:
                attn.apply_rotary = _rotary(attn, entry, state)
                names += ("apply_rotary",)
            attn.calculate_attention_scores = _scores(attn, state, rotary, grouped)
            attn.calculate_z_scores = _z(attn, state, grouped)
            installed += [(attn, names), (entry, ("append",))]
        yield
    finally:
        for obj, names in installed:
            for n in names:
                vars(obj).pop(n, None)


def _append(entry: Any, state: _Layer):
    own = type(entry).append

    def grow(kind: str, before: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """``torch.cat([before, new], dim=1)``'s values, written into a buffer of which the
        result is a view (extended in place when ``before`` is the last view returned)."""
        reuse = before is state.src.get(kind)
        state.src[kind] = out = state.write(kind, new, before, 1, reuse)
        return out

    def append(new_keys, new_values):
        """TransformerLens' append (``past = cat([past, new], dim=1)``: a copy of the whole
        cache per step) as writes into buffers of which ``past_keys``/``past_values`` are
        views: the same values."""
        before_k, before_v = entry.past_keys, entry.past_values
        if entry.frozen or any(a.dtype != b.dtype or a.device != b.device or
                               a.shape[2:] != b.shape[2:] for a, b in
                               ((before_k, new_keys), (before_v, new_values))):
            state.grew.pop("cache_k", None)  # TransformerLens' own (a frozen cache stores nothing)
            state.grew.pop("cache_v", None)
            return own(entry, new_keys, new_values)
        k, v = grow("raw_k", before_k, new_keys), grow("raw_v", before_v, new_values)
        entry.past_keys, entry.past_values = k, v
        if before_k.shape[1] > 0:  # k = before_k + new positions
            state.grew["cache_k"], state.grew["cache_v"] = (k, before_k), (v, before_v)
        else:
            state.grew.pop("cache_k", None)
            state.grew.pop("cache_v", None)
        return k, v

    return append


def _rotary(attn: Any, entry: Any, state: _Layer):
    own = type(attn).apply_rotary

    def apply_rotary(x, past_kv_pos_offset=0, attention_mask=None):
        if past_kv_pos_offset != 0 or x is not entry.past_keys:  # queries, or not the cache
            return own(attn, x, past_kv_pos_offset, attention_mask)
        # position p's rotation depends on p and the mask alone: the new positions are
        # rotated exactly as the step's queries are (offset = their start)
        before = state.grew.get("rot_k", (None, None))[0]
        out, extended = state.hold("rot", x, state.parent("cache_k", x),
                                   lambda t, s: own(attn, t[:, s:], s, attention_mask), 1)
        state.grew["rot_k"] = (out, before if extended else None)
        return out

    return apply_rotary


def _expand(attn: Any, t: torch.Tensor, grouped: bool) -> torch.Tensor:
    """GroupedQueryAttention's own expansion of kv heads to query heads (none otherwise)."""
    return torch.repeat_interleave(t, dim=2, repeats=attn.repeat_kv_heads) if grouped else t


def _scores(attn: Any, state: _Layer, rotary: bool, grouped: bool):
    from transformer_lens.components.abstract_attention import AbstractAttention

    def calculate_attention_scores(q, k):
        parent = state.parent("rot_k" if rotary else "cache_k", k)
        # (b, heads, d_head, n): what AbstractAttention's rearrange of k makes of it, stored
        # so, so that the matmul reads it without a copy
        k_t, _ = state.hold("k_t", k, parent,
                            lambda t, s: _expand(attn, t[:, s:], grouped).permute(0, 2, 3, 1), 3)
        # GroupedQueryAttention's own method is this call after its repeat_interleave
        return AbstractAttention.calculate_attention_scores(attn, q, k_t.permute(0, 3, 1, 2))

    return calculate_attention_scores


def _z(attn: Any, state: _Layer, grouped: bool):
    from transformer_lens.components.abstract_attention import AbstractAttention

    def calculate_z_scores(v, pattern):
        v_h, _ = state.hold("v", v, state.parent("cache_v", v),
                            lambda t, s: _expand(attn, t[:, s:], grouped).permute(0, 2, 1, 3), 2)
        return AbstractAttention.calculate_z_scores(attn, v_h.permute(0, 2, 1, 3), pattern)

    return calculate_z_scores
