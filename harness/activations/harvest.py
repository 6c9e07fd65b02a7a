"""Harvest over the background corpus: streaming top-k contexts and activation statistics for
every unit at the requested hooks, in one pass that stops after the deepest block needed,
cached by everything the result depends on."""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from typing import Any

import torch

from harness.activations.cache import ContentCache
from harness.activations.capture import capture, check_hook_names, content_positions
from harness.activations.topk import (
    ActivationStats,
    ContextTopK,
    StreamingTopK,
    TopKResult,
    TopKSpec,
)
from harness.data.corpus import Corpus, CorpusRecipe, build_corpus, tokenizer_hash

CORPUS_VERSION = "1"
HARVEST_VERSION = "3"
QUANTILES = (0.5, 0.9, 0.99, 0.999)


def cached_corpus(cache: ContentCache, tokenizer: Any, recipe: CorpusRecipe) -> Corpus:
    """build_corpus through the cache (tokenizing the sources takes ~15 s)."""
    tok_hash = tokenizer_hash(tokenizer)
    parts = {"recipe": recipe, "tokenizer": tok_hash, "python": sys.version.split()[0]}

    def compute():
        c = build_corpus(tokenizer, recipe)
        return {"tokens": c.tokens, "source_of": c.source_of}, {"tokens_sha256": c.sha256}

    entry = cache.get_or_compute("corpus", CORPUS_VERSION, parts, compute)
    tokens = entry.tensors["tokens"]
    digest = hashlib.sha256(tokens.numpy().tobytes()).hexdigest()
    if digest != entry.meta["tokens_sha256"]:  # the cache verifies bytes; this verifies meaning
        raise RuntimeError(f"cached corpus {entry.path} does not match its recorded hash")
    return Corpus(tokens=tokens, source_of=entry.tensors["source_of"], recipe=recipe,
                  sha256=digest, tokenizer_sha256=tok_hash)


@dataclass(frozen=True)
class HarvestSpec:
    """What to harvest."""

    hooks: tuple[str, ...]
    """Hook names (e.g. ``blocks.3.mlp.hook_post``)."""
    k: int = 20
    """Top contexts kept per unit."""
    batch_size: int = 16
    """Contexts per forward pass."""
    threshold: float = 0.0
    """A unit 'fires' on a token when its activation exceeds this (frequency)."""
    skip_bos: bool = True
    """Exclude position 0 (BOS): attention-sink activations there would fill every top-k."""
    stats: bool = True
    """Per-unit frequency, mean, max (and quantiles if asked); off saves ~as much as the top-k."""
    quantiles: bool = False
    """Also track approximate per-unit quantiles (histogram binning: ~30x the cost of the
    rest of the statistics; on only when a claim needs them)."""
    per_context: bool = False
    """Rank contexts by their max over positions (k distinct contexts per unit, each with its
    argmax position: the thesis's and the neuron viewer's definition) instead of ranking every
    (context, position) token."""
    n_contexts: int | None = None
    """Harvest the corpus's first ``n_contexts`` contexts (None: all of them; a corpus with
    fewer is harvested whole). The corpus rows are shuffled, so a prefix is a sample of it."""

    def __post_init__(self) -> None:
        if not self.hooks:
            raise ValueError("no hooks to harvest")
        if self.k < 1 or self.batch_size < 1:
            raise ValueError("k and batch_size must be >= 1")
        if self.n_contexts is not None and self.n_contexts < 1:
            raise ValueError(f"n_contexts must be >= 1 or None, got {self.n_contexts}")

    def contexts_of(self, available: int) -> int:
        """How many of a corpus's ``available`` contexts this harvest reads."""
        return available if self.n_contexts is None else min(self.n_contexts, available)


@dataclass(frozen=True)
class HookHarvest:
    """Top-k contexts and per-unit statistics at one hook."""

    topk: TopKResult
    frequency: torch.Tensor  # (n_units,) share of tokens with activation > threshold
    mean: torch.Tensor  # (n_units,)
    max: torch.Tensor  # (n_units,)
    quantiles: torch.Tensor  # (len(QUANTILES), n_units) approximate, or (0, n_units) if not asked

    def top_tokens(self, corpus: Corpus) -> torch.Tensor:
        """Token id at each top-k (context, position): (k, n_units); -1 for unfilled slots."""
        ctx, pos = self.topk.context, self.topk.position
        valid = ctx >= 0
        out = torch.full_like(ctx, -1)
        out[valid] = corpus.tokens[ctx[valid], pos[valid]]
        return out


class Harvester:
    """The streaming state of a harvest: fed batch by batch (by :func:`_compute` or by the
    shared corpus pass, :func:`harness.activations.corpus_pass.run_pass`), then :meth:`result`."""

    def __init__(self, widths: dict[str, int], spec: HarvestSpec, context_len: int) -> None:
        self.spec, self.hooks, self.length = spec, tuple(spec.hooks), context_len
        self.n_contexts: int | None = None
        """How many leading corpus contexts :meth:`update` takes (set by :meth:`for_model`;
        None: every batch it is given)."""
        make = ContextTopK if spec.per_context else StreamingTopK
        self.tops = {h: make(TopKSpec(spec.k, widths[h])) for h in self.hooks}
        self.stats = {h: ActivationStats(widths[h], threshold=spec.threshold,
                                         quantiles=spec.quantiles)
                      for h in self.hooks} if spec.stats else {}
        self.widths = widths

    @classmethod
    def for_model(cls, model: Any, corpus: Corpus, spec: HarvestSpec) -> Harvester:
        probe = capture(model, corpus.tokens[:1, :2].to(model.cfg.device), spec.hooks)
        out = cls({h: a.shape[-1] for h, a in probe.items()}, spec, corpus.tokens.shape[1])
        out.n_contexts = spec.contexts_of(corpus.tokens.shape[0])
        return out

    def update(self, start: int, acts: dict[str, torch.Tensor]) -> None:
        """``acts`` {hook: (b, L, n_units)} for contexts start .. start + b - 1."""
        b, length = next(iter(acts.values())).shape[:2]
        ctx = torch.arange(start, start + b).repeat_interleave(length)  # (b*L,)
        pos = torch.arange(length).repeat(b)  # (b*L,)
        mask = content_positions(length, self.spec.skip_bos).repeat(b)  # (b*L,)
        for h in self.hooks:
            a = acts[h]
            flat = a.reshape(b * length, -1).float().cpu()  # (b*L, n_units)
            if self.spec.per_context:
                self.tops[h].update(a.float().cpu(), torch.arange(start, start + b), mask[:length])
            else:
                self.tops[h].update(flat, ctx, pos, mask)
            if self.spec.stats:
                self.stats[h].update(flat, mask)

    def result(self) -> dict[str, HookHarvest]:
        out = {}
        for h in self.hooks:
            s = self.stats.get(h)
            none = torch.empty(0)
            out[h] = HookHarvest(
                topk=self.tops[h].result(),
                frequency=s.frequency().float() if s else none,
                mean=s.mean().float() if s else none,
                max=s.max().float() if s else none,
                quantiles=torch.stack([s.quantile(q).float() for q in QUANTILES])
                if s and self.spec.quantiles else torch.empty(0, self.widths[h]),
            )
        return out


def _compute(model: Any, corpus: Corpus, spec: HarvestSpec) -> dict[str, HookHarvest]:
    from harness.activations.corpus_pass import run_pass

    harvester = Harvester.for_model(model, corpus, spec)
    run_pass(model, corpus.tokens[: harvester.n_contexts], harvester=harvester,
             batch_size=spec.batch_size)
    return harvester.result()


def _parts(loaded: Any, corpus: Corpus, spec: HarvestSpec) -> dict[str, Any]:
    model = loaded.model
    return {"weights": loaded.weight_hash, "dtype": str(model.cfg.dtype),
            "device": torch.device(model.cfg.device).type, "corpus": corpus.sha256, "spec": spec}


def _to_entry(res: dict[str, HookHarvest], spec: HarvestSpec) -> tuple[dict, dict]:
    tensors = {}
    for i, h in enumerate(spec.hooks):
        r = res[h]
        tensors.update({f"{i}.values": r.topk.values, f"{i}.context": r.topk.context,
                        f"{i}.position": r.topk.position, f"{i}.frequency": r.frequency,
                        f"{i}.mean": r.mean, f"{i}.max": r.max, f"{i}.quantiles": r.quantiles})
    n_seen = {h: res[h].topk.n_seen for h in spec.hooks}
    return tensors, {"n_seen": n_seen, "hooks": list(spec.hooks)}


def _from_entry(entry: Any, spec: HarvestSpec) -> dict[str, HookHarvest]:
    t, n_seen = entry.tensors, entry.meta["n_seen"]
    return {
        h: HookHarvest(
            topk=TopKResult(t[f"{i}.values"], t[f"{i}.context"], t[f"{i}.position"], n_seen[h]),
            frequency=t[f"{i}.frequency"], mean=t[f"{i}.mean"], max=t[f"{i}.max"],
            quantiles=t[f"{i}.quantiles"],
        )
        for i, h in enumerate(spec.hooks)
    }


def is_cached(cache: ContentCache, loaded: Any, corpus: Corpus, spec: HarvestSpec) -> bool:
    """Whether :func:`harvest` would read ``spec`` from ``cache`` without a forward pass."""
    from harness.activations.cache import cache_key

    return cache.get("harvest", cache_key("harvest", HARVEST_VERSION,
                                          **_parts(loaded, corpus, spec))) is not None


def store(cache: ContentCache, loaded: Any, corpus: Corpus, spec: HarvestSpec,
          res: dict[str, HookHarvest], seconds: float) -> None:
    """Put a harvest computed elsewhere (the shared corpus pass) under :func:`harvest`'s key."""
    from harness.activations.cache import cache_key

    tensors, meta = _to_entry(res, spec)
    parts = _parts(loaded, corpus, spec)
    cache.put("harvest", cache_key("harvest", HARVEST_VERSION, **parts), tensors, meta,
              version=HARVEST_VERSION, parts=parts, compute_seconds=seconds)


def harvest(loaded: Any, corpus: Corpus, spec: HarvestSpec, cache: ContentCache | None) -> dict[str, HookHarvest]:
    """Top-k and statistics for every unit at ``spec.hooks`` over ``corpus``.

    ``loaded`` is a LoadedSubject (its weight hash keys the cache). With ``cache=None`` it is
    computed fresh (the equivalence tests compare both paths).
    """
    model = loaded.model
    check_hook_names(model, spec.hooks)
    if cache is None:
        return _compute(model, corpus, spec)

    def compute():
        from harness.evidence.stages import HARVEST, stage

        with stage(HARVEST):
            return _to_entry(_compute(model, corpus, spec), spec)

    entry = cache.get_or_compute("harvest", HARVEST_VERSION, _parts(loaded, corpus, spec), compute)
    return _from_entry(entry, spec)


W_HARVEST_CONTEXTS = 1536
"""Family W's harvest reads the corpus's first 1,536 contexts (196,608 tokens: the SAEs'
training budget, ``SAESpec.training_tokens``), not all 2,048: the shared corpus pass then stops
after the 1,549 contexts the SAEs need, which took ~106 s off a cold run on 2 cores (the pass
runs near the forward's matmul bound; 2026-12-05). The rows are shuffled, so the prefix samples
every source in the recipe's shares; W's verdicts were re-measured on this harvest."""


def mlp_neurons_spec(n_layers: int, k: int = 20, n_contexts: int | None = W_HARVEST_CONTEXTS) -> HarvestSpec:
    """Every layer's ``mlp.hook_post``, k distinct contexts per neuron (family W's Method 1),
    over the corpus's first ``n_contexts`` contexts (:data:`W_HARVEST_CONTEXTS`)."""
    return HarvestSpec(hooks=tuple(f"blocks.{layer}.mlp.hook_post" for layer in range(n_layers)),
                       k=k, batch_size=16, per_context=True, stats=False, n_contexts=n_contexts)
