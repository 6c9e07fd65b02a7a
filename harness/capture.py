"""Capture activations at named hooks, leaving no hook behind.

TransformerLens' ``run_with_cache(names_filter=...)`` does the work (it removes its hooks in a
``finally``); this module adds what it lacks: an early, one-line error for a hook name the
model does not have, tokenisation with an explicit real-token mask under right padding, and
``stop_at_layer`` derived from the hooks asked for.
"""

from __future__ import annotations

import difflib
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
    """``stop_at_layer`` for ``run_with_cache``: one past the deepest block named, or None
    when a hook after the blocks (``ln_final``, ``unembed``) is needed."""
    deepest = -1
    for name in names:
        m = re.match(r"blocks\.(\d+)\.", name)
        if m is None:
            if name.startswith(("hook_embed", "hook_pos_embed")):
                continue
            return None
        deepest = max(deepest, int(m.group(1)))
    return deepest + 1 if deepest + 1 < model.cfg.n_layers else None


@dataclass(frozen=True)
class Batch:
    """Right-padded tokens and the mask of real (non-pad) positions."""

    tokens: torch.Tensor  # (batch, pos) int64
    mask: torch.Tensor  # (batch, pos) bool, True at real tokens (BOS included when prepended)
    lengths: torch.Tensor  # (batch,) int64

    @property
    def last_index(self) -> torch.Tensor:  # (batch,) position of each row's last real token
        return self.lengths - 1


def tokenize(model: Any, texts: list[str], *, prepend_bos: bool = True) -> Batch:
    """Right-padded batch; lengths come from tokenising each text alone (pad id may equal a
    real token id, e.g. GPT-2's BOS, so the mask is never inferred from token values)."""
    if not texts:
        raise ValueError("no texts to tokenize")
    rows = [model.to_tokens(t, prepend_bos=prepend_bos, truncate=True)[0] for t in texts]
    lengths = torch.tensor([len(r) for r in rows])
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    tokens = torch.full((len(rows), int(lengths.max())), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    mask = torch.arange(tokens.shape[1])[None, :] < lengths[:, None]
    return Batch(tokens=tokens.to(model.cfg.device), mask=mask, lengths=lengths)


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
