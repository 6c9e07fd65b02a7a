"""Streaming top-k max-activating contexts and per-unit activation statistics.

For every unit u at one hook (an MLP neuron or an SAE feature), :class:`StreamingTopK` keeps
the k tokens with the largest activation ``a[t, u]`` over a corpus streamed in chunks;
:class:`ContextTopK` is the same merge over one candidate per context (its max over positions).
The suite's one streaming top-k: the harvests, SAE feature usage and the planted controls use
these two. (harness.analyses.geometry's ``score_topk`` ranks a vocabulary's GEMM scores under
the same tie rule with its own candidate thresholding, ~3x faster than feeding StreamingTopK;
its tests check it equals StreamingTopK.) State is
``O(k * n_units)`` whatever the corpus length, and each chunk is merged with torch ops over all
units at once (no per-unit Python loop).

Tie rule. Tokens are ranked by the total order

    s before t  <=>  (a[s, u], -context[s], -position[s]) > (a[t, u], -context[t], -position[t])

compared lexicographically: the larger value wins and, among equal values, the smaller
(context, position) wins (``-0.0 == 0.0``). The order is total, so the top-k of a union is the
top-k of the union of the parts' top-k: any chunking, and any order of the stream, gives results
bit-identical to :func:`brute_force_topk`. Values are ranked in the state dtype; NaN and -inf
(the unfilled-slot marker) raise; context ids must be < 2**31 and positions < 2**32 (they are
packed as one int64 key).

:class:`ActivationStats` keeps per-unit firing frequency, mean, variance, max, min and
histogram-based quantiles with a stated error bound, also in memory independent of corpus length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

_EMPTY = -1
"""Context and position of an unfilled slot (its value is -inf)."""

_PACKABLE = (torch.float32, torch.float16, torch.bfloat16)
"""Dtypes whose values embed exactly in float32, so (value, rank) packs into one int64 key."""


@dataclass(frozen=True)
class TopKSpec:
    """How many contexts to keep, for how many units."""

    k: int
    """Contexts kept per unit."""
    n_units: int
    """Width of the hook: d_mlp for neurons, d_sae for SAE features."""

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.n_units < 1:
            raise ValueError(f"n_units must be >= 1, got {self.n_units}")


@dataclass(frozen=True, eq=False)
class TopKResult:
    """Per-unit top-k, row 0 first in the tie-rule order (value descending).

    Unfilled slots (fewer than k tokens seen) hold value -inf and context = position = -1.
    """

    values: Tensor  # (k, n_units)
    context: Tensor  # (k, n_units) int64
    position: Tensor  # (k, n_units) int64
    n_seen: int
    """Tokens ranked so far (masked-out padding excluded)."""

    @property
    def n_valid(self) -> Tensor:
        """Filled slots per unit, ``min(k, n_seen)``."""
        return (self.context != _EMPTY).sum(dim=0)  # (n_units,)


def _prepare(
    acts: Tensor, context_ids: Tensor, positions: Tensor, mask: Tensor | None, n_units: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Validate a chunk and drop masked rows. Masked rows are never inspected: padding may
    legitimately hold NaN (e.g. attention over an all-masked row)."""
    if acts.ndim != 2 or acts.shape[1] != n_units:
        raise ValueError(f"acts must be (n_tokens, {n_units}), got {tuple(acts.shape)}")
    n = acts.shape[0]
    for name, t in (("context_ids", context_ids), ("positions", positions)):
        if t.shape != (n,):
            raise ValueError(f"{name} must be ({n},), got {tuple(t.shape)}")
    if mask is not None:
        if mask.shape != (n,) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool ({n},) tensor")
        acts, context_ids, positions = acts[mask], context_ids[mask], positions[mask]
    # One reduction finds both: min is NaN if any entry is NaN.
    low = acts.amin() if acts.numel() else acts.new_zeros(())
    if torch.isnan(low):
        raise ValueError("NaN in activations: refusing to rank it (find where it came from)")
    if torch.isneginf(low):
        raise ValueError("-inf in activations: -inf is reserved for unfilled top-k slots")
    context_ids, positions = context_ids.long(), positions.long()
    if len(positions) and not (context_ids.min() >= 0 and context_ids.max() < 2**31):
        raise ValueError("context_ids must be in [0, 2**31) (-1 marks unfilled slots)")
    if len(positions) and not (positions.min() >= 0 and positions.max() < 2**32):
        raise ValueError("positions must be in [0, 2**32) (-1 marks unfilled slots)")
    return acts, context_ids, positions


def _token_key(context: Tensor, position: Tensor) -> Tensor:
    """``context * 2**32 + position``: int64 ordered like (context, position); the unfilled
    slot (-1, -1) maps below every real token."""
    return (context << 32) + position


def _rank_order(values: Tensor, token_key: Tensor) -> Tensor:
    """Per-column permutation along dim 0 into the tie-rule order: two stable sorts, least
    significant key first."""
    order = torch.argsort(token_key, dim=0, stable=True)  # (m, n_units)
    by_value = torch.argsort(values.gather(0, order), dim=0, descending=True, stable=True)
    return order.gather(0, by_value)  # (m, n_units)


def _exact_topk(acts: Tensor, context: Tensor, position: Tensor, kk: int) -> Tensor:
    """Token indices (kk, n_units) of each column's top-kk under the full tie rule.

    Half and single precision: one ``torch.topk`` on the unique int64 key
    ``key = (ord(a) << 32) + (2**32 - 1 - rank(context, position))``, where ``ord`` maps the
    float's sign-magnitude bits to a two's-complement int32 that is monotone in the value
    (``ord(-0.0) = ord(0.0) = 0``); unique keys make topk's own tie handling irrelevant.
    float64 does not fit beside a rank in 64 bits: a stable sort of the rows in
    (context, position) order, by value.
    """
    n = acts.shape[0]
    tokens = torch.argsort(_token_key(context, position), stable=True)  # (n,)
    if acts.dtype in _PACKABLE:
        rank = torch.empty_like(tokens)
        rank[tokens] = torch.arange(n, device=tokens.device)  # (n,)
        bits = acts.float().contiguous().view(torch.int32)  # (n, n_cols)
        ordered = torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)  # (n, n_cols)
        key = (ordered.long() << 32) + (0xFFFFFFFF - rank).unsqueeze(1)  # (n, n_cols)
        return key.topk(kk, dim=0).indices  # (kk, n_cols)
    by_value = torch.argsort(acts[tokens], dim=0, descending=True, stable=True)[:kk]
    return tokens[by_value]  # (kk, n_cols)


def _chunk_topk(acts: Tensor, context: Tensor, position: Tensor, k: int) -> Tensor:
    """Token indices (min(k, n), n_units) of each unit's top-k set in the chunk (any order).

    A plain ``torch.topk`` on the values, whose threshold t_u is the kk-th largest value. If
    ``#{t : a[t, u] >= t_u} == kk`` the set is forced and topk's pick is it; otherwise ties
    straddle the threshold (typical for sparse SAE features at 0) and only those columns are
    redone by :func:`_exact_topk`.
    """
    kk = min(k, acts.shape[0])
    top = acts.topk(kk, dim=0)  # values, indices: (kk, n_units)
    straddled = (acts >= top.values[-1]).sum(dim=0) > kk  # (n_units,)
    idx = top.indices  # (kk, n_units)
    if bool(straddled.any()):
        cols = straddled.nonzero().squeeze(1)  # (n_tied,)
        idx[:, cols] = _exact_topk(acts[:, cols], context, position, kk)
    return idx


class StreamingTopK:
    """Top-k max-activating (context, position) per unit over a stream of chunks.

    Merge per chunk: candidates = current state (k rows) + the chunk's own top-k, then keep
    the first k in the tie-rule order. Memory: ``k * n_units * (itemsize + 16)`` bytes.
    """

    def __init__(
        self, spec: TopKSpec, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> None:
        self.spec = spec
        self.device = torch.device(device)
        self.dtype = dtype
        shape, dev = (spec.k, spec.n_units), self.device
        self.values = torch.full(shape, -math.inf, dtype=dtype, device=dev)  # (k, n_units)
        self.context = torch.full(shape, _EMPTY, dtype=torch.long, device=dev)  # (k, n_units)
        self.position = torch.full(shape, _EMPTY, dtype=torch.long, device=dev)  # (k, n_units)
        self.n_seen = 0

    @property
    def nbytes(self) -> int:
        """Bytes held by the state tensors."""
        return sum(t.numel() * t.element_size() for t in (self.values, self.context, self.position))

    def update(
        self, acts: Tensor, context_ids: Tensor, positions: Tensor, mask: Tensor | None = None
    ) -> None:
        """Merge a flattened chunk: acts (n_tokens, n_units), context_ids and positions
        (n_tokens,), optional bool mask (n_tokens,) of real tokens. Ranking uses values cast
        to the state dtype."""
        dev = self.device
        acts, ctx, pos = _prepare(
            acts.to(dev, self.dtype),
            context_ids.to(dev),
            positions.to(dev),
            None if mask is None else mask.to(dev),
            self.spec.n_units,
        )
        if acts.shape[0] == 0:
            return
        idx = _chunk_topk(acts, ctx, pos, self.spec.k)  # (kk, n_units)
        self._merge(acts.gather(0, idx), ctx[idx], pos[idx])
        self.n_seen += acts.shape[0]

    def _merge(self, values: Tensor, context: Tensor, position: Tensor) -> None:
        """Keep the first k of state + candidates in the tie-rule order; candidates are
        (m, n_units) each (a token's context and position may differ per unit)."""
        values = torch.cat([self.values, values])  # (k + m, n_units)
        context = torch.cat([self.context, context])  # (k + m, n_units)
        position = torch.cat([self.position, position])  # (k + m, n_units)
        keep = _rank_order(values, _token_key(context, position))[: self.spec.k]  # (k, n_units)
        self.values = values.gather(0, keep)
        self.context = context.gather(0, keep)
        self.position = position.gather(0, keep)

    def result(self, strict: bool = False) -> TopKResult:
        """A copy of the state. ``strict=True`` raises if fewer than k tokens were seen."""
        if strict and self.n_seen < self.spec.k:
            raise ValueError(
                f"strict top-{self.spec.k} needs >= {self.spec.k} tokens, saw {self.n_seen}"
            )
        return TopKResult(
            self.values.clone(), self.context.clone(), self.position.clone(), self.n_seen
        )


class ContextTopK(StreamingTopK):
    """Per unit, the k CONTEXTS with the highest max-over-positions activation, each with its
    argmax position (the thesis's and the neuron viewer's top-k: k distinct contexts), as a
    :class:`StreamingTopK` fed one candidate per context and unit: (max value, context,
    argmax position). The merge and the tie rule are StreamingTopK's; contexts are distinct,
    so ties go to the smaller context id (argmax ties within a context: first position, as
    torch.max documents), whatever the order in which contexts arrive."""

    def update(self, acts: Tensor, context_ids: Tensor, mask: Tensor) -> None:  # type: ignore[override]
        """acts (b, L, n_units); context_ids (b,); mask (L,) of positions that may win."""
        if acts.ndim != 3 or acts.shape[2] != self.spec.n_units or mask.shape != (acts.shape[1],):
            raise ValueError(f"need acts (b, L, {self.spec.n_units}) and a mask (L,), got "
                             f"{tuple(acts.shape)} and {tuple(mask.shape)}")
        if acts.shape[0] == 0:
            return
        first = int(mask.to(torch.int8).argmax()) if mask.any() else mask.numel()
        if mask[first:].all():  # the usual case (BOS skipped): a slice, no masked copy
            vals, pos = acts[:, first:].max(dim=1)  # (b, n_units) each; max propagates NaN
            pos = pos + first
        else:
            vals, pos = acts.masked_fill(~mask[None, :, None], -math.inf).max(dim=1)
        if torch.isnan(vals).any():
            raise ValueError("NaN in activations: refusing to rank it")
        dev = self.device
        ctx = context_ids.to(dev).long()[:, None].expand_as(pos)  # (b, n_units)
        self._merge(vals.to(dev, self.dtype), ctx, pos.to(dev))
        self.n_seen += acts.shape[0]


def brute_force_topk(
    acts: Tensor, context_ids: Tensor, positions: Tensor, k: int, mask: Tensor | None = None
) -> TopKResult:
    """Reference: one full lexicographic sort (``numpy.lexsort`` on value desc, context,
    position) of every token for every unit, truncated to k, padded with unfilled slots. Used
    by the tests only (the streaming classes must equal it bit for bit), never by a claim."""
    if acts.ndim != 2:
        raise ValueError(f"acts must be (n_tokens, n_units), got {tuple(acts.shape)}")
    spec = TopKSpec(k, acts.shape[1])
    acts, ctx, pos = _prepare(acts.cpu(), context_ids.cpu(), positions.cpu(), mask, spec.n_units)
    a = acts.double().numpy()  # (n, n_units); exact for every float dtype up to float64
    c = np.broadcast_to(ctx.numpy()[:, None], a.shape)  # (n, n_units)
    p = np.broadcast_to(pos.numpy()[:, None], a.shape)  # (n, n_units)
    order = torch.from_numpy(np.lexsort((p, c, -a), axis=0)[:k].copy())  # (min(k, n), n_units)
    pad = k - order.shape[0]
    full = (pad, spec.n_units)
    return TopKResult(
        torch.cat([acts.gather(0, order), torch.full(full, -math.inf, dtype=acts.dtype)]),
        torch.cat([ctx[order], torch.full(full, _EMPTY)]),
        torch.cat([pos[order], torch.full(full, _EMPTY)]),
        acts.shape[0],
    )


@dataclass(frozen=True)
class QuantileBins:
    """Fixed signed log-spaced histogram bins (DDSketch-style) for approximate quantiles.

    Per sign, bin j covers ``|x|`` in ``[a_j, growth * a_j)`` with ``a_j = min_abs * growth**j``,
    plus one zero bin for ``|x| < min_abs``. A bin is represented by ``2 growth a_j / (1 + growth)``,
    which is within relative error ``alpha = (growth - 1) / (growth + 1)`` of every value in it.
    """

    growth: float = 1.05
    """Ratio of consecutive bin edges (> 1); alpha = 0.0244 at the default."""
    min_abs: float = 1e-3
    """Below this magnitude values share the zero bin (absolute error < min_abs)."""
    max_abs: float = 1e3
    """Above this magnitude values share the outermost bin (no bound; clamped to min/max)."""

    def __post_init__(self) -> None:
        if not self.growth > 1:
            raise ValueError(f"growth must be > 1, got {self.growth}")
        if not 0 < self.min_abs < self.max_abs:
            raise ValueError(f"need 0 < min_abs < max_abs, got {self.min_abs}, {self.max_abs}")

    @property
    def per_sign(self) -> int:
        return math.ceil(math.log(self.max_abs / self.min_abs) / math.log(self.growth))

    @property
    def n_bins(self) -> int:
        return 2 * self.per_sign + 1

    @property
    def rel_error(self) -> float:
        return (self.growth - 1) / (self.growth + 1)

    def index(self, x: Tensor) -> Tensor:
        """Bin of each value (int64, same shape, non-decreasing in x)."""
        b = self.per_sign
        mag = x.abs()
        j = torch.floor(torch.log(mag / self.min_abs) / math.log(self.growth))
        j = j.clamp(0, b - 1).long()
        return torch.where(mag < self.min_abs, b, torch.where(x > 0, b + 1 + j, b - 1 - j))

    def representatives(self) -> Tensor:
        """Value reported for each bin, float64 (n_bins,)."""
        edges = self.min_abs * self.growth ** torch.arange(self.per_sign, dtype=torch.float64)
        rep = 2 * self.growth * edges / (1 + self.growth)  # (per_sign,)
        return torch.cat([-rep.flip(0), torch.zeros(1, dtype=torch.float64), rep])


class ActivationStats:
    """Streaming per-unit statistics in float64, memory independent of corpus length.

    frequency = #{t : a[t, u] > threshold} / n; mean and population variance merged per chunk
    with Chan et al.'s update (M2 += M2_chunk + delta**2 n_a n_b / (n_a + n_b)); exact max/min;
    quantiles from :class:`QuantileBins` histograms.
    """

    def __init__(
        self,
        n_units: int,
        threshold: float = 0.0,
        bins: QuantileBins | None = None,
        device: str | torch.device = "cpu",
        quantiles: bool = True,
    ) -> None:
        TopKSpec(1, n_units)  # validates n_units
        self.n_units, self.threshold = n_units, threshold
        self.track_quantiles = quantiles
        """Histogram binning costs ~30x a matmul of the chunk: off when nobody needs quantiles."""
        self.bins = bins or QuantileBins()
        dev = self.device = torch.device(device)
        f64 = {"dtype": torch.float64, "device": dev}
        self.n_seen = 0
        self.n_active = torch.zeros(n_units, dtype=torch.long, device=dev)  # (n_units,)
        self._mean = torch.zeros(n_units, **f64)  # (n_units,)
        self._m2 = torch.zeros(n_units, **f64)  # (n_units,)
        self._max = torch.full((n_units,), -math.inf, **f64)  # (n_units,)
        self._min = torch.full((n_units,), math.inf, **f64)  # (n_units,)
        self.counts = torch.zeros(n_units, self.bins.n_bins, dtype=torch.long, device=dev)

    def update(self, acts: Tensor, mask: Tensor | None = None) -> None:
        """Add a chunk: acts (n_tokens, n_units), optional bool mask (n_tokens,)."""
        ids = torch.zeros(acts.shape[0] if acts.ndim else 0, dtype=torch.long, device=self.device)
        a, _, _ = _prepare(acts.to(self.device), ids, ids, mask, self.n_units)
        a = a.double()  # (n_tokens, n_units)
        na, nb = self.n_seen, a.shape[0]
        n = na + nb
        if nb == 0:
            return
        mean_b = a.mean(0)  # (n_units,)
        delta = mean_b - self._mean
        self._m2 += ((a - mean_b) ** 2).sum(0) + delta**2 * (na * nb / n)
        self._mean += delta * (nb / n)
        self._max = torch.maximum(self._max, a.amax(0))
        self._min = torch.minimum(self._min, a.amin(0))
        self.n_active += (a > self.threshold).sum(0)
        self.n_seen = n
        if not self.track_quantiles:
            return
        nbins = self.bins.n_bins
        flat = self.bins.index(a) + torch.arange(self.n_units, device=self.device) * nbins
        self.counts += torch.bincount(flat.flatten(), minlength=self.n_units * nbins).view(
            self.n_units, nbins
        )

    def _need_data(self) -> None:
        if self.n_seen == 0:
            raise ValueError("no tokens seen yet")

    def frequency(self) -> Tensor:
        """Fraction of tokens with activation > threshold (n_units,)."""
        self._need_data()
        return self.n_active.double() / self.n_seen

    def mean(self) -> Tensor:
        self._need_data()
        return self._mean.clone()

    def var(self) -> Tensor:
        """Population variance (ddof = 0)."""
        self._need_data()
        return self._m2 / self.n_seen

    def max(self) -> Tensor:
        self._need_data()
        return self._max.clone()

    def min(self) -> Tensor:
        self._need_data()
        return self._min.clone()

    def quantile(self, q: float | Tensor) -> Tensor:
        """Approximate ``torch.quantile(a, q, dim=0, interpolation="lower")``.

        Target: the order statistic x_(r), r = floor(q (n - 1)). Bound: |estimate - x_(r)|
        <= alpha |x_(r)| if min_abs <= |x_(r)| < max_abs, < min_abs if |x_(r)| < min_abs,
        with alpha = bins.rel_error (up to float rounding of the log at bin edges). Estimates
        are clamped to the exact [min, max], which never increases the error.
        Shape (n_units,) for a scalar q, else (n_q, n_units).
        """
        self._need_data()
        if not self.track_quantiles:
            raise ValueError("this ActivationStats was built with quantiles=False")
        qs = torch.as_tensor(q, dtype=torch.float64, device=self.device)
        if bool(((qs < 0) | (qs > 1) | torch.isnan(qs)).any()):
            raise ValueError(f"quantiles must be in [0, 1], got {q}")
        r = torch.floor(qs.reshape(-1) * (self.n_seen - 1)).long()  # (n_q,)
        cum = self.counts.cumsum(1)  # (n_units, n_bins)
        target = (r + 1).expand(self.n_units, -1).contiguous()  # (n_units, n_q)
        which = torch.searchsorted(cum, target)  # (n_units, n_q): first bin with cum >= r + 1
        est = self.bins.representatives().to(self.device)[which]  # (n_units, n_q)
        est = torch.minimum(torch.maximum(est, self._min[:, None]), self._max[:, None]).T
        return est[0] if qs.ndim == 0 else est  # (n_units,) or (n_q, n_units)
