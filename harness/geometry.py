"""Method 2 of claims family W ("weight geometry"): the vocabulary tokens each neuron's input
weights point at.

For token t (row ``W_E[t]``), neuron n (input column ``W[:, n]``) and an optional per-channel
scale s (d_model,):

    x_t        = W_E[t] * s                                          (s = 1 when absent)
    dot[t, n]  = x_t . W[:, n]
    cos[t, n]  = dot[t, n] / (||W[:, n]|| ||x_t||)      computed as fl(fl(dot / ||W[:, n]||) / ||x_t||)

and each neuron keeps its top-k tokens by score (``cos`` with ``cosine=True``, else ``dot``).

Tie rule (that of :mod:`harness.topk` with context = token id, position = 0): value descending,
then token id ascending (``-0.0 == 0.0``). The order is total, so the result does not depend on
``chunk``.

Zero-norm policy (cosine only; a dot product is always defined): cosine is undefined for a
zero vector, so it is never made up. A token whose scaled row is zero is excluded (never ranked,
not counted in ``n_seen``); a neuron whose column is zero gets no tokens at all. Missing tokens
are unfilled slots, as in :class:`~harness.topk.TopKResult`: value -inf, context = position = -1.
No score is ever NaN: NaN or infinite inputs raise ``ValueError``.

Streaming: the vocabulary is scored ``chunk`` rows at a time, unit-major ``(n_units, chunk)`` so
that each neuron's scores are contiguous for ``torch.topk``; each chunk's exact top-k is merged
into a ``(n_units, k)`` state, so no ``d_vocab x n_units`` matrix is ever held. The merge is
:class:`~harness.topk.StreamingTopK`'s rule specialised to one shared position; the tests check
the two agree bit for bit (``StreamingTopK.update`` on a whole chunk costs 2-4x the GEMM here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from harness.topk import TopKResult, TopKSpec

DEFAULT_CHUNK = 8192
"""Vocabulary rows scored per GEMM (benchmarks/test_bench_geometry.py picked it)."""

GeometryName = Literal["tl_cosine", "viewer"]
Branch = Literal["in", "gate", "linear"]
_BRANCH_WEIGHT = {"in": "W_in", "linear": "W_in", "gate": "W_gate"}
_FOLDED, _UNFOLDED = ("LNPre", "RMSPre"), ("LN", "RMS")


def _checked(W_E: Tensor, W: Tensor, scale: Tensor | None, k: int, chunk: int) -> torch.dtype:
    """Validate shapes and finiteness; return the compute dtype (at least float32)."""
    if W_E.ndim != 2 or W.ndim != 2 or W_E.shape[1] != W.shape[0]:
        raise ValueError(f"need W_E (d_vocab, d_model) and W (d_model, n_units), got "
                         f"{tuple(W_E.shape)} and {tuple(W.shape)}")
    if scale is not None and scale.shape != (W.shape[0],):
        raise ValueError(f"scale must be ({W.shape[0]},), got {tuple(scale.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    TopKSpec(k, W.shape[1])  # validates k and n_units
    for name, t in (("W_E", W_E), ("W", W), ("scale", scale)):
        if t is not None and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} has NaN or infinite entries")
    return torch.promote_types(torch.promote_types(W_E.dtype, W.dtype), torch.float32)


def _to_result(values: Tensor, ids: Tensor, k: int, n_seen: int) -> TopKResult:
    """Unit-major (n_units, m <= k) state -> TopKResult (k, n_units); -inf slots are unfilled."""
    n_units, m = values.shape
    values = torch.cat([values, values.new_full((n_units, k - m), -math.inf)], dim=1)
    ids = torch.cat([ids, ids.new_full((n_units, k - m), -1)], dim=1)  # (n_units, k)
    filled = values > -math.inf
    ids = torch.where(filled, ids, -1)
    position = torch.where(filled, 0, -1)
    return TopKResult(values.T.contiguous(), ids.T.contiguous(), position.T.contiguous(), n_seen)


def _chunk_topk(s: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact top-k of each row of s (n_units, c) under the tie rule, as (values, local ids).

    ``torch.topk(k + 1)`` finds the k-th value v_k; its pick is the tie-rule set unless
    ``v_{k+1} == v_k`` (a tie straddles place k), and only those rows are re-ranked with a
    stable sort (columns are in token order, so a stable sort breaks ties by token id).
    """
    top = s.topk(min(k + 1, s.shape[1]), dim=1)  # (n_units, <= k + 1) each, descending
    if bool(torch.isnan(top.values[:, 0]).any()):  # topk ranks NaN above everything
        raise ValueError("NaN score (overflow in the inputs?)")
    if s.shape[1] <= k:  # every token is a candidate
        return s, torch.arange(s.shape[1], device=s.device).expand_as(s)  # (n_units, c)
    values, ids = top.values[:, :k], top.indices[:, :k]  # (n_units, k)
    kth = top.values[:, k - 1]
    straddled = (top.values[:, k] == kth) & (kth > -math.inf)  # -inf slots are dropped anyway
    if bool(straddled.any()):
        rows = straddled.nonzero().squeeze(1)  # (n_tied,)
        order = torch.sort(s[rows], dim=1, descending=True, stable=True)
        values, ids = values.clone(), ids.clone()
        values[rows], ids[rows] = order.values[:, :k], order.indices[:, :k]
    return values, ids


def _merge(values: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """First k of each row (n_units, m) in the tie-rule order: two stable sorts, the least
    significant key (token id) first."""
    by_id = torch.argsort(ids, dim=1, stable=True)
    values, ids = values.gather(1, by_id), ids.gather(1, by_id)
    by_value = torch.argsort(values, dim=1, descending=True, stable=True)[:, :k]
    return values.gather(1, by_value), ids.gather(1, by_value)  # (n_units, min(m, k))


def score_topk(
    W_E: Tensor,
    W: Tensor,
    k: int = 20,
    *,
    cosine: bool,
    scale: Tensor | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> TopKResult:
    """Per column n of W, the k tokens with the largest score (module docstring) against
    ``W_E @ diag(scale)``. ``.context`` holds token ids (k, n_units), ``.values`` the scores,
    ``.n_seen`` the tokens ranked. Computed in float32 (float64 inputs stay float64)."""
    dtype = _checked(W_E, W, scale, k, chunk)
    d_vocab, n_units = W_E.shape[0], W.shape[1]
    w_t = W.detach().to(dtype).T.contiguous()  # (n_units, d_model): unit-major scores
    scale = None if scale is None else scale.detach().to(dtype)
    col_norm = torch.linalg.vector_norm(w_t, dim=1) if cosine else None  # (n_units,)
    dead = None if col_norm is None else (col_norm == 0).nonzero().squeeze(1)  # (n_dead,)
    values = w_t.new_empty(n_units, 0)  # (n_units, m) state, m <= k
    ids = torch.empty(n_units, 0, dtype=torch.long, device=w_t.device)
    n_seen = 0
    for lo in range(0, d_vocab, chunk):
        x = W_E[lo : lo + chunk].detach().to(dtype)  # (c, d_model)
        if scale is not None:
            x = x * scale
        s = w_t @ x.T  # (n_units, c)
        n_seen += x.shape[0]
        if col_norm is not None:
            row_norm = torch.linalg.vector_norm(x, dim=1)  # (c,)
            s.div_(col_norm[:, None]).div_(row_norm)  # 0/0 = NaN where a norm is zero:
            zero_rows = row_norm == 0  # (c,)
            if bool(zero_rows.any()):
                s[:, zero_rows] = -math.inf  # excluded tokens
                n_seen -= int(zero_rows.sum())
            if dead.numel():
                s[dead] = -math.inf  # dead neurons
        top_v, top_i = _chunk_topk(s, k)  # (n_units, min(k, c)) each
        values, ids = _merge(torch.cat([values, top_v], 1), torch.cat([ids, top_i + lo], 1), k)
    return _to_result(values, ids, k, n_seen)


def score_topk_reference(
    W_E: Tensor, W: Tensor, k: int = 20, *, cosine: bool, scale: Tensor | None = None
) -> TopKResult:
    """Reference for :func:`score_topk`: the full (d_vocab, n_units) score matrix, one stable
    descending ``torch.sort`` per column (rows are in token order: ties go to the smaller id)."""
    dtype = _checked(W_E, W, scale, k, 1)
    x = W_E.detach().to(dtype)  # (d_vocab, d_model)
    x = x if scale is None else x * scale.detach().to(dtype)
    w = W.detach().to(dtype)  # (d_model, n_units)
    s = x @ w  # (d_vocab, n_units)
    excluded = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)  # (d_vocab,)
    if cosine:
        row_norm = torch.linalg.vector_norm(x, dim=1)  # (d_vocab,)
        col_norm = torch.linalg.vector_norm(w, dim=0)  # (n_units,)
        s = s / col_norm / row_norm[:, None]
        excluded = row_norm == 0
        s[excluded] = -math.inf
        s[:, col_norm == 0] = -math.inf
    order = torch.sort(s, dim=0, descending=True, stable=True).indices[:k]  # (min(k, V), n_units)
    n_seen = int((~excluded).sum())
    return _to_result(s.gather(0, order).T, order.T, k, n_seen)


@dataclass(frozen=True)
class GeometryDefinition:
    """One definition of Method 2, for one input branch of the MLP.

    ``tl_cosine``: cosine between ``W_E[t]`` and ``W[:, n]`` under TransformerLens' default
    weight processing (fold_ln, center_writing_weights), the thesis' definition: pass the
    processed model (normalization_type LNPre/RMSPre). ``viewer``: the OpenAI neuron-viewer
    score ``W_E @ diag(ln2.w) @ W[:, n]``, a raw dot product on UNPROCESSED weights that ignores
    LN centring and all biases (for RMSNorm models ln2.w is the RMS weight): pass the
    unprocessed model (harness.subjects.RAW).
    """

    name: GeometryName
    """``"tl_cosine"`` or ``"viewer"``."""
    branch: Branch
    """``"in"`` (plain MLP, W_in); gated MLPs: ``"gate"`` (W_gate) or ``"linear"`` (W_in)."""

    def __post_init__(self) -> None:
        if self.name not in ("tl_cosine", "viewer"):
            raise ValueError(f"unknown geometry {self.name!r}: 'tl_cosine' or 'viewer'")
        if self.branch not in _BRANCH_WEIGHT:
            raise ValueError(f"unknown branch {self.branch!r}: 'in', 'gate' or 'linear'")

    @property
    def cosine(self) -> bool:
        return self.name == "tl_cosine"

    @property
    def label(self) -> str:
        """``name/branch``, for reports."""
        return f"{self.name}/{self.branch}"


def definitions_for(model: Any) -> tuple[GeometryDefinition, ...]:
    """Both definitions x the MLP input branches of a HookedTransformer's architecture."""
    if model.cfg.attn_only:
        raise ValueError("attention-only model: no MLP neurons")
    branches = ("gate", "linear") if model.cfg.gated_mlp else ("in",)
    return tuple(GeometryDefinition(n, b) for n in ("tl_cosine", "viewer") for b in branches)


def _viewer_scale(model: Any, layer: int) -> Tensor | None:
    """ln2.w of an unprocessed model (None when the model has no normalisation)."""
    norm = model.cfg.normalization_type
    if norm in _FOLDED:
        raise ValueError(
            f"viewer geometry needs the UNPROCESSED model: this one has normalization_type "
            f"{norm!r}, i.e. ln2.w was folded into W_in (load with harness.subjects.RAW)"
        )
    from transformer_lens.components.transformer_block import POST_NORM_ARCHITECTURES

    if model.cfg.original_architecture in POST_NORM_ARCHITECTURES:
        raise ValueError("viewer geometry: ln2 follows the MLP in this post-norm architecture")
    return model.blocks[layer].ln2.w if norm in _UNFOLDED else None


def method2_topk(
    model: Any, layer: int, definition: GeometryDefinition, k: int = 20, chunk: int = DEFAULT_CHUNK
) -> TopKResult:
    """Method-2 top-k tokens of every neuron of ``model.blocks[layer].mlp`` (a HookedTransformer)."""
    n_layers = model.cfg.n_layers
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} out of range: the model has layers 0..{n_layers - 1}")
    if definition not in definitions_for(model):
        raise ValueError(f"{definition.label} does not apply: gated_mlp={model.cfg.gated_mlp}")
    norm = model.cfg.normalization_type
    if definition.cosine:
        if norm in _UNFOLDED:
            raise ValueError(
                f"tl_cosine is defined on TransformerLens-processed weights, but ln2 is unfolded "
                f"(normalization_type {norm!r}): load with harness.subjects.DEFAULT_PROCESSING"
            )
        scale = None
    else:
        scale = _viewer_scale(model, layer)
    W = getattr(model.blocks[layer].mlp, _BRANCH_WEIGHT[definition.branch])  # (d_model, d_mlp)
    with torch.no_grad():
        return score_topk(model.W_E, W, k, cosine=definition.cosine, scale=scale, chunk=chunk)
