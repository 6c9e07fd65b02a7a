"""Train SAEs on a subject's activations with sae-lens' own trainer, from ONE corpus pass.

The activations come from :func:`harness.activations.corpus_pass.run_pass`, the same forward pass that
computes family W's harvest when that is missing too, so no corpus token goes through the
model twice in a run. sae-lens' ``SAETrainer`` does the training (its optimiser, lr schedule,
TopK auxiliary loss, dead-feature tracking, input normalisation estimate and the final
folding); this module only feeds it the stored activations in a seeded order and builds the
config from a :class:`~harness.saes.sources.SAESpec`:

- Order: per epoch, one ``torch.randperm`` of all stored activation vectors under a generator
  seeded by ``spec.seed`` (``randperm`` on the CPU is serial, hence the same bits on every
  CPU; sae-lens' own mixing buffer also uses the global RNG).
- Init: the SAE is built under ``manual_seed(spec.seed)`` inside ``torch.random.fork_rng``,
  so the caller's RNG is untouched, and an SAE trained alone equals the same SAE trained
  beside others from one pass (tested): its cache key names only its own spec.
- Math: see :mod:`harness.models.determinism` (ATen's CPU capability and the thread count pinned,
  MKL in strict CNR mode, deterministic algorithms while training); the platform the bits
  were made on goes into each cache entry and the evidence.
- wandb, checkpoints and output directories are off: the cache is the only store.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from harness.activations.cache import ContentCache, cache_key
from harness.saes.sources import (
    LoadedSAE,
    SAESpec,
    quality_from_rows,
    sae_from_state,
    sae_quality,
    sae_quality_rows,
    store_quality_rows,
)

if TYPE_CHECKING:  # pragma: no cover
    from harness.data.corpus import Corpus
    from harness.models.loaders import LoadedSubject

VERSION = "2"  # 2: trained from the shared corpus pass by SAETrainer (1: sae-lens' runners)
PRODUCER = "sae"

PASS_FIELDS = ("context_size", "exclude_bos", "holdout_contexts")
"""SAESpec fields that decide which activations an SAE trains on: SAEs fed by one corpus pass
must agree on them (everything else, seed and lr included, may differ)."""


def training_contexts_of(corpus: Corpus, spec: SAESpec) -> int:
    """How many corpus contexts an SAE may train on: all but the last ``holdout_contexts``."""
    n = corpus.tokens.shape[0] - spec.holdout_contexts
    if n < 1:
        raise ValueError(f"corpus has {corpus.tokens.shape[0]} contexts: too few to hold out "
                         f"{spec.holdout_contexts} and still train")
    if corpus.tokens.shape[1] < spec.context_size:
        raise ValueError(f"spec.context_size {spec.context_size} exceeds the corpus contexts "
                         f"({corpus.tokens.shape[1]} tokens)")
    return n


def heldout_tokens_of(corpus: Corpus, spec: SAESpec) -> torch.Tensor:
    """The last ``spec.holdout_contexts`` contexts: never trained on, used for quality."""
    return corpus.tokens[corpus.tokens.shape[0] - spec.holdout_contexts :, : spec.context_size]


def hook_width(model: Any, hook_name: str) -> int:
    """Width of the activation at ``hook_name`` (one 2-token forward up to its block)."""
    from harness.activations.capture import capture

    tokens = torch.zeros(1, 2, dtype=torch.long, device=model.cfg.device)
    return int(capture(model, tokens, [hook_name])[hook_name].shape[-1])


def training_sae_config(spec: SAESpec, d_in: int, device: str) -> Any:
    """The sae-lens TrainingSAEConfig for ``spec``.

    ``expected_average_only_in`` scales inputs to mean norm sqrt(d_in) while training (the
    residual norms of SmolLM2 grow from ~150 to ~600 with depth: one lr fits all hooks) and
    sae-lens folds the factor back into the weights at the end, so the stored SAE reads raw
    activations.
    """
    from sae_lens import StandardTrainingSAEConfig, TopKTrainingSAEConfig

    common = dict(d_in=d_in, d_sae=spec.d_sae, dtype=spec.dtype, device=device,
                  normalize_activations="expected_average_only_in")
    if spec.architecture == "topk":
        return TopKTrainingSAEConfig(k=spec.k, **common)
    return StandardTrainingSAEConfig(l1_coefficient=spec.l1_coefficient, **common)


def trainer_config(spec: SAESpec, device: str) -> Any:
    """sae-lens' SAETrainerConfig: linear decay over the last ``lr_decay_fraction`` of the
    steps (to lr / 10, sae-lens' default end), no warm-up, no checkpoints, no wandb."""
    from sae_lens import LoggingConfig
    from sae_lens.config import SAETrainerConfig

    steps = spec.training_tokens // spec.train_batch_size_tokens
    return SAETrainerConfig(
        total_training_samples=spec.training_tokens,
        train_batch_size_samples=spec.train_batch_size_tokens,
        lr=spec.lr, lr_end=spec.lr / 10, lr_decay_steps=int(spec.lr_decay_fraction * steps),
        device=device, dead_feature_window=spec.dead_feature_window,
        n_batches_for_norm_estimate=spec.n_batches_for_norm_estimate,
        logger=LoggingConfig(log_to_wandb=False), n_checkpoints=0, checkpoint_path=None,
        save_final_checkpoint=False,
    )


def new_training_sae(spec: SAESpec, d_in: int, device: str) -> Any:
    """A freshly initialised TrainingSAE; its init depends on ``spec.seed`` only."""
    from sae_lens.registry import get_sae_training_class

    cfg = training_sae_config(spec, d_in, device)
    sae_cls, _ = get_sae_training_class(cfg.architecture())
    with torch.random.fork_rng(devices=_rng_devices(device)):
        torch.manual_seed(spec.seed)
        return sae_cls(cfg)


def _rng_devices(device: str) -> list[int]:
    dev = torch.device(device)
    return [dev.index or 0] if dev.type == "cuda" else []


def activation_batches(acts: torch.Tensor, batch: int, seed: int, device: str) -> Iterator[torch.Tensor]:
    """Endless (batch, d) batches of ``acts`` rows: one seeded permutation per epoch; a
    batch never straddles two epochs (the remainder of an epoch is dropped)."""
    n = acts.shape[0]
    if n < batch:
        raise ValueError(f"{n} activation vectors cannot fill one batch of {batch}")
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=gen)
        for i in range(0, n - batch + 1, batch):
            yield acts[order[i:i + batch]].to(device)


def sae_metadata(spec: SAESpec, loaded: LoadedSubject, corpus: Corpus) -> dict[str, Any]:
    """What sae-lens' runners write into a trained SAE's metadata, for our data."""
    bos = int(corpus.tokens[0, 0])  # every corpus context starts with BOS
    return dict(hook_name=spec.hook_name, model_name=loaded.spec.id,
                dataset_path=f"interp-claims-corpus@{corpus.sha256[:16]}",
                context_size=spec.context_size, prepend_bos=True,
                exclude_special_tokens=[bos] if spec.exclude_bos else False)


def train_from_activations(acts: torch.Tensor, spec: SAESpec, device: str,
                           metadata: dict[str, Any] | None = None) -> tuple[Any, float]:
    """(trained TrainingSAE, seconds) through sae-lens' ``SAETrainer`` on ``acts`` (n, d_in);
    ``metadata`` (default: the hook name only) is written into the SAE's config."""
    from sae_lens.training.sae_trainer import SAETrainer

    from harness.models.determinism import deterministic

    sae = new_training_sae(spec, acts.shape[-1], device)
    data = activation_batches(acts, spec.train_batch_size_tokens, spec.seed, device)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=_rng_devices(device)), deterministic():
        torch.manual_seed(spec.seed)
        trained = SAETrainer(cfg=trainer_config(spec, device), sae=sae, data_provider=data).fit()
    for name, value in (metadata or {"hook_name": spec.hook_name}).items():
        setattr(trained.cfg.metadata, name, value)
    return trained.eval(), time.perf_counter() - start


def check_compatible(specs: Sequence[SAESpec]) -> None:
    """SAEs fed by one corpus pass must agree on what they train on (PASS_FIELDS)."""
    for name in PASS_FIELDS:
        values = {getattr(s, name) for s in specs}
        if len(values) > 1:
            raise ValueError(f"SAE specs trained from one pass must agree on {name}; got {sorted(values)}")
    if len(set(specs)) != len(specs):
        raise ValueError("the same spec twice in one joint pass")


def collect_activations(loaded: LoadedSubject, corpus: Corpus, specs: Sequence[SAESpec],
                        harvester: Any | None = None) -> dict[str, torch.Tensor]:
    """The training activations of ``specs`` (one corpus pass; ``harvester`` fed by the same
    pass when given): {hook: (n_tokens, d_in)}."""
    from harness.activations.corpus_pass import run_pass, union_request

    check_compatible(specs)
    request = union_request(specs, training_contexts_of(corpus, specs[0]))
    tokens = corpus.tokens if harvester is not None else corpus.tokens[: request.n_contexts]
    return run_pass(loaded.model, tokens, harvester=harvester, request=request)


def _spec_acts(acts: dict[str, torch.Tensor], spec: SAESpec) -> torch.Tensor:
    """The rows ``spec`` trains on: its ``training_tokens`` first (all when fewer stored)."""
    a = acts[spec.hook_name]
    return a[: min(spec.training_tokens, a.shape[0])]


def train_sae(loaded: LoadedSubject, corpus: Corpus, spec: SAESpec) -> tuple[Any, dict[str, float]]:
    """(inference SAE, quality on the held-out contexts) for one spec; nothing cached."""
    device = str(loaded.model.cfg.device)
    acts = collect_activations(loaded, corpus, [spec])
    trained, _ = train_from_activations(_spec_acts(acts, spec), spec, device,
                                        sae_metadata(spec, loaded, corpus))
    sae, _, _ = _inference(trained, device)
    return sae, sae_quality(sae, loaded, heldout_tokens_of(corpus, spec))


def to_inference(training_sae: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(inference config dict, inference state dict) exactly as sae-lens'
    ``save_inference_model`` would write them (TopK folds its decoder norms here)."""
    state = {k: v.detach().clone() for k, v in training_sae.state_dict().items()}
    training_sae.process_state_dict_for_saving_inference(state)
    return training_sae.cfg.get_inference_sae_cfg_dict(), state


def _inference(training_sae: Any, device: str) -> tuple[Any, dict[str, Any], dict[str, torch.Tensor]]:
    cfg_dict, state = to_inference(training_sae)
    return sae_from_state(cfg_dict, state, device), cfg_dict, state


def _parts(loaded: LoadedSubject, corpus: Corpus, spec: SAESpec) -> dict[str, Any]:
    return {"weights": loaded.weight_hash, "corpus": corpus.sha256, "spec": spec}


def _entries(cache: ContentCache, trained: Sequence[Any], loaded: LoadedSubject, corpus: Corpus,
             specs: Sequence[SAESpec], seconds: Sequence[float],
             made_on: dict[str, Any]) -> list[tuple[dict, dict]]:
    """(tensors, meta) cache entries for SAEs trained from one pass; quality measured jointly,
    its per-context rows stored for family R (:func:`harness.saes.sources.cached_quality_rows`)."""
    device = str(loaded.model.cfg.device)
    built = [_inference(t, device) for t in trained]
    heldout = heldout_tokens_of(corpus, specs[0])
    rows = sae_quality_rows([b[0] for b in built], loaded, heldout)
    qualities = [quality_from_rows(r) | {"dead_share": r["dead_share"]} for r in rows]
    for (sae, _, _), r in zip(built, rows, strict=True):
        store_quality_rows(cache, loaded, sae, heldout, r)
    hooks = [s.hook_name for s in specs]
    return [(state, {"sae_cfg": cfg_dict, "quality": q, "train_seconds": round(sec, 1),
                     "trained_with": hooks, "platform": made_on})
            for (_, cfg_dict, state), q, sec in zip(built, qualities, seconds, strict=True)]


def _store_r_usage(cache: ContentCache, loaded: LoadedSubject, corpus: Corpus,
                   specs: Sequence[SAESpec], entries: Sequence[tuple[dict, dict]],
                   acts: dict[str, torch.Tensor]) -> None:
    """Family R's feature usage of each MLP SAE (the first R_USAGE_CONTEXTS corpus contexts)
    from the activations this pass already holds, under the key the R claims read: those
    contexts need not go through the model again."""
    from harness.saes.features import (
        R_USAGE_CONTEXTS,
        R_USAGE_TOP,
        store_usage,
        usage_from_activations,
    )

    for spec, (state, meta) in zip(specs, entries, strict=True):
        n = R_USAGE_CONTEXTS
        if (not spec.hook_name.endswith("mlp.hook_post") or not spec.exclude_bos
                or acts[spec.hook_name].shape[0] < n * (spec.context_size - 1)):
            continue
        sae = sae_from_state(meta["sae_cfg"], state, str(loaded.model.cfg.device))
        tokens = corpus.tokens[:n, : spec.context_size]
        usage = usage_from_activations(sae, acts[spec.hook_name], tokens, n_top=R_USAGE_TOP,
                                       n_random=R_USAGE_TOP)
        store_usage(cache, loaded, sae, tokens, usage, n_top=R_USAGE_TOP, n_random=R_USAGE_TOP)


def get_or_train_saes(
    cache: ContentCache, loaded: LoadedSubject, corpus: Corpus, specs: Sequence[SAESpec],
    *, harvest_specs: Sequence[Any] = (),
) -> tuple[LoadedSAE, ...]:
    """Cached SAEs for ``specs``, in order. The missing ones are trained from ONE corpus pass
    (:func:`harness.activations.corpus_pass.run_pass`), which also computes every missing harvest of
    ``harvest_specs`` (family W's), so the run's corpus tokens go through the model once.

    The pass runs under the cache lock of the first missing SAE; it writes every other entry
    it computes before the lock is released, so a concurrent process (pytest-xdist) waits,
    then reads them all.
    """
    from harness.activations import harvest as hv
    from harness.evidence.stages import stage
    from harness.models.determinism import platform

    def key(s: SAESpec) -> str:
        return cache_key(PRODUCER, VERSION, **_parts(loaded, corpus, s))

    while True:  # a concurrent process may have written some (not all) of them meanwhile
        missing = [s for s in dict.fromkeys(specs) if cache.get(PRODUCER, key(s)) is None]
        if not missing:
            break

        def compute(missing: list[SAESpec] = missing) -> tuple[dict, dict]:
            todo = [h for h in harvest_specs if not hv.is_cached(cache, loaded, corpus, h)]
            with stage("corpus pass"):
                start = time.perf_counter()
                harvester = None
                if len(todo) == 1:  # one harvester per pass (the default: family W's spec)
                    harvester = hv.Harvester.for_model(loaded.model, corpus, todo[0])
                acts = collect_activations(loaded, corpus, missing, harvester)
                if harvester is not None:
                    hv.store(cache, loaded, corpus, todo[0], harvester.result(),
                             time.perf_counter() - start)
            with stage("SAE training"):
                trained = []
                for s in missing:
                    t, seconds = train_from_activations(_spec_acts(acts, s), s,
                                                        str(loaded.model.cfg.device),
                                                        sae_metadata(s, loaded, corpus))
                    trained.append((t, seconds))
            with stage("SAE quality"):
                entries = _entries(cache, [t for t, _ in trained], loaded, corpus, missing,
                                   [sec for _, sec in trained], platform())
                _store_r_usage(cache, loaded, corpus, missing, entries, acts)
            del acts
            for s, (tensors, meta), (_, sec) in zip(missing[1:], entries[1:], trained[1:], strict=True):
                cache.put(PRODUCER, key(s), tensors, meta, version=VERSION,
                          parts=_parts(loaded, corpus, s), compute_seconds=sec)
            return entries[0]

        cache.get_or_compute(PRODUCER, VERSION, _parts(loaded, corpus, missing[0]), compute)
    return tuple(_read(cache, loaded, corpus, s) for s in specs)


def get_or_train_sae(cache: ContentCache, loaded: LoadedSubject, corpus: Corpus,
                     spec: SAESpec) -> LoadedSAE:
    """One cached SAE; see :func:`get_or_train_saes`."""
    return get_or_train_saes(cache, loaded, corpus, [spec])[0]


def _read(cache: ContentCache, loaded: LoadedSubject, corpus: Corpus, spec: SAESpec) -> LoadedSAE:
    def gone() -> tuple[dict, dict]:  # only if the entry was deleted between write and read
        from harness.models.determinism import platform

        acts = collect_activations(loaded, corpus, [spec])
        trained, sec = train_from_activations(_spec_acts(acts, spec), spec,
                                              str(loaded.model.cfg.device),
                                              sae_metadata(spec, loaded, corpus))
        return _entries(cache, [trained], loaded, corpus, [spec], [sec], platform())[0]

    entry = cache.get_or_compute(PRODUCER, VERSION, _parts(loaded, corpus, spec), gone)
    sae = sae_from_state(entry.meta["sae_cfg"], entry.tensors, str(loaded.model.cfg.device))
    return LoadedSAE(
        sae=sae, spec=spec, quality=entry.meta["quality"], origin="trained-locally",
        source={"cache_key": entry.meta["key"], "train_seconds": entry.meta["train_seconds"],
                "trained_with": entry.meta["trained_with"],
                "made_on": entry.meta.get("platform"), "subject_weight_hash": loaded.weight_hash,
                "corpus_sha256": corpus.sha256},
    )


HUB_SAES: dict[str, tuple[str, tuple[str, ...]]] = {
    "gpt2-small": ("gpt2-small-res-jb", tuple(f"blocks.{d}.hook_resid_pre" for d in (6, 8, 10, 11))),
}
"""Subjects whose residual SAEs the sources published: subject id -> (sae-lens release, ids)."""


def subject_saes(cache: ContentCache, loaded: LoadedSubject, corpus: Corpus,
                 seed: int = 0) -> tuple[LoadedSAE, ...]:
    """The SAEs families S and R run on: the source's hub SAEs where they exist (gpt2-small:
    ``gpt2-small-res-jb`` at blocks 6/8/10/11; SubjectUnavailable offline), locally trained
    ones otherwise (:func:`harness.saes.sources.default_sae_specs` with ``seed``); the MLP SAE is
    always trained."""
    from harness.activations.harvest import mlp_neurons_spec
    from harness.saes.sources import default_sae_specs, load_hub_sae

    specs = default_sae_specs(loaded.model, seed=seed)
    # family W's harvest rides on the same corpus pass (it reads every layer's mlp.hook_post)
    w_harvest = (mlp_neurons_spec(loaded.model.cfg.n_layers),) if loaded.model.cfg.d_mlp else ()
    hub = HUB_SAES.get(loaded.spec.id)
    if hub is None:
        return get_or_train_saes(cache, loaded, corpus, specs, harvest_specs=w_harvest)
    release, ids = hub
    device = str(loaded.model.cfg.device)
    resid = tuple(load_hub_sae(release, i, device=device) for i in ids)
    mlp = [s for s in specs if not s.hook_name.endswith("hook_resid_pre")]
    return resid + get_or_train_saes(cache, loaded, corpus, mlp, harvest_specs=w_harvest)
