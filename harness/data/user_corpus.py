"""The user's own background corpus (``--corpus PATH``) instead of CPython's text.

What PATH may be, decided by what is there (never by a flag):

- a directory saved by Hugging Face ``datasets``' ``save_to_disk`` (it holds ``state.json``
  and ``dataset_info.json``, or ``dataset_dict.json`` for several splits): read with
  ``datasets.load_from_disk``, one document per row of its ``text`` column, every split in
  name order;
- a ``*.jsonl`` file: one JSON object per line with a string ``text`` field (blank lines are
  skipped; any other line without one is an error naming the line);
- any other file, or a directory of files (walked in sorted order, hidden names skipped): one
  document per UTF-8 text file; files that are not UTF-8 text (or hold a NUL byte) are
  skipped and listed in the recipe.

The result is a :class:`UserCorpus`: where it came from, the files and their sizes, and the
sha256 of the raw text (the documents in reading order, each length-prefixed). It enters
:class:`harness.data.corpus.CorpusRecipe`, so it is part of every cache key that the recipe is
part of: editing a file changes the hash and invalidates the tokenized corpus and everything
built on it. :func:`harness.data.corpus.build_corpus` packs its documents exactly as it packs
the default's (seeded shuffle, tokenized, cut into ``context_len - 1`` windows, BOS first).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from harness.data.corpus import CorpusError

UserCorpusKind = Literal["text", "jsonl", "hf-dataset"]

HF_DATASET_MARKERS = (("state.json", "dataset_info.json"), ("dataset_dict.json",))
"""Files ``save_to_disk`` writes: a Dataset's directory, or a DatasetDict's."""
TEXT_FIELD = "text"


@dataclass(frozen=True)
class UserCorpus:
    """A user's corpus as read at start-up: its identity for caches and the evidence."""

    path: str
    """The absolute path given with ``--corpus``."""
    kind: UserCorpusKind
    """How it was read: ``text`` (a file or directory of text files), ``jsonl``,
    ``hf-dataset`` (a ``save_to_disk`` directory)."""
    files: tuple[tuple[str, int], ...]
    """(path relative to ``path``, bytes) of every file read, in reading order (for a single
    file, its own name)."""
    n_documents: int
    """Documents read (empty ones are dropped)."""
    n_chars: int
    """Characters of text over all documents."""
    text_sha256: str
    """sha256 of the documents in reading order, each as its UTF-8 byte length (8 bytes,
    big-endian) then its bytes: the raw text's identity, whatever the tokenizer."""
    skipped: tuple[str, ...] = ()
    """Files of a text directory that were not read (not UTF-8 text), relative paths."""

    @property
    def description(self) -> str:
        """One line for the evidence: what the corpus is."""
        size = sum(n for _, n in self.files)
        skipped = f", {len(self.skipped)} non-text files skipped" if self.skipped else ""
        return (f"the user's corpus {self.path} ({self.kind}: {len(self.files)} file(s), "
                f"{size:,} bytes, {self.n_documents:,} documents, {self.n_chars:,} characters"
                f"{skipped}; text sha256 {self.text_sha256[:16]})")

    def documents(self) -> list[str]:
        """The documents, read again and checked against the hash taken at start-up (a file
        edited during the run would otherwise mix two corpora under one name)."""
        docs = _read(Path(self.path))[2] if Path(self.path).exists() else []
        now = text_sha256(docs)
        if now != self.text_sha256:
            raise CorpusError(f"--corpus {self.path} changed since the run started (text sha256 "
                              f"{self.text_sha256[:16]} then, {now[:16]} now)")
        return docs

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "description": self.description}


def read_user_corpus(path: str | os.PathLike[str]) -> UserCorpus:
    """Read and check ``path`` (see the module docstring); raises CorpusError for a missing
    path, a JSONL line without text, a dataset without a ``text`` column, or no text at all."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CorpusError(f"--corpus {p}: no such file or directory")
    p = p.resolve()
    kind, files, docs, skipped = _read(p)
    if not docs:
        raise CorpusError(f"--corpus {p}: no text in it ({kind}, {len(files)} file(s) read"
                          f"{f', {len(skipped)} non-text skipped' if skipped else ''})")
    return UserCorpus(path=str(p), kind=kind, files=tuple(files), n_documents=len(docs),
                      n_chars=sum(len(d) for d in docs), text_sha256=text_sha256(docs),
                      skipped=tuple(skipped))


def text_sha256(docs: Iterable[str]) -> str:
    """sha256 over the documents, each length-prefixed (so document boundaries count)."""
    h = hashlib.sha256()
    for doc in docs:
        data = doc.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()


def _read(p: Path) -> tuple[UserCorpusKind, list[tuple[str, int]], list[str], list[str]]:
    """(kind, files with sizes, non-empty documents, skipped files) of a corpus path."""
    if p.is_dir() and any(all((p / m).is_file() for m in marker) for marker in HF_DATASET_MARKERS):
        return "hf-dataset", _files_under(p), _dataset_documents(p), []
    if p.is_file() and p.suffix.lower() == ".jsonl":
        return "jsonl", [(p.name, p.stat().st_size)], _jsonl_documents(p), []
    if p.is_file():
        text = _text_of(p)
        if text is None:
            raise CorpusError(f"--corpus {p}: not a UTF-8 text file")
        return "text", [(p.name, p.stat().st_size)], [text] if text.strip() else [], []
    files, docs, skipped = [], [], []
    for rel, size in _files_under(p):
        text = _text_of(p / rel)
        if text is None:
            skipped.append(rel)
            continue
        files.append((rel, size))
        if text.strip():
            docs.append(text)
    return "text", files, docs, skipped


def _files_under(root: Path) -> list[tuple[str, int]]:
    """(relative path, bytes) of every file under ``root``, sorted, hidden names skipped."""
    out = []
    for dirpath, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith("."):
                f = Path(dirpath) / name
                out.append((f.relative_to(root).as_posix(), f.stat().st_size))
    return out


def _text_of(path: Path) -> str | None:
    """The file's text, or None when it is not UTF-8 text (binary: undecodable or a NUL)."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _jsonl_documents(path: Path) -> list[str]:
    docs = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"--corpus {path}, line {n}: not JSON ({exc.msg})") from None
            if not isinstance(row, dict) or TEXT_FIELD not in row:
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise CorpusError(f"--corpus {path}, line {n}: no {TEXT_FIELD!r} field "
                                  f"(found {keys}); every line needs one")
            if not isinstance(row[TEXT_FIELD], str):
                raise CorpusError(f"--corpus {path}, line {n}: {TEXT_FIELD!r} is a "
                                  f"{type(row[TEXT_FIELD]).__name__}, not a string")
            if row[TEXT_FIELD].strip():
                docs.append(row[TEXT_FIELD])
    return docs


def _dataset_documents(path: Path) -> list[str]:
    """The ``text`` column of a saved Dataset, or of every split of a DatasetDict in name
    order (a background corpus has no use for the split names; the recipe lists the files)."""
    from datasets import Dataset, load_from_disk

    loaded = load_from_disk(str(path))
    parts = [("", loaded)] if isinstance(loaded, Dataset) else sorted(loaded.items())
    docs = []
    for split, ds in parts:
        where = f"--corpus {path}" + (f" (split {split})" if split else "")
        if TEXT_FIELD not in ds.column_names:
            raise CorpusError(f"{where}: no {TEXT_FIELD!r} column (columns: {ds.column_names})")
        for i, text in enumerate(ds[TEXT_FIELD]):
            if not isinstance(text, str):
                raise CorpusError(f"{where}, row {i}: {TEXT_FIELD!r} is a {type(text).__name__}, "
                                  "not a string")
            if text.strip():
                docs.append(text)
    return docs
