"""ONE forward pass over the background corpus feeds every corpus-derived artefact of a run.

Family W's harvest (top-k contexts per MLP neuron at every layer) and the SAE training
activations of families S and R used to come from two passes (the harvest's own, and
sae-lens' activation store re-running the model): ~196,608 corpus tokens went through the
model twice, ~6 minutes of a cold run on 2 cores. Here each batch of contexts is run once
with the union of the hooks both need; the harvest state is updated from it and the SAE
hooks' activations (BOS excluded, as the SAEs are trained) are kept in memory for the
trainer (:func:`harness.saes.train.train_from_activations`). Memory: 4 bytes x tokens x the
summed SAE hook widths (SmolLM2 defaults: 196,608 x 3,840 x 4 B = 3.0 GB).

sae-lens can also train from cached activations on disk (``CacheActivationsRunner``), but
that is a second copy through the ``datasets`` format for data that fits in memory, and it
cannot share the forward with the harvest; its trainer (``SAETrainer``) is used as is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from harness.activations.cache import progress
from harness.activations.capture import capture, check_hook_names, first_content_position
from harness.activations.layouts import decode_layouts


@dataclass(frozen=True)
class ActivationRequest:
    """Which activations to keep for SAE training: the first ``n_contexts`` corpus contexts
    at ``hooks``, each context cut to ``context_size`` tokens, position 0 (BOS) dropped when
    ``exclude_bos``."""

    hooks: tuple[str, ...]
    n_contexts: int
    context_size: int
    exclude_bos: bool = True

    @property
    def tokens_per_context(self) -> int:
        return self.context_size - first_content_position(self.exclude_bos)


def contexts_for(n_tokens: int, context_size: int, exclude_bos: bool, available: int) -> int:
    """How many contexts hold ``n_tokens`` training tokens (at most ``available``: a trainer
    then cycles over what there is)."""
    per = context_size - first_content_position(exclude_bos)
    if per < 1:
        raise ValueError(f"context_size {context_size} leaves no token once BOS is dropped")
    if available < 1:
        raise ValueError("the corpus has no context left for SAE training")
    return min(math.ceil(n_tokens / per), available)


def run_pass(
    model: Any, corpus_tokens: torch.Tensor, *, harvester: Any | None = None,
    request: ActivationRequest | None = None, batch_size: int = 16,
) -> dict[str, torch.Tensor]:
    """Run the model once over ``corpus_tokens`` (n_ctx, L): every batch updates ``harvester``
    (an object with ``hooks`` and ``update(start, acts)``, see :class:`harness.activations.harvest.Harvester`)
    and fills the requested SAE activations. Returns {hook: (n_tokens, d)} float32 on the CPU
    (empty when nothing was requested). Only as many contexts as someone needs are run: the
    harvester's ``n_contexts`` (all of ``corpus_tokens`` when it has none) and the request's."""
    if harvester is None and request is None:
        raise ValueError("run_pass needs a harvester or an activation request")
    h_hooks = tuple(harvester.hooks) if harvester is not None else ()
    s_hooks = tuple(request.hooks) if request is not None else ()
    check_hook_names(model, h_hooks + s_hooks)
    n_ctx = corpus_tokens.shape[0]
    if request is not None and request.n_contexts > n_ctx:
        raise ValueError(f"asked for {request.n_contexts} contexts of a {n_ctx}-context corpus")
    h_end = 0
    if harvester is not None:  # a harvest of the corpus's first n contexts (None: all)
        h_end = min(getattr(harvester, "n_contexts", None) or n_ctx, n_ctx)
    end = max(h_end, request.n_contexts if request is not None else 0)
    stored: dict[str, torch.Tensor] = {}
    first = 0
    if request is not None:
        per, first = request.tokens_per_context, first_content_position(request.exclude_bos)
        probe = capture(model, corpus_tokens[:1, :2].to(model.cfg.device), s_hooks)
        stored = {h: torch.empty(request.n_contexts * per, a.shape[-1]) for h, a in probe.items()}
    starts = range(0, end, batch_size)
    desc = " + ".join(x for x in (f"harvest {len(h_hooks)} hooks" if h_hooks else "",
                                  f"SAE activations at {len(s_hooks)} hooks" if s_hooks else "") if x)
    # bit-identical (tests/harness/activations/test_layouts.py); TL copies ~420 MB of
    # SmolLM2's weights per forward call otherwise, ~5 % of a 16 x 128 forward
    with decode_layouts(model):
        for start in progress(starts, desc=f"corpus pass: {desc}", total=len(starts)):
            stop = min(start + batch_size, end)
            want_sae = request is not None and start < request.n_contexts
            want_h = start < h_end
            hooks = list(dict.fromkeys((h_hooks if want_h else ()) + (s_hooks if want_sae else ())))
            tokens = corpus_tokens[start:stop]
            acts = capture(model, tokens.to(model.cfg.device), hooks)
            if want_h:
                n_h = min(stop, h_end) - start
                harvester.update(start, {h: acts[h][:n_h] for h in h_hooks})
            if want_sae:
                n_keep = min(stop, request.n_contexts) - start
                per = request.tokens_per_context
                for h in s_hooks:
                    a = acts[h][:n_keep, first:request.context_size].float().cpu()
                    stored[h][start * per:(start + n_keep) * per] = a.reshape(-1, a.shape[-1])
    for h, a in stored.items():
        if not torch.isfinite(a).all():
            raise ValueError(f"non-finite activations at {h}: refusing to train on them")
    return stored


def union_request(specs: Sequence[Any], available: int) -> ActivationRequest:
    """One request covering SAE specs that share context_size/exclude_bos (the longest
    token budget decides how many contexts are kept)."""
    sizes = {(s.context_size, s.exclude_bos) for s in specs}
    if len(sizes) != 1:
        raise ValueError(f"SAE specs trained from one pass must agree on context_size and "
                         f"exclude_bos; got {sorted(sizes)}")
    (context_size, exclude_bos), = sizes
    n = max(contexts_for(s.training_tokens, context_size, exclude_bos, available) for s in specs)
    return ActivationRequest(tuple(dict.fromkeys(s.hook_name for s in specs)), n, context_size,
                             exclude_bos)
