"""Feature usage of an SAE over a token corpus (family R: R3, R4) and token-level views of
single features (family S: S5).

Definitions, per feature f, over the kept tokens t = (context, position) of the corpus
(every position but 0 when ``skip_bos``), with c[t, f] = ``sae.encode`` of the hook's
activation at t:

- f fires on t  <=>  c[t, f] > 0;  fire_count[f] = #{t : c[t, f] > 0}
- frequency[f] = fire_count[f] / n_tokens;  f is dead  <=>  fire_count[f] == 0
- top tokens: the ``n_top`` tokens with the largest c[t, f] among those where f fires, in the
  suite's tie rule (:mod:`harness.activations.topk`: larger value first, then smaller (context, position));
  fewer than ``n_top`` when f fired fewer times
- random firings: a uniform sample without replacement of ``n_random`` of f's firings, by
  priority sampling: every kept token t gets one key u(t) ~ U[0, 1) (shared by all features;
  so two features that fire on the same tokens get the same sample), and f keeps the
  ``n_random`` firings with the largest keys (ties in the same tie rule). u is drawn per
  context, in context order: ``torch.rand(ctx_len, generator=g)`` for context 0, 1, ...,
  with ``g = torch.Generator().manual_seed(seed)``, so the sample is the same for any
  ``batch_size``.

Token concentration of a set of token ids (a feature's top tokens or its random firings):
share of the valid ids equal to the most common one; distinct share = number of distinct
ids / number of valid ids.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from harness.activations.cache import ContentCache, progress
from harness.activations.capture import capture, check_hook_names, first_content_position
from harness.activations.layouts import decode_layouts
from harness.activations.topk import StreamingTopK, TopKSpec
from harness.data.corpus import Corpus
from harness.evidence.figures import pyplot
from harness.models.loaders import weights_hash

FEATURE_USAGE_VERSION = "1"
_EMPTY = -1
"""Token id, context and position of an unfilled slot."""
_MAX_CHUNK = 2**24
"""Rows per update: the negative placeholders -(row + 1) are exact in float32 up to 2**24."""


# --- usage -----------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class FeatureUsage:
    """Per-feature usage statistics of one SAE over a corpus (definitions: module docstring).

    Unfilled top/random slots hold token = context = position = -1 (top value -inf); slot 0
    is the largest value (top) or the largest key (random).
    """

    hook_name: str
    n_tokens: int
    """Kept tokens seen (position 0 excluded when ``skip_bos``)."""
    fire_count: np.ndarray  # (d_sae,) int64, #{t : code > 0}
    code_sum: np.ndarray  # (d_sae,) float64, sum of codes over the kept tokens
    max: np.ndarray  # (d_sae,) float32, max code over the kept tokens
    top_values: np.ndarray  # (n_top, d_sae) float32
    top_context: np.ndarray  # (n_top, d_sae) int64
    top_position: np.ndarray  # (n_top, d_sae) int64
    top_tokens: np.ndarray  # (n_top, d_sae) int64 token ids
    random_context: np.ndarray  # (n_random, d_sae) int64
    random_position: np.ndarray  # (n_random, d_sae) int64
    random_tokens: np.ndarray  # (n_random, d_sae) int64 token ids
    skip_bos: bool = True
    seed: int = 0

    @property
    def d_sae(self) -> int:
        return int(self.fire_count.shape[0])

    @property
    def frequency(self) -> np.ndarray:
        """fire_count / n_tokens (d_sae,)."""
        return self.fire_count / self.n_tokens

    @property
    def dead(self) -> np.ndarray:
        """Features that never fired on the corpus (d_sae,) bool."""
        return self.fire_count == 0

    @property
    def mean(self) -> np.ndarray:
        """Mean code over all kept tokens (d_sae,)."""
        return self.code_sum / self.n_tokens

    @property
    def mean_when_firing(self) -> np.ndarray:
        """Mean code over the tokens where the feature fires; NaN for dead features."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.dead, np.nan, self.code_sum / np.maximum(self.fire_count, 1))

    def to_tensors(self) -> dict[str, Tensor]:
        """The arrays as tensors (the cache's format)."""
        names = ("fire_count", "code_sum", "max", "top_values", "top_context", "top_position",
                 "top_tokens", "random_context", "random_position", "random_tokens")
        return {n: torch.from_numpy(np.ascontiguousarray(getattr(self, n))) for n in names}

    def meta(self) -> dict[str, Any]:
        return {"hook_name": self.hook_name, "n_tokens": self.n_tokens,
                "skip_bos": self.skip_bos, "seed": self.seed}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> FeatureUsage:
        arrays = {n: t.numpy() for n, t in tensors.items()}
        return cls(**arrays, hook_name=meta["hook_name"], n_tokens=int(meta["n_tokens"]),
                   skip_bos=bool(meta["skip_bos"]), seed=int(meta["seed"]))


class FeatureUsageAccumulator:
    """Streams codes (b, ctx_len, d_sae) of consecutive contexts into the per-feature state.

    State: O((n_top + n_random) * d_sae), independent of the corpus length. Contexts are
    numbered 0, 1, ... in the order they arrive (the key draw depends on that order only).
    """

    def __init__(self, d_sae: int, ctx_len: int, *, n_top: int = 20, n_random: int = 20,
                 skip_bos: bool = True, seed: int = 0) -> None:
        self.top = StreamingTopK(TopKSpec(n_top, d_sae))  # validates n_top, d_sae
        self.random = StreamingTopK(TopKSpec(n_random, d_sae))
        first = first_content_position(skip_bos)
        if ctx_len <= first:
            raise ValueError(f"ctx_len must be > {first} (skip_bos={skip_bos}), got {ctx_len}")
        self.d_sae, self.ctx_len, self.first = d_sae, ctx_len, first
        self.skip_bos, self.seed = skip_bos, seed
        self.generator = torch.Generator().manual_seed(seed)
        self.n_contexts = 0
        self.n_tokens = 0
        self.fire_count = torch.zeros(d_sae, dtype=torch.long)  # (d_sae,)
        self.code_sum = torch.zeros(d_sae, dtype=torch.float64)  # (d_sae,)
        self.max = torch.full((d_sae,), -math.inf)  # (d_sae,)

    def update(self, codes: Tensor) -> None:
        """Add the next contexts' codes, (b, ctx_len, d_sae), position 0 included."""
        if codes.ndim != 3 or codes.shape[1:] != (self.ctx_len, self.d_sae):
            raise ValueError(f"codes must be (b, {self.ctx_len}, {self.d_sae}), "
                             f"got {tuple(codes.shape)}")
        b = codes.shape[0]
        keys = torch.stack([torch.rand(self.ctx_len, generator=self.generator)
                            for _ in range(b)]) if b else torch.empty(0, self.ctx_len)  # (b, L)
        kept = self.ctx_len - self.first
        n = b * kept
        if n == 0:
            return
        if n > _MAX_CHUNK:
            raise ValueError(f"at most {_MAX_CHUNK} kept tokens per update, got {n}")
        flat = codes[:, self.first:].detach().to("cpu", torch.float32).reshape(n, self.d_sae)
        if torch.isnan(flat).any():
            raise ValueError("NaN in SAE codes")
        ctx = torch.arange(self.n_contexts, self.n_contexts + b).repeat_interleave(kept)  # (n,)
        pos = torch.arange(self.first, self.ctx_len).repeat(b)  # (n,)
        fires = flat > 0  # (n, d_sae)
        self.fire_count += fires.sum(0)
        self.code_sum += flat.double().sum(0)
        self.max = torch.maximum(self.max, flat.amax(0))
        # Non-firing entries get distinct negative placeholders below every firing value (or
        # key): the chunk's top-k then needs no tie-break among them, and a slot still holding
        # one at the end is reported unfilled. Firing entries rank exactly as they would alone.
        placeholder = -torch.arange(1, n + 1, dtype=torch.float32)[:, None]  # (n, 1)
        self.top.update(torch.where(fires, flat, placeholder), ctx, pos)
        key = keys[:, self.first:].reshape(n, 1)  # (n, 1), in [0, 1)
        self.random.update(torch.where(fires, key, placeholder), ctx, pos)
        self.n_contexts += b
        self.n_tokens += n

    def result(self, tokens: Tensor, hook_name: str) -> FeatureUsage:
        """The usage so far; ``tokens`` (n_contexts, ctx_len) maps slots to token ids."""
        if self.n_tokens == 0:
            raise ValueError("no tokens seen yet")
        if tokens.shape != (self.n_contexts, self.ctx_len):
            raise ValueError(f"tokens must be ({self.n_contexts}, {self.ctx_len}), "
                             f"got {tuple(tokens.shape)}")
        top, rnd = self.top.result(), self.random.result()
        top_fill = top.values > 0  # (n_top, d_sae): placeholders are negative
        rnd_fill = rnd.values >= 0  # (n_random, d_sae): keys are in [0, 1)
        top_ctx, top_pos = _blank(top.context, top_fill), _blank(top.position, top_fill)
        rnd_ctx, rnd_pos = _blank(rnd.context, rnd_fill), _blank(rnd.position, rnd_fill)
        return FeatureUsage(
            hook_name=hook_name,
            n_tokens=self.n_tokens,
            fire_count=self.fire_count.numpy().copy(),
            code_sum=self.code_sum.numpy().copy(),
            max=self.max.numpy().copy(),
            top_values=torch.where(top_fill, top.values, -math.inf).numpy(),
            top_context=top_ctx.numpy(),
            top_position=top_pos.numpy(),
            top_tokens=_token_ids(tokens, top_ctx, top_pos).numpy(),
            random_context=rnd_ctx.numpy(),
            random_position=rnd_pos.numpy(),
            random_tokens=_token_ids(tokens, rnd_ctx, rnd_pos).numpy(),
            skip_bos=self.skip_bos,
            seed=self.seed,
        )


def _blank(t: Tensor, filled: Tensor) -> Tensor:
    return torch.where(filled, t, torch.full_like(t, _EMPTY))


def _token_ids(tokens: Tensor, ctx: Tensor, pos: Tensor) -> Tensor:
    """Token id at each (context, position), -1 where the slot is unfilled."""
    out = torch.full_like(ctx, _EMPTY)  # (k, d_sae)
    valid = ctx >= 0
    out[valid] = tokens.cpu().long()[ctx[valid], pos[valid]]
    return out


def _check_tokens(tokens: Tensor) -> None:
    if not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.dtype != torch.long:
        raise ValueError("tokens must be an int64 (n_contexts, ctx_len) tensor, got "
                         f"{getattr(tokens, 'dtype', type(tokens))} {tuple(getattr(tokens, 'shape', ()))}")
    if tokens.shape[0] == 0:
        raise ValueError("tokens has no contexts")


def _hook_of(sae: Any) -> str:
    hook = getattr(getattr(sae.cfg, "metadata", None), "hook_name", None)
    if not hook:
        raise ValueError("the SAE's cfg.metadata names no hook_name")
    return hook


@torch.no_grad()
def sae_feature_usage(
    loaded: Any,
    sae: Any,
    tokens: Tensor,
    *,
    n_top: int = 20,
    n_random: int = 20,
    skip_bos: bool = True,
    batch_size: int = 8,
    seed: int = 0,
) -> FeatureUsage:
    """Usage of every feature of ``sae`` (a sae-lens SAE) at its hook over ``tokens``
    ((n_contexts, ctx_len) int64, BOS at position 0), for the subject ``loaded``.

    One forward pass per batch of ``batch_size`` contexts, stopped after the hook's block;
    every kept token is encoded and streamed into :class:`FeatureUsageAccumulator`.
    Definitions in the module docstring; codes are ranked in float32.
    """
    _check_tokens(tokens)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model, hook = loaded.model, _hook_of(sae)
    check_hook_names(model, [hook])
    d_sae, d_in = int(sae.cfg.d_sae), int(sae.cfg.d_in)
    n_ctx, length = tokens.shape
    acc = FeatureUsageAccumulator(d_sae, length, n_top=n_top, n_random=n_random,
                                  skip_bos=skip_bos, seed=seed)
    w = sae.W_enc
    starts = range(0, n_ctx, batch_size)
    with decode_layouts(model):  # bit-identical, without TL's per-call weight copies
        for start in progress(starts, desc=f"feature usage {hook}", total=len(starts)):
            batch = tokens[start:start + batch_size]  # (b, L)
            acts = capture(model, batch.to(model.cfg.device), [hook])[hook]  # (b, L, d_in)
            if acts.shape[-1] != d_in:
                raise ValueError(f"the SAE reads d_in = {d_in} but {hook} is {acts.shape[-1]} wide")
            acc.update(sae.encode(acts.to(w.device, w.dtype)))  # codes (b, L, d_sae)
    return acc.result(tokens, hook)


def _sae_config(sae: Any) -> dict[str, Any]:
    """The SAE's config as plain JSON (device dropped: it does not change the codes)."""
    cfg = {k: v for k, v in sae.cfg.to_dict().items() if k != "device"}
    return json.loads(json.dumps(cfg, default=str, sort_keys=True))


def cached_feature_usage(
    cache: ContentCache | None,
    loaded: Any,
    sae: Any,
    tokens: Tensor | Corpus,
    *,
    n_top: int = 20,
    n_random: int = 20,
    skip_bos: bool = True,
    batch_size: int = 8,
    seed: int = 0,
) -> FeatureUsage:
    """:func:`sae_feature_usage` through the cache (``cache=None``: computed fresh).

    Key: the subject's weight hash, dtype and device type; the SAE's weights hash and config
    (hook, architecture, k, ...); the sha256 of the token bytes (equal to ``Corpus.sha256``);
    ``n_top``, ``n_random``, ``skip_bos`` and ``seed``. ``batch_size`` is not in the key: the
    result does not depend on it (tested).
    """
    toks = tokens.tokens if isinstance(tokens, Corpus) else tokens
    _check_tokens(toks)

    def fresh() -> FeatureUsage:
        return sae_feature_usage(loaded, sae, toks, n_top=n_top, n_random=n_random,
                                 skip_bos=skip_bos, batch_size=batch_size, seed=seed)

    if cache is None:
        return fresh()
    parts = _usage_parts(loaded, sae, toks, n_top, n_random, skip_bos, seed)

    def compute() -> tuple[dict[str, Tensor], dict[str, Any]]:
        usage = fresh()
        return usage.to_tensors(), usage.meta()

    entry = cache.get_or_compute("feature_usage", FEATURE_USAGE_VERSION, parts, compute)
    return FeatureUsage.from_tensors(entry.tensors, entry.meta)


R_USAGE_CONTEXTS = 512
"""Family R's usage window: the first 512 corpus contexts (512 x 127 = 65,024 tokens, ~21
firings per feature at the 2.1 % TopK mean)."""
R_USAGE_TOP = 20
"""Selectivity from the 20 top-activating tokens (the W family's top-20 convention)."""


def _usage_parts(loaded: Any, sae: Any, toks: Tensor, n_top: int, n_random: int,
                 skip_bos: bool, seed: int) -> dict[str, Any]:
    model = loaded.model
    return {"weights": loaded.weight_hash, "dtype": str(model.cfg.dtype),
            "device": torch.device(model.cfg.device).type,
            "sae_weights": weights_hash(sae), "sae_config": _sae_config(sae),
            "tokens": hashlib.sha256(toks.cpu().numpy().tobytes()).hexdigest(),
            "n_top": n_top, "n_random": n_random, "skip_bos": skip_bos, "seed": seed}


@torch.no_grad()
def usage_from_activations(sae: Any, acts: Tensor, tokens: Tensor, *, n_top: int = 20,
                           n_random: int = 20, seed: int = 0, batch_size: int = 8) -> FeatureUsage:
    """:func:`sae_feature_usage` from activations already computed by the shared corpus pass
    (:mod:`harness.activations.corpus_pass`): ``acts`` (n_contexts x (ctx_len - 1), d_in) are the hook's
    activations of ``tokens`` (n_contexts, ctx_len) with BOS dropped, context after context.
    The BOS slot gets zero codes and is skipped as in :func:`sae_feature_usage`; equal to it
    up to the float bits of a forward run at another batch size."""
    _check_tokens(tokens)
    n_ctx, length = tokens.shape
    per = length - first_content_position(True)  # the pass stored positions 1.. of each context
    if acts.shape[0] < n_ctx * per:
        raise ValueError(f"{acts.shape[0]} activation rows cannot cover {n_ctx} contexts of {per}")
    w = sae.W_enc
    acc = FeatureUsageAccumulator(int(sae.cfg.d_sae), length, n_top=n_top, n_random=n_random,
                                  skip_bos=True, seed=seed)
    for start in range(0, n_ctx, batch_size):
        b = min(batch_size, n_ctx - start)
        a = acts[start * per:(start + b) * per].reshape(b, per, -1).to(w.device, w.dtype)
        codes = sae.encode(a)  # (b, per, d_sae)
        acc.update(torch.cat([torch.zeros_like(codes[:, :1]), codes], dim=1))
    return acc.result(tokens, _hook_of(sae))


def store_usage(cache: ContentCache, loaded: Any, sae: Any, tokens: Tensor, usage: FeatureUsage,
                *, n_top: int = 20, n_random: int = 20, seed: int = 0) -> None:
    """Put a usage computed from the shared pass under :func:`cached_feature_usage`'s key."""
    from harness.activations.cache import cache_key

    parts = _usage_parts(loaded, sae, tokens, n_top, n_random, True, seed)
    cache.put("feature_usage", cache_key("feature_usage", FEATURE_USAGE_VERSION, **parts),
              usage.to_tensors(), usage.meta(), version=FEATURE_USAGE_VERSION, parts=parts)


# --- concentration ---------------------------------------------------------------------------


def _runs(token_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per column of an (n, d) id array (-1 = missing): (n_valid, mode count, n_distinct)."""
    ids = np.asarray(token_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"token_ids must be a 2-D integer array (n, d), got {ids.dtype} {ids.shape}")
    if ids.size and ids.min() < _EMPTY:
        raise ValueError("token ids must be >= 0, or -1 for a missing entry")
    n = ids.shape[0]
    s = np.sort(ids, axis=0)  # (n, d): missing entries first
    valid = s >= 0  # (n, d)
    start = np.ones_like(valid)  # (n, d): first entry of a run of equal ids
    start[1:] = s[1:] != s[:-1]
    idx = np.arange(n)[:, None]  # (n, 1)
    first = np.maximum.accumulate(np.where(start, idx, 0), axis=0)  # (n, d) start of own run
    run_len = np.where(valid, idx - first + 1, 0)  # (n, d) length of the run so far
    mode = run_len.max(axis=0) if n else np.zeros(ids.shape[1], dtype=np.int64)
    return valid.sum(axis=0), mode, (start & valid).sum(axis=0)


def token_concentration(token_ids: np.ndarray, min_valid: int = 5) -> np.ndarray:
    """Per column of ``token_ids`` (n, d_sae), -1 = missing: (count of the most common valid
    id) / (number of valid ids); NaN where fewer than ``min_valid`` ids are valid.

    The statistic falls with the number of valid ids for a fixed token distribution (1/n_valid
    at least), so compare features at equal n_valid.
    """
    if min_valid < 1:
        raise ValueError(f"min_valid must be >= 1, got {min_valid}")
    n_valid, mode, _ = _runs(token_ids)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_valid >= min_valid, mode / np.maximum(n_valid, 1), np.nan)


def distinct_share(token_ids: np.ndarray, min_valid: int = 5) -> np.ndarray:
    """Per column: (number of distinct valid ids) / (number of valid ids); NaN where fewer
    than ``min_valid`` ids are valid. 1 = no token repeats; 1/n_valid = one token only."""
    if min_valid < 1:
        raise ValueError(f"min_valid must be >= 1, got {min_valid}")
    n_valid, _, distinct = _runs(token_ids)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_valid >= min_valid, distinct / np.maximum(n_valid, 1), np.nan)


# --- figures ---------------------------------------------------------------------------------


def frequency_histogram_figure(usage: FeatureUsage, title: str) -> Any:
    """Histogram of log10 firing frequency of the features that fired, the dead count written
    in, and a vertical line at the mean of the plotted log10 frequencies. The caller saves it
    (``evidence.figure``) and closes it (``pyplot().close(fig)``)."""
    plt = pyplot()
    freq = usage.frequency
    alive = freq[freq > 0]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    if alive.size:
        logf = np.log10(alive)
        ax.hist(logf, bins=int(np.clip(np.sqrt(alive.size), 10, 60)), color="tab:blue", alpha=0.8)
        m = float(logf.mean())
        ax.axvline(m, color="black", linestyle="--",
                   label=f"mean log10 f = {m:.2f} (f = {10**m:.2g})")
        ax.legend(loc="upper left", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no feature fired", ha="center", va="center", transform=ax.transAxes)
    ax.text(0.98, 0.95, f"dead (never fired): {int(usage.dead.sum())} of {usage.d_sae}\n"
            f"{usage.n_tokens} tokens", ha="right", va="top", transform=ax.transAxes, fontsize=8)
    ax.set_xlabel("log10 firing frequency (share of tokens with code > 0)")
    ax.set_ylabel("features")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def concentration_vs_frequency_figure(
    freq: np.ndarray, conc_top: np.ndarray, conc_random: np.ndarray,
    title: str = "token concentration vs firing frequency",
) -> Any:
    """Scatter of token concentration (top tokens and random firings) against firing
    frequency on a log axis; features with frequency 0 or NaN concentration are left out."""
    freq, conc_top, conc_random = (np.asarray(a, dtype=np.float64) for a in (freq, conc_top, conc_random))
    if not freq.shape == conc_top.shape == conc_random.shape or freq.ndim != 1:
        raise ValueError("freq, conc_top and conc_random must be 1-D arrays of one length")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for conc, label, color in ((conc_top, "top activations", "tab:red"),
                               (conc_random, "random firings", "tab:blue")):
        ok = (freq > 0) & np.isfinite(conc)
        ax.scatter(freq[ok], conc[ok], s=6, alpha=0.4, color=color, label=f"{label} (n={ok.sum()})")
    ax.set_xscale("log")
    ax.set_xlabel("firing frequency (share of tokens with code > 0)")
    ax.set_ylabel("share of the most common token")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


# --- token-level HTML ------------------------------------------------------------------------

_WS_GLYPH = {" ": "\u00b7", "\n": "\u21b5", "\t": "\u21e5", "\r": "\u240d"}
"""Visible stand-ins for whitespace: middle dot, return arrow, tab arrow, CR symbol."""
_WS_RE = re.compile(r"(\s)")
_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.2em; }
.caption, .scale { color: #555; font-size: 0.9em; max-width: 60em; }
table { border-collapse: collapse; }
th { text-align: right; vertical-align: top; padding: 4px 8px; font-weight: normal;
     color: #555; white-space: nowrap; font-size: 0.85em; }
td { padding: 4px 0; }
.t { font-family: ui-monospace, monospace; white-space: pre; display: inline-block;
     border: 1px solid #e4e4e4; border-radius: 2px; margin: 0 1px 2px 0; padding: 0 1px;
     min-width: 0.4em; }
.ws { color: #999; }
"""


def _token_span(token: str, value: float, scale: float) -> str:
    alpha = min(max(value / scale, 0.0), 1.0) if scale > 0 else 0.0
    text = "".join(
        f'<span class="ws">{_WS_GLYPH.get(piece, chr(0xB7))}</span>'
        if _WS_RE.fullmatch(piece) else html.escape(piece)
        for piece in _WS_RE.split(token) if piece
    )
    tip = html.escape(f"{token!r}: {value:.4g}", quote=True)
    return f'<span class="t" style="background: rgba(255, 128, 0, {alpha:.3f})" title="{tip}">{text}</span>'


def token_html(rows: list[tuple[str, list[str], list[float]]], title: str, caption: str) -> str:
    """A self-contained HTML page (inline CSS, no scripts) with one line per row of
    ``(label, token strings, values)``: each token's background is orange with opacity
    value / (max value over all rows), clipped to [0, 1] (white where the max is <= 0), its
    value in the tooltip, whitespace shown as grey glyphs (space as a middle dot). Every
    string is HTML-escaped."""
    values_all: list[float] = []
    for i, (label, toks, vals) in enumerate(rows):
        if len(toks) != len(vals):
            raise ValueError(f"row {i} ({label!r}): {len(toks)} tokens but {len(vals)} values")
        vals = [float(v) for v in vals]
        if not all(math.isfinite(v) for v in vals):
            raise ValueError(f"row {i} ({label!r}): non-finite value")
        values_all += vals
    scale = max(values_all, default=0.0)
    body = []
    for label, toks, vals in rows:
        spans = "".join(_token_span(str(t), float(v), scale) for t, v in zip(toks, vals, strict=True))
        body.append(f"<tr><th>{html.escape(str(label))}</th><td>{spans}</td></tr>")
    table = f"<table>\n{chr(10).join(body)}\n</table>" if body else "<p>(no rows)</p>"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n<p class=\"caption\">{html.escape(caption)}</p>\n"
        f"<p class=\"scale\">Background opacity = value / {scale:.4g} (the largest value shown); "
        "hover a token for its value.</p>\n"
        f"{table}\n</body>\n</html>\n"
    )
