"""Capture activations at named hooks, leaving no hook behind.

TransformerLens' ``run_with_cache(names_filter=...)`` does the work (it removes its hooks in a
``finally``); this module adds what it lacks: an early, one-line error for a hook name the
model does not have, tokenisation with an explicit real-token mask under right padding, and
``stop_at_layer`` derived from the hooks asked for.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch


class HookNameError(KeyError):
    """A hook name the model does not have."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def check_hook_names(model: Any, names: Iterable[str]) -> list[str]:
    names = list(names)
    for name in names:
        if name not in model.hook_dict:
            close = difflib.get_close_matches(name, list(model.hook_dict), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise HookNameError(f"the model has no hook {name!r}{hint}")
    return names


def last_layer_needed(model: Any, names: Iterable[str]) -> int | None:
    """``stop_at_layer`` for ``run_with_cache``: one past the deepest block named (n_layers
    for the last block: TL then skips ln_final and the unembedding, ~20 % of a SmolLM2
    forward), or None when a hook after the blocks (``ln_final``, ``unembed``) is needed."""
    deepest = -1
    for name in names:
        block = block_index(name)
        if block is None:
            if name.startswith(("hook_embed", "hook_pos_embed")):
                continue
            return None
        deepest = max(deepest, block)
    return deepest + 1


def block_index(name: str) -> int | None:
    """L for a hook inside ``blocks.L`` (``blocks.15.mlp.hook_post`` -> 15), None outside."""
    m = re.match(r"blocks\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def first_content_position(has_bos: bool) -> int:
    """The first position of a text's own tokens: 1 when position 0 holds a prepended BOS, else
    0. The suite's one BOS convention: a statistic over a text's tokens (pooling, harvests,
    SAE training and quality, feature usage, specialists' token codes) drops position 0 when a
    BOS was prepended, and only then; SmolLM2's BOS residual norm (~25,000 vs 150-600 elsewhere)
    is an attention sink that would dominate any statistic including it. Every BOS-dropping
    mask or slice in harness/ and claims/ comes from here or :func:`content_positions`."""
    return 1 if has_bos else 0


def content_positions(n_pos: int, has_bos: bool = True, device: Any = None) -> torch.Tensor:
    """(n_pos,) bool, True at the positions of a text's own tokens: every position from
    :func:`first_content_position` on (padding is :class:`Batch`'s ``mask``'s business)."""
    return torch.arange(n_pos, device=device) >= first_content_position(has_bos)


@dataclass(frozen=True)
class Batch:
    """Right-padded tokens and the mask of real (non-pad) positions."""

    tokens: torch.Tensor  # (batch, pos) int64
    mask: torch.Tensor  # (batch, pos) bool, True at real tokens (BOS included when prepended)
    lengths: torch.Tensor  # (batch,) int64
    has_bos: bool = True
    """Whether position 0 of every row is a prepended BOS."""
    truncated: tuple[int, ...] = ()
    """Indices of texts cut to the model's context length (reported, never silent)."""

    @property
    def last_index(self) -> torch.Tensor:  # (batch,) position of each row's last real token
        return self.lengths - 1

    @property
    def content_mask(self) -> torch.Tensor:
        """(batch, pos) bool: ``mask`` without the prepended BOS (:func:`content_positions`):
        the text's own tokens."""
        return self.mask & content_positions(self.mask.shape[1], self.has_bos, self.mask.device)


def tokenize(model: Any, texts: list[str], *, prepend_bos: bool = True) -> Batch:
    """Right-padded batch; lengths come from tokenising each text alone (pad id may equal a
    real token id, e.g. GPT-2's BOS, so the mask is never inferred from token values)."""
    if not texts:
        raise ValueError("no texts to tokenize")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"text {i} is empty or whitespace-only: {t!r}")
    n_ctx = model.cfg.n_ctx
    rows, truncated = [], []
    for i, t in enumerate(texts):
        row = model.to_tokens(t, prepend_bos=prepend_bos, truncate=False)[0]
        if len(row) > n_ctx:  # truncate, and say so: the caller records it in the evidence
            row, truncated = row[:n_ctx], [*truncated, i]
        rows.append(row)
    lengths = torch.tensor([len(r) for r in rows])
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    tokens = torch.full((len(rows), int(lengths.max())), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    mask = torch.arange(tokens.shape[1])[None, :] < lengths[:, None]
    return Batch(tokens=tokens.to(model.cfg.device), mask=mask, lengths=lengths,
                 has_bos=prepend_bos, truncated=tuple(truncated))


@dataclass(frozen=True)
class PoolingPolicy:
    """How per-token activations become one vector per text (recorded with every pooled claim)."""

    mask_padding: bool = True
    """Average over real tokens only. False reproduces the source's bug: pads are averaged in."""
    keep_bos: bool = True
    """Include the BOS position. GPT-2's pad id equals its BOS id, so a mask built from token
    ids silently drops BOS; here it is an explicit choice."""

    @property
    def name(self) -> str:
        return f"{'masked' if self.mask_padding else 'unmasked'}-{'bos' if self.keep_bos else 'nobos'}"

    def to_dict(self) -> dict:
        return {"mask_padding": self.mask_padding, "keep_bos": self.keep_bos, "name": self.name}


POOLING_POLICIES = tuple(PoolingPolicy(m, b) for m in (True, False) for b in (True, False))


def pool(acts: torch.Tensor, batch: Batch, policy: PoolingPolicy) -> torch.Tensor:
    """Mean over positions per text: (batch, pos, d) -> (batch, d).

    masked:   mean over positions p with mask[b, p] (and p > 0 unless keep_bos)
    unmasked: mean over every position 0..P-1 of the padded batch (p > 0 unless keep_bos)
    """
    weights = batch.mask if policy.mask_padding else torch.ones_like(batch.mask)  # (batch, pos)
    # keep_bos=False drops the BOS position (if there is one) by the suite's one convention
    weights = weights & content_positions(weights.shape[1], batch.has_bos and not policy.keep_bos,
                                          weights.device)
    counts = weights.sum(dim=1, keepdim=True)  # (batch, 1)
    if (counts == 0).any():
        empty = torch.nonzero(counts[:, 0] == 0).flatten().tolist()
        raise ValueError(f"texts {empty} have no position left to pool under {policy.name}")
    w = weights.to(acts.device, acts.dtype).unsqueeze(-1)  # (batch, pos, 1)
    return (acts * w).sum(dim=1) / counts.to(acts.device, acts.dtype)  # (batch, d)


@torch.no_grad()
def capture(model: Any, tokens: torch.Tensor, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """{hook name: activation} for exactly ``names``, stopping after the deepest block needed."""
    names = check_hook_names(model, names)
    wanted = set(names)
    _, cache = model.run_with_cache(
        tokens,
        names_filter=lambda n: n in wanted,
        stop_at_layer=last_layer_needed(model, names),
        return_type=None,
    )
    return {n: cache[n] for n in names}


ACTIVATIONS_VERSION = "1"


def cached_capture(cache: Any, loaded: Any, tokens: torch.Tensor, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """:func:`capture` through the content cache (``cache``: a harness.activations.cache.ContentCache;
    ``loaded``: a LoadedSubject). The key is the subject's weight identity, the exact token
    ids, the hooks, dtype, device type and the torch / transformer-lens versions, so a warm run
    of the same claims on the same texts reads the activations instead of running the model
    (family S's 168 padded texts: ~60 s on 2 cores) and anything else recomputes them."""
    from importlib.metadata import version

    import numpy as np

    model = loaded.model
    names = check_hook_names(model, names)
    ids = tokens.detach().cpu().numpy().astype(np.int64)
    parts = {"weights": loaded.weight_hash, "tokens": hashlib.sha256(ids.tobytes()).hexdigest(),
             "shape": list(ids.shape), "hooks": list(names), "dtype": str(model.cfg.dtype),
             "device": torch.device(model.cfg.device).type, "torch": torch.__version__,
             "transformer_lens": version("transformer-lens")}

    def compute() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        acts = capture(model, tokens, names)
        return {n: a.detach().cpu() for n, a in acts.items()}, {"hooks": list(names)}

    entry = cache.get_or_compute("activations", ACTIVATIONS_VERSION, parts, compute)
    return {n: entry.tensors[n].to(model.cfg.device) for n in names}
