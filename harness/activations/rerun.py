"""Reading fixed texts: the rerun of family N's protocol, and rereads under clamps.

:func:`rerun` runs prompt + generated tokens once more (right-padded) under each row's rerun
clamp and reads the generated positions; :mod:`harness.activations.generation` calls it after
decoding. :func:`reread` does the same on the texts of a finished run under a list of clamps,
and measures how each one moves the next-token distribution on that same text (claim N3's
clamp-in-rerun-only: the clamp's direct effect, with the text held fixed).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from harness.activations.cache import ContentCache, progress
from harness.activations.capture import HookNameError, check_hook_names, last_layer_needed
from harness.activations.clamp import Clamp, clamp_hooks

if TYPE_CHECKING:
    from harness.activations.generation import GenerationResult

__all__ = ["REREAD", "REREAD_VERSION", "Reread", "at_generated", "reread", "rerun", "right_padded"]

REREAD = "reread"
"""The cache producer of :func:`reread`."""
REREAD_VERSION = "1"


def right_padded(prompts: Sequence[torch.Tensor], new: torch.Tensor, counts: torch.Tensor,
                 pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt + generated tokens, right-padded (pads come after every real token, so causal
    attention never sees them): (seq (b, T), mask (b, T), at (b, N) the generated positions,
    valid (b, N) True where row b generated token j)."""
    b, n, dev = new.shape[0], new.shape[1], new.device
    lengths = torch.tensor([len(p) for p in prompts], device=dev)  # (b,)
    total = lengths + counts  # (b,)
    seq = torch.full((b, int(total.max())), pad, dtype=torch.long, device=dev)  # (b, T)
    for i, p in enumerate(prompts):
        seq[i, : len(p)] = p
        seq[i, len(p): total[i]] = new[i, : counts[i]]
    mask = (torch.arange(seq.shape[1], device=dev)[None] < total[:, None]).long()  # (b, T)
    steps = torch.arange(n, device=dev)[None]  # (1, N)
    valid = steps < counts[:, None]  # (b, N)
    at = (lengths[:, None] + steps).clamp(max=seq.shape[1] - 1)  # (b, N)
    return seq, mask, at, valid


def at_generated(act: torch.Tensor, at: torch.Tensor, valid: torch.Tensor,
                 shift: int = 0) -> torch.Tensor:
    """(b, T, *d) -> (b, N, *d) float32 read at positions ``at - shift``, NaN where not valid
    (shift 1 reads the logits that predicted each generated token)."""
    b, n = at.shape
    out = act[torch.arange(b, device=act.device)[:, None], (at - shift).to(act.device)]
    return out.float().masked_fill(~valid.view(b, n, *[1] * (act.ndim - 2)).to(act.device),
                                   math.nan)


def rerun(model: Any, prompts: list[torch.Tensor], new: torch.Tensor, counts: torch.Tensor,
           pad: int, clamps: Sequence[Clamp | None], hooks: Sequence[str],
           logprobs: bool) -> dict[str, torch.Tensor]:
    """Run prompt + generated once more under each row's rerun clamp, reading the generated
    positions only."""
    seq, mask, at, valid = right_padded(prompts, new, counts, pad)
    got: dict[str, torch.Tensor] = {}

    def keep(act: torch.Tensor, hook: Any) -> None:
        got[hook.name] = at_generated(act, at, valid)

    if not hooks and not logprobs:
        return got
    fwd = clamp_hooks(clamps, "rerun") + [(h, keep) for h in hooks]  # clamp first: read after it
    with model.hooks(fwd_hooks=fwd):
        if logprobs:
            logits = model(seq, attention_mask=mask)  # (b, T, d_vocab)
            # log p(token j | prompt, new[:j]) is read at the position before token j
            got["logprobs"] = at_generated(logits, at, valid, shift=1).log_softmax(-1)
        else:
            model(seq, attention_mask=mask, stop_at_layer=last_layer_needed(model, hooks))
    return got


@dataclass(frozen=True, eq=False)
class Reread:
    """One clamp on a run's fixed texts (CPU tensors, rows follow the run's prompts)."""

    clamp: Clamp | None
    """The rerun's clamp (``where="rerun-only"``), or None: the texts reread unclamped."""
    means: dict[str, torch.Tensor]
    """hook -> (n_prompts, *d) float32 mean over each row's generated positions."""
    kl: torch.Tensor | None
    """(n_prompts, N) float32 KL(p || q) in nats at each generated position j, p the unclamped
    model's next-token distribution given prompt + new[:j], q the clamped one's; NaN past a
    row's end; None unless asked."""


def _means(act: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(b, N, *d) with NaN past the end -> (b, *d) mean over the valid positions."""
    w = valid.view(*valid.shape, *[1] * (act.ndim - 2)).to(act.device)
    return torch.where(w, act, 0.0).sum(1) / w.sum(1)


@torch.no_grad()
def _compute(model: Any, result: GenerationResult, clamps: Sequence[Clamp | None],
             hooks: tuple[str, ...], kl: bool, batch_size: int, pad: int) -> dict[str, torch.Tensor]:
    from harness.activations.generation import GENERATION
    from harness.evidence.stages import stage

    dev = torch.device(model.cfg.device)
    n_prompts = result.new_tokens.shape[0]
    prompts = [result.prompt_tokens[i, : result.prompt_lengths[i]].to(dev) for i in range(n_prompts)]
    new, counts = result.new_tokens.to(dev), result.new_lengths.to(dev)
    parts: dict[str, list[torch.Tensor]] = {}
    starts = range(0, n_prompts, batch_size)
    with stage(GENERATION):
        for s in progress(starts, desc=f"{REREAD}: {len(clamps)} clamps x {n_prompts} texts",
                          total=len(starts)):
            rows = slice(s, s + batch_size)
            chunk, b = prompts[rows], len(prompts[rows])
            valid = right_padded(chunk, new[rows], counts[rows], pad)[3]  # (b, N)
            ref = rerun(model, chunk, new[rows], counts[rows], pad, [None] * b, hooks, kl)
            for k, c in enumerate(clamps):
                got = ref if c is None else rerun(model, chunk, new[rows], counts[rows], pad,
                                                  [c] * b, hooks, kl)
                for h in hooks:
                    parts.setdefault(f"{k}/mean/{h}", []).append(_means(got[h], valid).cpu())
                if kl:  # sum_t p log(p / q); NaN past the end (the readings are NaN there)
                    p, q = ref["logprobs"], got["logprobs"]  # (b, N, d_vocab) each
                    parts.setdefault(f"{k}/kl", []).append((p.exp() * (p - q)).sum(-1).cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def reread(model: Any, result: GenerationResult, clamps: Sequence[Clamp | None], *,
           hooks: Sequence[str] = (), kl: bool = False, batch_size: int = 16,
           cache: ContentCache | None = None, subject: str | None = None) -> list[Reread]:
    """Reread ``result``'s texts (prompt + generated tokens) under each clamp of ``clamps``
    (``where="rerun-only"``; None: unclamped), reading ``hooks`` at the generated positions
    and, if ``kl``, the KL from the unclamped next-token distribution on the same text. One
    :class:`Reread` per clamp, in order. Through ``cache`` when given, keyed by ``subject``
    (the weight identity), the texts' token ids, the clamps, hooks, ``kl`` and batch size."""
    clamps, hooks = tuple(clamps), tuple(dict.fromkeys(hooks))
    if not clamps:
        raise ValueError("no clamps to reread under")
    for k, c in enumerate(clamps):
        if c is not None and c.where != "rerun-only":
            raise ValueError(f"clamp {k}: a reread holds the text fixed and clamps the rerun only: "
                             f"give where='rerun-only', not {c.where!r}")
    if not hooks and not kl:
        raise ValueError("nothing to read: give hooks, kl=True or both")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    try:
        check_hook_names(model, hooks + tuple(c.hook for c in clamps if c is not None))
    except HookNameError as exc:
        raise ValueError(str(exc)) from None
    if cache is not None and not subject:
        raise ValueError("a cached reread needs the subject's identity string (its weight hash)")
    pad = model.tokenizer.pad_token_id if model.tokenizer is not None else None
    pad = 0 if pad is None else pad
    if cache is None:
        t = _compute(model, result, clamps, hooks, kl, batch_size, pad)
    else:
        from importlib.metadata import version

        texts = torch.cat([result.prompt_tokens.flatten(), result.prompt_lengths,
                           result.new_tokens.flatten(), result.new_lengths]).numpy()
        parts = {"subject": subject, "texts": hashlib.sha256(texts.tobytes()).hexdigest(),
                 "shape": list(result.new_tokens.shape), "clamps": list(clamps), "hooks": list(hooks),
                 "kl": kl, "batch_size": batch_size, "pad": pad, "dtype": str(model.cfg.dtype),
                 "device": torch.device(model.cfg.device).type, "torch": torch.__version__,
                 "transformer_lens": version("transformer-lens")}
        t = cache.get_or_compute(REREAD, REREAD_VERSION, parts, lambda: (
            _compute(model, result, clamps, hooks, kl, batch_size, pad), {"hooks": list(hooks)})).tensors
    return [Reread(c, {h: t[f"{k}/mean/{h}"] for h in hooks}, t.get(f"{k}/kl"))
            for k, c in enumerate(clamps)]
