"""Method 2 of claims family W ("weight geometry"): the vocabulary tokens each neuron's input
weights point at. For token t, neuron n and an optional per-channel scale s (d_model,):

    x_t = W_E[t] * s,   dot[t, n] = x_t . W[:, n],   cos[t, n] = dot[t, n] / (||x_t|| ||W[:, n]||)

(cos computed as ``fl(fl(dot / ||x_t||) / ||W[:, n]||)``); each neuron keeps its top-k tokens.
Scores are float32 (float64 inputs stay float64; half inputs are upcast).

Tie rule (:mod:`harness.activations.topk`'s, context = token id, position = 0): value descending, then token
id ascending (``-0.0 == 0.0``). The order is total, so results do not depend on ``chunk``.

Zero-norm policy (cosine only; a dot product is always defined): cosine of a zero vector is
undefined and never made up. A token whose scaled row is zero is excluded (not ranked, not in
``n_seen``); a neuron whose column is zero gets no tokens. Missing tokens are unfilled slots as
in :class:`~harness.activations.topk.TopKResult` (value -inf, context = position = -1). Scores are never
NaN: inputs that are non-finite or large enough to overflow raise ``ValueError``.

Streaming: ``chunk`` vocabulary rows per GEMM, unit-major scores (n_units, chunk); only the few
tokens per unit that can still be in its top-k are kept (block maxima against a running
threshold, no sort of the chunk), and candidates are reduced to the exact top-k by stable sorts
now and then. No (d_vocab, n_units) matrix is held. (Feeding each chunk to
:class:`~harness.activations.topk.StreamingTopK` gives the same answer, checked in the tests, at about 3x the
GEMM: see benchmarks/test_bench_geometry.py.) This is why Method 2 keeps its own top-k beside
the suite's streaming one: the same ranking under the same tie rule, specialised to scores that
a GEMM produces a chunk at a time; :func:`score_topk_reference` is the tests' brute-force check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from harness.activations.topk import TopKResult, TopKSpec

DEFAULT_CHUNK = 16384
"""Vocabulary rows scored per GEMM; the (n_units, chunk) float32 scores take 100 MB at SmolLM2's
d_mlp 1536. Fastest of 2048-16384 in benchmarks/test_bench_geometry.py."""

GeometryName = Literal["tl_cosine", "viewer"]
Branch = Literal["in", "gate", "linear"]
_BLOCK = 64
"""Tokens per block in :func:`_chunk_candidates`."""
_COMPACT_AT = 8
"""Candidates buffered per unit (x k) before compacting them to the top-k: memory O(n_units k)."""

_BRANCH_WEIGHT = {"in": "W_in", "linear": "W_in", "gate": "W_gate"}
_FOLDED, _UNFOLDED = ("LNPre", "RMSPre"), ("LN", "RMS")


def _checked(W_E: Tensor, W: Tensor, scale: Tensor | None, k: int, chunk: int) -> torch.dtype:
    """Validate shapes and values; return the compute dtype (at least float32).

    Entries must be finite and small enough that no score or squared norm can overflow:
    ``d_model * max(max|W_E| max|scale|, max|W|)**2 < 1e37``. Scores are then never inf or NaN.
    """
    if W_E.ndim != 2 or W.ndim != 2 or W_E.shape[1] != W.shape[0]:
        shapes = f"{tuple(W_E.shape)} and {tuple(W.shape)}"
        raise ValueError(f"need W_E (d_vocab, d_model) and W (d_model, n_units), got {shapes}")
    if scale is not None and scale.shape != (W.shape[0],):
        raise ValueError(f"scale must be ({W.shape[0]},), got {tuple(scale.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    TopKSpec(k, W.shape[1])  # validates k and n_units
    big = {}
    for name, t in (("W_E", W_E), ("W", W), ("scale", scale)):
        if t is not None and t.numel():
            lo, hi = torch.aminmax(t.detach())  # one pass; NaN propagates
            big[name] = max(-float(lo), float(hi))
            if not math.isfinite(big[name]):
                raise ValueError(f"{name} has NaN or infinite entries")
    bound = max(big.get("W_E", 0.0) * big.get("scale", 1.0), big.get("W", 0.0))
    if W.shape[0] * bound**2 >= 1e37:
        raise ValueError(f"entries up to {bound:.3g} could overflow the float32 scores")
    return torch.promote_types(torch.promote_types(W_E.dtype, W.dtype), torch.float32)


def _to_result(values: Tensor, ids: Tensor, k: int, n_seen: int) -> TopKResult:
    """Unit-major (n_units, m <= k) -> TopKResult (k, n_units); -inf slots are unfilled."""
    n_units, m = values.shape
    values = torch.cat([values, values.new_full((n_units, k - m), -math.inf)], 1)  # (n_units, k)
    filled = values > -math.inf
    ids = torch.where(filled, torch.cat([ids, ids.new_full((n_units, k - m), -1)], 1), -1)
    position = torch.where(filled, 0, -1)
    return TopKResult(values.T.contiguous(), ids.T.contiguous(), position.T.contiguous(), n_seen)


class _Candidates(NamedTuple):
    """Flat (unit, token, score) triples that may still be in some unit's top-k."""

    unit: Tensor  # (n,) int64
    token: Tensor  # (n,) int64
    score: Tensor  # (n,) score


def _concat(parts: list[_Candidates]) -> _Candidates:
    return _Candidates(*(torch.cat(field) for field in zip(*parts, strict=True)))


def _select(c: _Candidates, n_units: int, k: int) -> tuple[_Candidates, Tensor]:
    """Each unit's first k candidates in the tie-rule order, -inf dropped, sorted by (unit,
    rank); and their ranks.

    Two stable sorts, by score descending then by unit: the token order among equal (unit,
    score) is the buffer's, which is ascending (chunks arrive in order, each in (unit, token)
    order, a compacted prefix holds only earlier tokens and is itself in tie-rule order).
    """
    order = torch.argsort(c.score, descending=True, stable=True)
    order = order[torch.argsort(c.unit[order], stable=True)]  # (n,)
    counts = torch.bincount(c.unit, minlength=n_units)  # (n_units,)
    start = counts.cumsum(0) - counts
    rank = torch.arange(order.numel(), device=order.device) - start[c.unit[order]]  # (n,)
    keep = (rank < k) & (c.score[order] > -math.inf)
    order, rank = order[keep], rank[keep]  # (n_kept,)
    return _Candidates(c.unit[order], c.token[order], c.score[order]), rank


def _threshold(c: _Candidates, n_units: int, k: int) -> Tensor:
    """tau[n] = min score of unit n's k candidates, -inf if it has fewer: a later token t with
    score(t) < tau has k tokens strictly above it, so cannot enter the top-k."""
    tau = torch.full((n_units,), math.inf, dtype=c.score.dtype, device=c.score.device)
    tau.scatter_reduce_(0, c.unit, c.score, "amin")
    full = torch.bincount(c.unit, minlength=n_units) >= k
    return torch.where(full, tau, -math.inf)  # (n_units,)


def _chunk_candidates(score: Tensor, tau: Tensor, k: int) -> tuple[_Candidates, Tensor]:
    """The tokens of a chunk of scores (n_units, c) that can still be in their unit's top-k (a
    superset, in (unit, token) order, local token ids), found without sorting; and the new tau.

    Blocks of ``_BLOCK`` tokens, block maxima bm (n_units, n_blocks). The k-th largest block
    maximum tau_0 has k distinct tokens at or above it, so ``tau' = max(tau, tau_0)`` is a valid
    threshold (:func:`_threshold`): every top-k token has ``score >= tau'`` and only blocks with
    ``bm >= tau'`` are searched. -inf scores (excluded tokens, dead units) never qualify.
    """
    n_units, c = score.shape
    pad = -c % _BLOCK
    blocks = (F.pad(score, (0, pad), value=-math.inf) if pad else score).view(-1, _BLOCK)
    n_blocks = blocks.shape[0] // n_units  # blocks: (n_units * n_blocks, _BLOCK)
    bm = blocks.amax(1).view(n_units, n_blocks)
    if n_blocks >= k:
        tau = torch.maximum(tau, bm.topk(k, dim=1).values[:, -1])
    # score >= floor  <=>  score >= tau and score > -inf
    floor = tau.clamp_min(torch.finfo(score.dtype).min)  # (n_units,)
    flat = (bm >= floor[:, None]).flatten().nonzero().squeeze(1)  # (n_sel,) rows of blocks
    unit = flat // n_blocks  # (n_sel,)
    found = blocks.index_select(0, flat)  # (n_sel, _BLOCK)
    hit = (found >= floor[unit, None]).flatten().nonzero().squeeze(1)  # (n_new,)
    row, col = hit // _BLOCK, hit % _BLOCK
    token = (flat[row] % n_blocks) * _BLOCK + col
    return _Candidates(unit[row], token, found.flatten()[hit]), tau


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
    ``.n_seen`` the tokens ranked. Computed in float32 (float64 inputs stay float64).

    Per chunk: the scores, then the few tokens that can still be in some top-k
    (:func:`_chunk_candidates`, about k per unit and chunk). Candidates are reduced to the
    exact top-k (:func:`_select`) when more than ``_COMPACT_AT * k`` per unit are buffered, and
    at the end.
    """
    dtype = _checked(W_E, W, scale, k, chunk)
    d_vocab, n_units = W_E.shape[0], W.shape[1]
    w_t = W.detach().to(dtype).T.contiguous()  # (n_units, d_model): unit-major scores
    scale = None if scale is None else scale.detach().to(dtype)
    col_norm = torch.linalg.vector_norm(w_t, dim=1) if cosine else None  # (n_units,)
    dead = None if col_norm is None else (col_norm == 0).nonzero().squeeze(1)  # (n_dead,)
    tau = torch.full((n_units,), -math.inf, dtype=dtype, device=w_t.device)
    buffer: list[_Candidates] = []
    n_seen = n_buffered = 0
    for lo in range(0, d_vocab, chunk):
        x = W_E[lo : lo + chunk].detach().to(dtype)  # (c, d_model)
        if scale is not None:
            x = x * scale
        score = w_t @ x.T  # (n_units, c) scores
        n_seen += x.shape[0]
        if col_norm is not None:
            row_norm = torch.linalg.vector_norm(x, dim=1)  # (c,)
            score.div_(row_norm).div_(col_norm[:, None])  # NaN/inf where a norm is 0: excluded
            zero_rows = row_norm == 0  # (c,)
            if bool(zero_rows.any()):
                score[:, zero_rows] = -math.inf
                n_seen -= int(zero_rows.sum())
            if dead.numel():
                score[dead] = -math.inf
        new, tau = _chunk_candidates(score, tau, k)
        buffer.append(new._replace(token=new.token + lo))
        n_buffered += new.unit.numel()
        if n_buffered > _COMPACT_AT * k * n_units:
            kept = _select(_concat(buffer), n_units, k)[0]
            buffer, n_buffered = [kept], kept.unit.numel()
            tau = torch.maximum(tau, _threshold(kept, n_units, k))
    values = torch.full((n_units, k), -math.inf, dtype=dtype, device=w_t.device)
    ids = torch.full((n_units, k), -1, dtype=torch.long, device=w_t.device)
    if buffer:
        kept, rank = _select(_concat(buffer), n_units, k)
        values[kept.unit, rank], ids[kept.unit, rank] = kept.score, kept.token
    return _to_result(values, ids, k, n_seen)


def score_topk_reference(
    W_E: Tensor, W: Tensor, k: int = 20, *, cosine: bool, scale: Tensor | None = None
) -> TopKResult:
    """Reference for :func:`score_topk`: the full (d_vocab, n_units) score matrix, one stable
    descending ``torch.sort`` per column (rows are in token order: ties go to the smaller id).
    Used by the tests only, never by a claim."""
    dtype = _checked(W_E, W, scale, k, 1)
    x = W_E.detach().to(dtype)  # (d_vocab, d_model)
    x = x if scale is None else x * scale.detach().to(dtype)
    w = W.detach().to(dtype)  # (d_model, n_units)
    s = x @ w  # (d_vocab, n_units)
    excluded = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)  # (d_vocab,)
    if cosine:
        row_norm = torch.linalg.vector_norm(x, dim=1)  # (d_vocab,)
        col_norm = torch.linalg.vector_norm(w, dim=0)  # (n_units,)
        s = s / row_norm[:, None] / col_norm
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
    processed model (normalization_type LNPre/RMSPre). TransformerLens 3.9 centres W_in but not
    W_gate, so LN-gated gate cosines use the uncentred column (ranks unaffected: W_E rows are
    centred).

    ``viewer``: the OpenAI neuron-viewer score ``W_E @ diag(ln2.w) @ W[:, n]``, a raw dot
    product on UNPROCESSED weights that ignores LN centring and all biases (for RMSNorm models
    ln2.w is the RMS weight): pass the unprocessed model (harness.models.subjects.RAW).
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
            f"{norm!r}, i.e. ln2.w was folded into W_in (load with harness.models.subjects.RAW)"
        )
    from transformer_lens.components.transformer_block import POST_NORM_ARCHITECTURES

    if model.cfg.original_architecture in POST_NORM_ARCHITECTURES:
        raise ValueError("viewer geometry: ln2 follows the MLP in this post-norm architecture")
    return model.blocks[layer].ln2.w if norm in _UNFOLDED else None


def method2_topk(
    model: Any, layer: int, definition: GeometryDefinition, k: int = 20, chunk: int = DEFAULT_CHUNK
) -> TopKResult:
    """Method-2 top-k tokens of every neuron of ``model.blocks[layer].mlp``, a HookedTransformer."""
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
                f"(normalization_type {norm!r}): load with harness.models.subjects.DEFAULT_PROCESSING"
            )
        scale = None
    else:
        scale = _viewer_scale(model, layer)
    W = getattr(model.blocks[layer].mlp, _BRANCH_WEIGHT[definition.branch])  # (d_model, d_mlp)
    return score_topk(model.W_E, W, k, cosine=definition.cosine, scale=scale, chunk=chunk)


METHOD2_VERSION = "1"


def cached_method2_topk(cache: Any, loaded: Any, layer: int, definition: GeometryDefinition,
                        k: int = 20) -> TopKResult:
    """:func:`method2_topk` of ``loaded.model`` (a LoadedSubject) through the content cache
    (``cache=None``: computed). A layer's scores are a (d_vocab x d_mlp) product, ~1 s per
    layer for SmolLM2, and family W reads every layer on every run; the result is a function of
    the weights alone. Key: the subject's weight identity (weights before processing plus the
    processing options), dtype, device type, layer, definition, k and the torch version."""
    if cache is None:
        return method2_topk(loaded.model, layer, definition, k=k)
    model = loaded.model
    parts = {"weights": loaded.weight_hash, "dtype": str(model.cfg.dtype),
             "device": torch.device(model.cfg.device).type, "layer": layer,
             "definition": [definition.name, definition.branch], "k": k, "torch": torch.__version__}

    def compute() -> tuple[dict[str, Tensor], dict[str, Any]]:
        r = method2_topk(model, layer, definition, k=k)
        return ({"values": r.values.cpu(), "context": r.context.cpu(), "position": r.position.cpu()},
                {"n_seen": int(r.n_seen)})

    entry = cache.get_or_compute("method2", METHOD2_VERSION, parts, compute)
    e = entry.tensors
    return TopKResult(values=e["values"], context=e["context"], position=e["position"],
                      n_seen=int(entry.meta["n_seen"]))
