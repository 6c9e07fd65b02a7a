"""Which neuron and partner family N studies on a subject (CLAIMS.md, family N), chosen on
UNCLAMPED corpus data by a stated procedure.

The source (seeds/001) studies gpt2-small ``blocks.11.mlp.hook_post``, neuron 373 with partner
2202 (the partner chosen on CLAMPED data). On gpt2-small the ``last`` role keeps those ids; on
every other subject the ids mean nothing, and both roles follow one procedure:

- layer: ``last`` = the last block (the source's layer 11 of 12); ``mid`` = the block at half
  depth, harness.models.depth.relative_layer(MID_LAYER, SOURCE_N_LAYERS, n_layers), at most ``n_layers - 2`` so that a
  downstream block exists (claim N3's downstream effects);
- neuron: the highest-variance unit of that layer's ``mlp.hook_post`` over the sample;
- partner: its top co-activator, the unit of the same layer with the highest Pearson r of
  ``hook_post`` across the same positions (itself and constant units excluded).

The sample: the first ``n_contexts`` contexts of the background corpus, every position but
position 0 (BOS). The chosen neuron's max-activating contexts in that sample (one per context,
ranked by the context's max) build the neuron-specific prompts: a bounded scan of its own, not
the full-corpus harvest (harness.activations.harvest), whose cold cost (every layer over the
whole corpus) is minutes, not seconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from harness.activations.cache import ContentCache, progress
from harness.activations.capture import capture
from harness.models.depth import relative_layer

__all__ = ["CHOICE_VERSION", "ROLES", "ChoiceSpec", "NeuronChoice", "choose_neurons",
           "has_downstream", "layer_for", "pick", "top_contexts"]

CHOICE_VERSION = "1"
SOURCE_SUBJECT = "gpt2-small"
SOURCE_N_LAYERS = 12
SOURCE_LAYER = 11
SOURCE_NEURON = 373
SOURCE_PARTNER = 2202
"""The source's site (seeds/001): gpt2-small blocks.11.mlp.hook_post, neuron 373, partner 2202."""
MID_LAYER = 6
"""Half of the source's 12 layers: the mid-depth role's relative depth (a choice of this suite)."""
Role = Literal["last", "mid"]
ROLES: tuple[Role, ...] = ("last", "mid")


@dataclass(frozen=True)
class ChoiceSpec:
    """The sample the choice is made on (part of the cache key)."""

    n_contexts: int = 32
    """Corpus contexts read from the start of the corpus (32 x 127 = 4,064 positions at the
    default 128-token contexts)."""
    batch_size: int = 16
    """Contexts per forward pass."""
    runner_ups: int = 5
    """Runner-up neurons (by variance) and partners (by r) kept for the evidence."""

    def __post_init__(self) -> None:
        if self.n_contexts < 2 or self.batch_size < 1 or self.runner_ups < 1:
            raise ValueError("need n_contexts >= 2, batch_size >= 1, runner_ups >= 1")


@dataclass(frozen=True)
class NeuronChoice:
    """One chosen (neuron, partner) pair and the numbers that chose it."""

    role: Role
    layer: int
    neuron: int
    partner: int
    published: bool
    """True: the source's ids (gpt2-small, last role), not the procedure's."""
    variance: np.ndarray
    """(d_mlp,) float64 variance of every unit over the sample."""
    r: np.ndarray
    """(d_mlp,) float64 Pearson r of every unit with ``neuron`` (NaN for itself and constants)."""
    activation: np.ndarray
    """(n_contexts, context_len - 1) float32 hook_post[neuron] at positions 1.. of the sample."""

    @property
    def hook(self) -> str:
        return f"blocks.{self.layer}.mlp.hook_post"

    @property
    def variance_rank(self) -> int:
        """1 = the highest-variance unit of the layer."""
        return int((self.variance > self.variance[self.neuron]).sum()) + 1

    def runner_ups(self, k: int) -> dict[str, list]:
        """The top-k units by variance and by r with ``neuron`` (ids and values)."""
        by_var = np.argsort(-self.variance, kind="stable")[:k]
        r = np.where(np.isnan(self.r), -np.inf, self.r)
        by_r = np.argsort(-r, kind="stable")[:k]
        return {"by_variance": by_var.tolist(), "variance": self.variance[by_var].tolist(),
                "by_r": by_r.tolist(), "r": self.r[by_r].tolist()}

    def describe(self) -> str:
        how = ("the source's published ids" if self.published else
               "highest-variance unit; partner = highest Pearson r with it, same layer and positions")
        return (f"{self.role}: {self.hook} neuron {self.neuron} (variance {self.variance[self.neuron]:.4g}, "
                f"rank {self.variance_rank}), partner {self.partner} (r {self.r[self.partner]:.3f}); {how}")


def layer_for(role: Role, n_layers: int, subject: str) -> int:
    """The block a role studies (module docstring)."""
    if role == "last":
        return SOURCE_LAYER if subject == SOURCE_SUBJECT else n_layers - 1
    if role != "mid":
        raise ValueError(f"unknown role {role!r}: one of {ROLES}")
    return max(0, min(n_layers - 2, relative_layer(MID_LAYER, SOURCE_N_LAYERS, n_layers)))


def has_downstream(choices: Mapping[Role, NeuronChoice]) -> bool:
    """True when the mid role's block lies before the last role's, so that the mid neuron has a
    downstream layer to move. On a 1-layer model both roles study block 0 (:func:`layer_for`):
    the "mid role's last-layer shift" would be the clamped layer itself (the clamp's own
    arithmetic), not a downstream effect, and claim N3 records no downstream statistic there."""
    return choices["mid"].layer < choices["last"].layer


def _pearson_row(acts: np.ndarray, n: int) -> np.ndarray:
    """r(acts[:, n], acts[:, m]) for every m (float64); NaN for m = n and for constant units."""
    x = acts - acts.mean(0)  # (N, d)
    norms = np.sqrt((x * x).sum(0))  # (d,)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (x[:, n] @ x) / (norms[n] * norms)  # (d,)
    r[norms == 0] = np.nan
    r[n] = np.nan
    return r


def pick(acts: np.ndarray, role: Role, subject: str) -> tuple[int, int, bool, np.ndarray, np.ndarray]:
    """(neuron, partner, published, variance (d,), r (d,)) from a layer's sample (N, d)."""
    acts = np.asarray(acts, dtype=np.float64)
    if acts.ndim != 2 or acts.shape[0] < 2:
        raise ValueError(f"need activations (N >= 2, d), got {acts.shape}")
    if not np.isfinite(acts).all():
        raise ValueError("non-finite activations: refusing to choose a neuron on them")
    variance = acts.var(0)  # (d,)
    published = subject == SOURCE_SUBJECT and role == "last"
    if published:
        if acts.shape[1] <= SOURCE_PARTNER:
            raise ValueError(f"{subject} has {acts.shape[1]} units: not the source's layer")
        neuron, partner = SOURCE_NEURON, SOURCE_PARTNER
        return neuron, partner, True, variance, _pearson_row(acts, neuron)
    neuron = int(np.argmax(variance))
    if variance[neuron] == 0:
        raise ValueError("every unit is constant over the sample: no neuron to choose")
    r = _pearson_row(acts, neuron)
    if np.isnan(r).all():
        raise ValueError("no other unit varies: no partner to choose")
    return neuron, int(np.nanargmax(r)), False, variance, r


def top_contexts(choice: NeuronChoice, k: int) -> list[tuple[int, int, float]]:
    """The k sample contexts with the highest max of the neuron, as (context, position, value),
    position counted in the corpus context (BOS = 0); ties: the earlier context."""
    a = choice.activation  # (n_contexts, L - 1)
    best = a.max(1)  # (n_contexts,)
    order = np.argsort(-best, kind="stable")[:k]
    return [(int(c), int(a[c].argmax()) + 1, float(best[c])) for c in order]


def _sample(model: Any, tokens: torch.Tensor, hooks: list[str], spec: ChoiceSpec) -> dict[str, np.ndarray]:
    """{hook: (n_contexts, L - 1, d) float32} at positions 1.. of the first contexts."""
    out: dict[str, list[np.ndarray]] = {h: [] for h in hooks}
    starts = range(0, spec.n_contexts, spec.batch_size)
    for s in progress(starts, desc=f"neuron choice: {spec.n_contexts} corpus contexts", total=len(starts)):
        acts = capture(model, tokens[s: min(s + spec.batch_size, spec.n_contexts)].to(model.cfg.device), hooks)
        for h in hooks:
            out[h].append(acts[h][:, 1:].float().cpu().numpy())
    return {h: np.concatenate(v) for h, v in out.items()}


def choose_neurons(loaded: Any, corpus: Any, spec: ChoiceSpec = ChoiceSpec(),
                   cache: ContentCache | None = None) -> dict[Role, NeuronChoice]:
    """Both roles' choices for ``loaded`` (a LoadedSubject) on ``corpus`` (a Corpus), through
    ``cache`` when given (keyed by the weights, the corpus, the spec and the subject's name,
    which decides the gpt2-small rule)."""
    model = loaded.model
    subject = loaded.spec.name
    n_layers = model.cfg.n_layers
    if corpus.tokens.shape[0] < spec.n_contexts:
        raise ValueError(f"the corpus has {corpus.tokens.shape[0]} contexts, the choice reads {spec.n_contexts}")
    layers = {role: layer_for(role, n_layers, subject) for role in ROLES}

    def compute() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        from harness.evidence.stages import stage

        with stage("neuron choice"):
            hooks = sorted({f"blocks.{layer}.mlp.hook_post" for layer in layers.values()})
            sample = _sample(model, corpus.tokens, hooks, spec)
        tensors, meta = {}, {}
        for role, layer in layers.items():
            a = sample[f"blocks.{layer}.mlp.hook_post"]  # (n_contexts, L - 1, d)
            neuron, partner, published, variance, r = pick(a.reshape(-1, a.shape[-1]), role, subject)
            tensors |= {f"{role}.variance": torch.from_numpy(variance), f"{role}.r": torch.from_numpy(r),
                        f"{role}.activation": torch.from_numpy(np.ascontiguousarray(a[..., neuron]))}
            meta[role] = {"layer": layer, "neuron": neuron, "partner": partner, "published": published}
        return tensors, meta

    if cache is None:
        tensors, meta = compute()
    else:
        parts = {"weights": loaded.weight_hash, "subject": subject, "dtype": str(model.cfg.dtype),
                 "device": torch.device(model.cfg.device).type, "corpus": corpus.sha256, "spec": spec}
        entry = cache.get_or_compute("neuron-choice", CHOICE_VERSION, parts, compute)
        tensors, meta = entry.tensors, entry.meta
    return {role: NeuronChoice(role=role, layer=meta[role]["layer"], neuron=meta[role]["neuron"],
                               partner=meta[role]["partner"], published=meta[role]["published"],
                               variance=tensors[f"{role}.variance"].numpy(), r=tensors[f"{role}.r"].numpy(),
                               activation=tensors[f"{role}.activation"].numpy())
            for role in ROLES}
