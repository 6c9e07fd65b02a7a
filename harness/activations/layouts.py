"""Weights stored in the memory order TransformerLens' forward reads them in, while decoding.

TransformerLens 3.9 transposes several weights on EVERY forward call to match Hugging Face's
``nn.Linear`` layout: ``GatedMLP`` calls ``F.linear(x, W.T.contiguous())`` on W_gate, W_in and
W_out, ``Unembed`` on W_U, and ``simple_attn_linear`` / the attention output rearrange W_Q,
W_K, W_V, W_O into ``(out, in)`` order and copy. On a whole-context forward the copies are
amortised over thousands of tokens; while decoding one token per row they dominate: measured
on SmolLM2-135M (2 cores, 80 rows per step), the unembedding took 79 ms per step of which
the 113 MB copy of W_U is ~2/3, and a gated MLP call 5.8 ms of which 2.8 ms is its matmuls.
A whole-context forward (16 x 128 tokens) copies ~420 MB of SmolLM2's weights too, so the
loops of forwards over the corpus and over the texts run under it as well.

:func:`decode_layouts` re-stores those parameters (same values, same shapes) so that the
forward's ``.T.contiguous()`` / rearrange is already contiguous and costs nothing; F.linear
then receives a contiguous weight with the same values and strides as before, so every
result is bit-identical (tested on the default subject and on GPT-2 and rotary/GQA
stand-ins, ``tests/harness/activations/test_layouts.py``). On exit the parameters get their
ordinary contiguous layout back. Nothing is changed for the forwards that read a weight
directly (the plain MLP's ``addmm`` on W_in, the split-QKV einsum path): those keep their
layout, because a transposed operand could change the bits.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

# Memory order of each parameter as the forward reads it, as a permutation of its dims:
# the stored tensor is ``p.permute(order).contiguous()`` and the parameter becomes the view
# back, so that ``p.permute(order)`` (what the forward's transpose / rearrange does) is
# contiguous.
_T = (1, 0)  # (in, out) parameter read as (out, in)
_QKV = (0, 2, 1)  # (head, d_model, d_head) read as ((head d_head), d_model)
_O = (2, 0, 1)  # (head, d_head, d_model) read as (d_model, (head d_head))


def _plan(model: Any) -> list[tuple[torch.nn.Parameter, tuple[int, ...]]]:
    """The parameters whose forward copies them into another order, with that order."""
    from transformer_lens.components import GatedMLP, Unembed
    from transformer_lens.components.abstract_attention import AbstractAttention

    cfg, out = model.cfg, []
    if getattr(cfg, "load_in_4bit", False):
        return out
    for m in model.modules():
        if type(m) is GatedMLP:  # exact class: the 4-bit and MoE variants read differently
            out += [(m.W_gate, _T), (m.W_in, _T), (m.W_out, _T)]
        elif type(m) is Unembed:
            out.append((m.W_U, _T))
        elif isinstance(m, AbstractAttention):
            if not (cfg.use_split_qkv_input or cfg.use_attn_in):  # simple_attn_linear's path
                grouped = hasattr(m, "_W_K") and not cfg.ungroup_grouped_query_attention
                names = ("W_Q", "_W_K", "_W_V") if grouped else ("W_Q", "W_K", "W_V")
                out += [(getattr(m, n), _QKV) for n in names
                        if isinstance(getattr(m, n, None), torch.nn.Parameter)]
            if not cfg.use_attn_result and isinstance(getattr(m, "W_O", None), torch.nn.Parameter):
                out.append((m.W_O, _O))
    return out


def _inverse(order: tuple[int, ...]) -> tuple[int, ...]:
    inv = [0] * len(order)
    for i, o in enumerate(order):
        inv[o] = i
    return tuple(inv)


_ACTIVE = "_interp_claims_layouts_depth"


@contextmanager
def decode_layouts(model: Any) -> Iterator[None]:
    """Inside: ``model``'s copied-per-call weights stored in their read order (same values);
    after (exceptions included): their ordinary contiguous layout again. Re-entrant: a nested
    use on the same model changes nothing (entering and leaving copy the weights, ~0.2 s each
    for SmolLM2, so callers wrap whole loops of forwards, not single calls)."""
    depth = getattr(model, _ACTIVE, 0)
    object.__setattr__(model, _ACTIVE, depth + 1)  # plain attribute, not a registered module
    done = []
    try:
        if depth == 0:
            for p, order in _plan(model):
                if p.dim() == len(order):
                    p.data = p.data.permute(order).contiguous().permute(_inverse(order))
                    done.append(p)
        yield
    finally:
        for p in done:
            p.data = p.data.contiguous()
        object.__setattr__(model, _ACTIVE, depth)
