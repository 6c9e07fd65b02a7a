"""A content-addressed, verified, process-safe cache for expensive tensor intermediates.

An entry is a ``dict[str, Tensor]`` plus JSON metadata, stored under a key that hashes
everything the value depends on (:func:`cache_key`). Layout::

    root/<producer>/<key[:2]>/<key>/tensors.safetensors
    root/<producer>/<key[:2]>/<key>/meta.json      # key, producer, version, parts, sha256, ...
    root/<producer>/<key>.lock                     # flock target; empty, never deleted

Writes go to a temporary directory next to the target and are renamed into place, so a
reader sees a whole entry or none. Reads check the tensors file against the sha256 recorded
in ``meta.json``; anything missing, partial or corrupt is removed and reported as a miss,
never trusted. :meth:`ContentCache.get_or_compute` holds an exclusive ``fcntl.flock`` on the
key's lock file while it checks, computes and writes, so pytest-xdist workers wanting the
same entry compute it once. The lock is released by the kernel if its holder dies.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePath
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from tqdm.auto import tqdm

try:
    import fcntl
except ImportError:  # Windows: no flock; see ContentCache.get_or_compute.
    fcntl = None  # type: ignore[assignment]

__all__ = ["ContentCache", "Entry", "cache_key", "default_cache_dir", "file_sha256", "progress"]

TENSORS_FILE = "tensors.safetensors"
META_FILE = "meta.json"
RESERVED_META = frozenset(
    {"key", "producer", "version", "parts", "sha256", "created", "compute_seconds"}
)
_PRODUCER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_KEY_RE = re.compile(r"[0-9a-f]{64}")
T = TypeVar("T")
APP_NAME = "interp-claims"


def default_cache_dir() -> Path:
    """Where the cache lives unless ``--cache-dir`` says otherwise: the user's cache directory
    as ``platformdirs`` defines it (``$XDG_CACHE_HOME/interp-claims``, else
    ``~/.cache/interp-claims`` on Linux; ``~/Library/Caches/interp-claims`` on macOS;
    ``%LOCALAPPDATA%\\interp-claims\\Cache`` on Windows). Read at call time, so the
    environment of the run decides."""
    import platformdirs

    return Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False))


# --- keys ----------------------------------------------------------------------------------


def _canonical(value: Any) -> Any:
    """Map a key part onto plain JSON types, rejecting anything whose identity is not content.

    Finite floats stay JSON numbers (``json`` writes them with ``repr``, the shortest exact
    form); non-finite ones become ``{"__float__": "nan" | "inf" | "-inf"}``. A frozen
    dataclass becomes ``{"__dataclass__": "QualName", "fields": asdict(value)}``.
    """
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, PurePath):
        raise TypeError(
            f"cache key part {value!s} is a path, and a path is not content: pass a content "
            "hash of what it points to instead (e.g. harness.activations.cache.file_sha256(path))"
        )
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"cache key dict keys must be str, got {k!r}")
            out[k] = _canonical(v)
        return out
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if not type(value).__dataclass_params__.frozen:  # type: ignore[attr-defined]
            raise TypeError(f"cache key dataclass {type(value).__qualname__} must be frozen")
        # The class's name without its module: where a class lives in the package is layout,
        # not content, and moving a module must not invalidate every cache entry.
        name = type(value).__qualname__
        return {"__dataclass__": name, "fields": _canonical(dataclasses.asdict(value))}
    raise TypeError(
        f"cache key part of type {type(value).__qualname__} is not supported: use "
        "str/int/float/bool/None, lists, str-keyed dicts, frozen dataclasses or torch.dtype"
    )


def _canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def cache_key(producer: str, version: str, **parts: Any) -> str:
    """sha256 (hex) of the canonical JSON of ``{"parts", "producer", "version"}``.

    Canonical: sorted keys, no whitespace, floats by ``repr``. Bump ``version`` whenever
    the producer's code changes what it computes.
    """
    doc = {"producer": producer, "version": version, "parts": _canonical(parts)}
    return hashlib.sha256(_canonical_json(doc).encode()).hexdigest()


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 (hex) of a file's bytes: the content hash to key on instead of its path."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def progress(iterable: Iterable[T], desc: str, total: int | None = None) -> Iterable[T]:
    """A tqdm bar on stderr for producers slower than a few seconds.

    ``disable=None`` makes tqdm silent when stderr is not a TTY (CI logs, pytest capture).
    """
    return tqdm(iterable, desc=desc, total=total, disable=None, dynamic_ncols=True)


# --- entries -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One verified cache entry. Tensors are on the CPU, contiguous, owned by the entry."""

    tensors: dict[str, torch.Tensor]
    """The stored tensors, bit-identical to what was put."""
    meta: dict[str, Any]
    """The parsed ``meta.json``: reserved fields plus the producer's own metadata."""
    path: Path
    """The entry directory."""


def _prepare(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, and no two tensors sharing storage (safetensors refuses that)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise TypeError(f"cache tensors must be dict[str, Tensor]; got {name!r}: {type(t)}")
        t = t.detach().to("cpu").contiguous()
        if t.numel() > 0:
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                t = t.clone()
                ptr = t.untyped_storage().data_ptr()
            seen.add(ptr)
        out[name] = t
    return out


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename durable. Not possible (nor needed) on Windows: skip there."""
    with suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class ContentCache:
    """Entries under an explicit ``root`` (the plugin passes ``--cache-dir``, else
    :func:`default_cache_dir`); no default here."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def entry_dir(self, producer: str, key: str) -> Path:
        """Where the entry for ``key`` lives (whether or not it exists)."""
        if not _PRODUCER_RE.fullmatch(producer):
            raise ValueError(f"producer {producer!r} must match {_PRODUCER_RE.pattern}")
        if not _KEY_RE.fullmatch(key):
            raise ValueError(f"key {key!r} is not a sha256 hex digest (see cache_key)")
        return self.root / producer / key[:2] / key

    def get(self, producer: str, key: str) -> Entry | None:
        """The verified entry, or None. A present but unverifiable entry is removed."""
        path = self.entry_dir(producer, key)
        if not path.exists():
            return None
        try:
            meta = json.loads((path / META_FILE).read_text())
            data = (path / TENSORS_FILE).read_bytes()
            if (meta["key"], meta["producer"]) != (key, producer):
                raise ValueError("meta.json names another entry")
            if hashlib.sha256(data).hexdigest() != meta["sha256"]:
                raise ValueError("tensors file does not match its sha256")
            tensors = load_safetensors(data)
        except (OSError, ValueError, KeyError, TypeError, SafetensorError):
            self._discard(path)
            return None
        return Entry(tensors=tensors, meta=meta, path=path)

    def put(
        self,
        producer: str,
        key: str,
        tensors: Mapping[str, torch.Tensor],
        meta: Mapping[str, Any],
        *,
        version: str | None = None,
        parts: Mapping[str, Any] | None = None,
        compute_seconds: float | None = None,
    ) -> Entry:
        """Write an entry atomically; if a valid one is already there, keep it and return it.

        ``version`` and ``parts`` (when given) are recorded and must reproduce ``key``.
        """
        target = self.entry_dir(producer, key)
        clash = RESERVED_META & set(meta)
        if clash:
            raise ValueError(f"meta keys {sorted(clash)} are reserved by the cache")
        if version is not None and cache_key(producer, version, **(parts or {})) != key:
            raise ValueError("key is not cache_key(producer, version, **parts)")
        data = save_safetensors(_prepare(tensors))
        record = {
            **meta,
            "key": key,
            "producer": producer,
            "version": version,
            "parts": None if parts is None else _canonical(dict(parts)),
            "sha256": hashlib.sha256(data).hexdigest(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if compute_seconds is not None:
            record["compute_seconds"] = compute_seconds
        meta_text = json.dumps(record, sort_keys=True, indent=1)  # fails before any I/O
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".tmp-{key[:12]}-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            _write_synced(tmp / TENSORS_FILE, data)
            _write_synced(tmp / META_FILE, meta_text.encode())
            _fsync_dir(tmp)
            for _ in range(3):
                try:
                    os.replace(tmp, target)
                except OSError as exc:
                    if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EACCES):
                        raise
                    theirs = self.get(producer, key)  # removes it if invalid, then we retry
                    if theirs is not None:
                        return theirs
                    continue
                _fsync_dir(target.parent)
                return Entry(tensors=load_safetensors(data), meta=record, path=target)
            raise RuntimeError(f"could not place cache entry {target}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def get_or_compute(
        self,
        producer: str,
        version: str,
        parts: Mapping[str, Any],
        compute: Callable[[], tuple[Mapping[str, torch.Tensor], Mapping[str, Any]]],
    ) -> Entry:
        """The entry for ``cache_key(producer, version, **parts)``, computing it on a miss.

        On a miss, takes an exclusive ``flock`` on ``root/<producer>/<key>.lock``, checks
        again (another process may have just written it), then computes and puts. So across
        processes sharing ``root`` the computation runs once; the others block and then read.
        Without ``fcntl`` (Windows) there is no lock: concurrent misses may each compute, the
        first rename wins, and every caller gets the winner's entry. If ``compute`` raises,
        nothing is written.
        """
        key = cache_key(producer, version, **parts)
        entry = self.get(producer, key)
        if entry is not None:
            return entry
        with self._lock(producer, key):
            entry = self.get(producer, key)
            if entry is not None:
                return entry
            start = time.perf_counter()
            tensors, meta = compute()
            seconds = time.perf_counter() - start
            return self.put(
                producer, key, tensors, meta, version=version, parts=parts, compute_seconds=seconds
            )

    @contextmanager
    def _lock(self, producer: str, key: str) -> Iterator[None]:
        # Lock files are left in place: unlinking one while another process waits on it
        # would let a third process lock a fresh inode and compute concurrently.
        lock_path = self.entry_dir(producer, key).parent.parent / f"{key}.lock"
        if fcntl is None:
            yield
            return
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _discard(self, path: Path) -> None:
        """Remove an entry: rename it aside first, so nobody sees it half-deleted."""
        trash = path.parent / f".trash-{path.name[:12]}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.replace(path, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)
