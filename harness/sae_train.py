"""Train SAEs on a subject's activations with sae-lens' own runners, deterministically.

sae-lens does the training (:class:`LanguageModelSAETrainingRunner` for one SAE,
:class:`MultiSAETrainingRunner` for several SAEs fed by ONE forward pass); this module only
builds their configs from a :class:`~harness.saes.SAESpec`, hands them the subject's model
(``override_model``) and the corpus as a pretokenized ``datasets.Dataset`` (``override_dataset``,
column ``input_ids``), and makes the run reproducible and side-effect free:

- sae-lens never reads its ``seed`` field (6.54: only the cache-activations runner uses it),
  yet consumes the global torch RNG twice: the SAE's weight init and the mixing buffer's
  ``torch.randperm``. Each SAE is therefore built by us under ``manual_seed(spec.seed)`` and
  passed in (``override_sae(s)``), and the global RNG is reseeded to ``spec.seed`` just
  before ``run()``, all inside ``torch.random.fork_rng`` so the caller's RNG is untouched.
  Built this way, an SAE trained alone and the same SAE trained beside others in one pass
  see the same init and the same shuffled stream (tested): the cache key of a trained SAE
  does not depend on what it was trained with.
- the runners install SIGINT/SIGTERM handlers and never remove them; they are restored.
- wandb, checkpoints and output directories are off: the cache is the only store.
"""

from __future__ import annotations

import signal
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from harness.cache import ContentCache, cache_key
from harness.saes import LoadedSAE, SAESpec, sae_from_state, sae_quality, sae_quality_many

if TYPE_CHECKING:  # pragma: no cover
    from harness.corpus import Corpus
    from harness.loaders import LoadedSubject

VERSION = "1"
PRODUCER = "sae"

RUNNER_FIELDS = (
    "training_tokens", "lr", "lr_decay_fraction", "train_batch_size_tokens", "context_size",
    "n_batches_in_buffer", "store_batch_size_prompts", "n_batches_for_norm_estimate",
    "dead_feature_window", "seed", "dtype", "holdout_contexts", "exclude_bos",
)
"""SAESpec fields the runner (not the SAE) owns: SAEs trained in one pass must agree on them."""


def training_tokens_of(corpus: Corpus, spec: SAESpec) -> torch.Tensor:
    """The contexts an SAE may train on: all but the last ``spec.holdout_contexts``."""
    n = corpus.tokens.shape[0] - spec.holdout_contexts
    if n < spec.store_batch_size_prompts:
        raise ValueError(f"corpus has {corpus.tokens.shape[0]} contexts: too few to hold out "
                         f"{spec.holdout_contexts} and still fill one store batch")
    if corpus.tokens.shape[1] < spec.context_size:
        raise ValueError(f"spec.context_size {spec.context_size} exceeds the corpus contexts "
                         f"({corpus.tokens.shape[1]} tokens)")
    return corpus.tokens[:n, : spec.context_size]  # (n_train, context_size)


def heldout_tokens_of(corpus: Corpus, spec: SAESpec) -> torch.Tensor:
    """The last ``spec.holdout_contexts`` contexts: never trained on, used for quality."""
    return corpus.tokens[corpus.tokens.shape[0] - spec.holdout_contexts :, : spec.context_size]


def hook_width(model: Any, hook_name: str) -> int:
    """Width of the activation at ``hook_name`` (one 2-token forward up to its block)."""
    from harness.capture import check_hook_names, last_layer_needed

    check_hook_names(model, [hook_name])
    tokens = torch.zeros(1, 2, dtype=torch.long, device=model.cfg.device)
    with torch.no_grad():
        _, cache = model.run_with_cache(
            tokens, names_filter=[hook_name], stop_at_layer=last_layer_needed(model, [hook_name])
        )
    return int(cache[hook_name].shape[-1])


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


def runner_kwargs(spec: SAESpec, loaded: LoadedSubject, corpus: Corpus) -> dict[str, Any]:
    """Fields shared by both sae-lens runner configs."""
    from sae_lens import LoggingConfig

    steps = spec.training_tokens // spec.train_batch_size_tokens
    bos = int(corpus.tokens[0, 0])  # every corpus context starts with BOS
    return dict(
        model_name=loaded.spec.id,
        dataset_path=f"interp-claims-corpus@{corpus.sha256[:16]}",  # metadata only
        streaming=False,
        context_size=spec.context_size,
        n_batches_in_buffer=spec.n_batches_in_buffer,
        training_tokens=spec.training_tokens,
        store_batch_size_prompts=spec.store_batch_size_prompts,
        device=str(loaded.model.cfg.device),
        seed=spec.seed,
        dtype=spec.dtype,
        prepend_bos=True,  # the corpus contexts already start with BOS; recorded in metadata
        train_batch_size_tokens=spec.train_batch_size_tokens,
        lr=spec.lr,
        lr_decay_steps=int(spec.lr_decay_fraction * steps),
        dead_feature_window=spec.dead_feature_window,
        n_batches_for_norm_estimate=spec.n_batches_for_norm_estimate,
        logger=LoggingConfig(log_to_wandb=False),
        checkpoint_path=None,
        output_path=None,
        model_from_pretrained_kwargs={},  # default {"center_writing_weights": False} warns on every SAE load
        exclude_special_tokens=[bos] if spec.exclude_bos else False,
    )


def corpus_dataset(tokens: torch.Tensor) -> Any:
    """A pretokenized ``datasets.Dataset`` (column ``input_ids``) the activation store reads."""
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": tokens.tolist()})


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


@contextmanager
def _isolated_run(seed: int, device: str) -> Iterator[None]:
    """Seed the global RNG for the run, restore it and the signal handlers afterwards."""
    in_main = threading.current_thread() is threading.main_thread()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    with torch.random.fork_rng(devices=_rng_devices(device)), warnings.catch_warnings():
        # sae-lens compares the number of dataset ROWS with training TOKENS and always warns.
        warnings.filterwarnings("ignore", message="The training dataset contains fewer samples")
        # sae-lens re-wraps the dataset's torch rows with torch.tensor(row).
        warnings.filterwarnings("ignore", message="To copy construct from a tensor")
        torch.manual_seed(seed)
        try:
            yield
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)


def check_compatible(specs: Sequence[SAESpec]) -> None:
    """SAEs trained in one pass share the runner: their runner-level fields must agree."""
    for name in RUNNER_FIELDS:
        values = {getattr(s, name) for s in specs}
        if len(values) > 1:
            raise ValueError(f"SAE specs trained together must agree on {name}; got {sorted(values)}")
    if len(set(specs)) != len(specs):
        raise ValueError("the same spec twice in one joint pass")


def train_one(loaded: LoadedSubject, corpus: Corpus, spec: SAESpec) -> tuple[Any, float]:
    """(trained TrainingSAE, seconds) through ``LanguageModelSAETrainingRunner``."""
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner

    kwargs = runner_kwargs(spec, loaded, corpus)
    d_in = hook_width(loaded.model, spec.hook_name)
    sae = new_training_sae(spec, d_in, kwargs["device"])
    cfg = LanguageModelSAERunnerConfig(
        sae=sae.cfg, hook_name=spec.hook_name, is_dataset_tokenized=True, verbose=False, **kwargs
    )
    start = time.perf_counter()
    with _isolated_run(spec.seed, kwargs["device"]):
        runner = LanguageModelSAETrainingRunner(
            cfg,
            override_dataset=corpus_dataset(training_tokens_of(corpus, spec)),
            override_model=loaded.model,
            override_sae=sae,
        )
        trained = runner.run()
    return trained.eval(), time.perf_counter() - start


def train_many(
    loaded: LoadedSubject, corpus: Corpus, specs: Sequence[SAESpec]
) -> tuple[list[Any], float]:
    """([trained TrainingSAE per spec], seconds) through ``MultiSAETrainingRunner``: each
    model forward (stopping after the deepest hook's block) feeds every SAE; several SAEs
    may read the same hook."""
    from sae_lens import MultiSAETrainingRunner, MultiSAETrainingRunnerConfig

    check_compatible(specs)
    first = specs[0]
    kwargs = runner_kwargs(first, loaded, corpus)
    saes = {
        f"sae{i}": new_training_sae(s, hook_width(loaded.model, s.hook_name), kwargs["device"])
        for i, s in enumerate(specs)
    }
    cfg = MultiSAETrainingRunnerConfig(
        saes={name: sae.cfg for name, sae in saes.items()},
        hook_names={f"sae{i}": s.hook_name for i, s in enumerate(specs)},
        **kwargs,
    )
    start = time.perf_counter()
    with _isolated_run(first.seed, kwargs["device"]):
        runner = MultiSAETrainingRunner(
            cfg,
            override_dataset=corpus_dataset(training_tokens_of(corpus, first)),
            override_model=loaded.model,
            override_saes=saes,
        )
        trained = runner.run()
    return [trained[f"sae{i}"].eval() for i in range(len(specs))], time.perf_counter() - start


def to_inference(training_sae: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(inference config dict, inference state dict) exactly as sae-lens'
    ``save_inference_model`` would write them (TopK folds its decoder norms here)."""
    state = {k: v.detach().clone() for k, v in training_sae.state_dict().items()}
    training_sae.process_state_dict_for_saving_inference(state)
    return training_sae.cfg.get_inference_sae_cfg_dict(), state


def _inference(training_sae: Any, device: str) -> tuple[Any, dict[str, Any], dict[str, torch.Tensor]]:
    cfg_dict, state = to_inference(training_sae)
    return sae_from_state(cfg_dict, state, device), cfg_dict, state


def train_sae(loaded: LoadedSubject, corpus: Corpus, spec: SAESpec) -> tuple[Any, dict[str, float]]:
    """(inference SAE, quality on the held-out contexts) through sae-lens'
    ``LanguageModelSAETrainingRunner``; nothing cached."""
    trained, _ = train_one(loaded, corpus, spec)
    sae, _, _ = _inference(trained, str(loaded.model.cfg.device))
    return sae, sae_quality(sae, loaded, heldout_tokens_of(corpus, spec))


def _parts(loaded: LoadedSubject, corpus: Corpus, spec: SAESpec) -> dict[str, Any]:
    return {"weights": loaded.weight_hash, "corpus": corpus.sha256, "spec": spec}


def _entries(trained: Sequence[Any], loaded: LoadedSubject, corpus: Corpus,
             specs: Sequence[SAESpec], seconds: float) -> list[tuple[dict, dict]]:
    """(tensors, meta) cache entries for SAEs trained together; quality measured jointly."""
    device = str(loaded.model.cfg.device)
    built = [_inference(t, device) for t in trained]
    qualities = sae_quality_many([b[0] for b in built], loaded, heldout_tokens_of(corpus, specs[0]))
    hooks = [s.hook_name for s in specs]
    return [(state, {"sae_cfg": cfg_dict, "quality": q, "train_seconds": round(seconds, 1),
                     "trained_with": hooks})
            for (_, cfg_dict, state), q in zip(built, qualities, strict=True)]


def get_or_train_saes(
    cache: ContentCache, loaded: LoadedSubject, corpus: Corpus, specs: Sequence[SAESpec]
) -> tuple[LoadedSAE, ...]:
    """Cached SAEs for ``specs``, in order. The missing ones are trained TOGETHER: one shared
    forward pass (stopping after the deepest hook's block) feeds all of them through
    ``MultiSAETrainingRunner``, costing about what the deepest SAE would alone. Specs that
    disagree on a runner-level field (RUNNER_FIELDS) go to separate passes. A lone missing
    spec goes through ``LanguageModelSAETrainingRunner``; both give the same SAE (tested).

    The first entry of a group computes the whole group and writes the other entries before
    its lock is released, so a concurrent process (pytest-xdist) waits, then reads them all.
    """
    def key(s: SAESpec) -> str:
        return cache_key(PRODUCER, VERSION, **_parts(loaded, corpus, s))

    groups: dict[tuple, list[SAESpec]] = {}
    for s in dict.fromkeys(specs):  # unique, in order
        if cache.get(PRODUCER, key(s)) is None:
            groups.setdefault(tuple(getattr(s, f) for f in RUNNER_FIELDS), []).append(s)
    for group in groups.values():
        def compute(group: list[SAESpec] = group) -> tuple[dict, dict]:
            if len(group) == 1:
                one, seconds = train_one(loaded, corpus, group[0])
                trained = [one]
            else:
                trained, seconds = train_many(loaded, corpus, group)
            entries = _entries(trained, loaded, corpus, group, seconds)
            for s, (tensors, meta) in zip(group[1:], entries[1:], strict=True):
                cache.put(PRODUCER, key(s), tensors, meta, version=VERSION,
                          parts=_parts(loaded, corpus, s), compute_seconds=seconds)
            return entries[0]

        cache.get_or_compute(PRODUCER, VERSION, _parts(loaded, corpus, group[0]), compute)
    return tuple(_read(cache, loaded, corpus, s) for s in specs)


def get_or_train_sae(cache: ContentCache, loaded: LoadedSubject, corpus: Corpus,
                     spec: SAESpec) -> LoadedSAE:
    """One cached SAE; see :func:`get_or_train_saes`."""
    return get_or_train_saes(cache, loaded, corpus, [spec])[0]


def _read(cache: ContentCache, loaded: LoadedSubject, corpus: Corpus, spec: SAESpec) -> LoadedSAE:
    def gone() -> tuple[dict, dict]:  # only if the entry was deleted between write and read
        trained, seconds = train_one(loaded, corpus, spec)
        return _entries([trained], loaded, corpus, [spec], seconds)[0]

    entry = cache.get_or_compute(PRODUCER, VERSION, _parts(loaded, corpus, spec), gone)
    sae = sae_from_state(entry.meta["sae_cfg"], entry.tensors, str(loaded.model.cfg.device))
    return LoadedSAE(
        sae=sae, spec=spec, quality=entry.meta["quality"], origin="trained-locally",
        source={"cache_key": entry.meta["key"], "train_seconds": entry.meta["train_seconds"],
                "trained_with": entry.meta["trained_with"], "subject_weight_hash": loaded.weight_hash,
                "corpus_sha256": corpus.sha256},
    )


HUB_SAES: dict[str, tuple[str, tuple[str, ...]]] = {
    "gpt2-small": ("gpt2-small-res-jb", tuple(f"blocks.{d}.hook_resid_pre" for d in (6, 8, 10, 11))),
}
"""Subjects whose residual SAEs the sources published: subject id -> (sae-lens release, ids)."""


def subject_saes(cache: ContentCache, loaded: LoadedSubject, corpus: Corpus) -> tuple[LoadedSAE, ...]:
    """The SAEs families S and R run on: the source's hub SAEs where they exist (gpt2-small:
    ``gpt2-small-res-jb`` at blocks 6/8/10/11; SubjectUnavailable offline), locally trained
    ones otherwise (:func:`harness.saes.default_sae_specs`); the MLP SAE is always trained."""
    from harness.saes import default_sae_specs, load_hub_sae

    specs = default_sae_specs(loaded.model)
    hub = HUB_SAES.get(loaded.spec.id)
    if hub is None:
        return get_or_train_saes(cache, loaded, corpus, specs)
    release, ids = hub
    device = str(loaded.model.cfg.device)
    resid = tuple(load_hub_sae(release, i, device=device) for i in ids)
    mlp = [s for s in specs if not s.hook_name.endswith("hook_resid_pre")]
    return resid + get_or_train_saes(cache, loaded, corpus, mlp)
