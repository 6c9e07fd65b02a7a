"""The background corpus: built offline and deterministically from what pip and Python install.

Sources (all ship with CPython itself, so every machine has them without a download):

- ``pydoc_topics``: the Python reference's topic texts (``pydoc_data.topics``), technical
  English prose;
- ``stdlib_docstrings``: module, class and function docstrings of the standard library
  (parsed with ``ast``, never imported), English prose with inline code;
- ``stdlib_source``: the standard library's source code with docstrings left in.

The same Python version and tokenizer give the same tokens; a different Python version gives
a different stdlib and so a different corpus hash, which is why the hash and the Python version
go into the evidence. Documents are shuffled by a seeded generator, concatenated per source,
tokenized without special tokens, cut into windows of ``context_len - 1`` tokens and given a
BOS; contexts are then drawn per source by ``weights``.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import os
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    from harness.data.user_corpus import UserCorpus

SOURCES = ("pydoc_topics", "stdlib_docstrings", "stdlib_source")
USER_SOURCE = "user"
"""The one source of a recipe built on the user's corpus (``--corpus PATH``)."""
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__",
              "turtledemo", "ensurepip", "dist-packages", "pydoc_data", "encodings"}
"""Tests, GUI demos, vendored wheels, and codec tables (pages of hex literals)."""
MAX_SOURCE_CHARS = 20_000
"""Per-file cap for ``stdlib_source`` so a few huge modules do not dominate."""


class CorpusError(ValueError):
    """A recipe that cannot be built."""


@dataclass(frozen=True)
class CorpusRecipe:
    """Everything that determines the corpus (with the tokenizer and the Python version)."""

    n_contexts: int = 2048
    """Number of contexts (rows)."""
    context_len: int = 128
    """Tokens per context, BOS included."""
    seed: int = 0
    """Seed of the document shuffle and of the context draw."""
    sources: tuple[str, ...] = SOURCES
    """Which sources to mix (names from SOURCES)."""
    weights: tuple[float, ...] = (0.4, 0.3, 0.3)
    """Share of contexts from each source, in the order of ``sources``."""
    user: UserCorpus | None = None
    """The user's corpus (``--corpus PATH``, see :mod:`harness.data.user_corpus`) instead of
    CPython's text; then ``sources`` is ``(USER_SOURCE,)``. Its raw-text sha256 is part of the
    recipe, so of every cache key the recipe is in."""

    def __post_init__(self) -> None:
        if self.n_contexts < 1 or self.context_len < 2:
            raise CorpusError("need n_contexts >= 1 and context_len >= 2")
        if self.user is not None and (self.sources, self.weights) != ((USER_SOURCE,), (1.0,)):
            raise CorpusError(f"a recipe on the user's corpus has the one source {USER_SOURCE!r} "
                              "(use CorpusRecipe.of_user)")
        unknown = set(self.sources) - set(SOURCES) - ({USER_SOURCE} if self.user else set())
        if unknown or not self.sources:
            raise CorpusError(f"unknown corpus sources {sorted(unknown)}; known: {SOURCES}")
        if len(self.weights) != len(self.sources) or any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
            raise CorpusError("weights must be non-negative, one per source, not all zero")

    @classmethod
    def of_user(cls, user: UserCorpus, *, n_contexts: int = 2048, context_len: int = 128,
                seed: int = 0) -> CorpusRecipe:
        """The recipe packing the user's corpus like the default (same sizes and seed)."""
        return cls(n_contexts=n_contexts, context_len=context_len, seed=seed,
                   sources=(USER_SOURCE,), weights=(1.0,), user=user)

    @property
    def n_tokens(self) -> int:
        return self.n_contexts * self.context_len

    @property
    def description(self) -> str:
        """One line for the evidence: what the corpus is made of."""
        if self.user is not None:
            return self.user.description
        mix = ", ".join(f"{s} {w / sum(self.weights):.0%}"
                        for s, w in zip(self.sources, self.weights, strict=True) if w > 0)
        return (f"the default background corpus: CPython {sys.version.split()[0]}'s own text, "
                f"mostly code and technical prose ({mix} of the contexts)")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        if self.user is not None:
            out["user"] = self.user.to_dict()
        return out


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for dirpath, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        files += [Path(dirpath) / n for n in sorted(names) if n.endswith(".py")]
    return files


def _docstrings(path: Path) -> Iterator[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40:
                yield doc


def documents(source: str) -> list[str]:
    """The documents of one source, in a fixed order (read once per process: they depend only
    on the Python installation; callers get a fresh list)."""
    return list(_documents(source))


@functools.cache
def _documents(source: str) -> tuple[str, ...]:
    return tuple(_read_documents(source))


def _read_documents(source: str) -> list[str]:
    if source == "pydoc_topics":
        from pydoc_data.topics import topics

        return [topics[k] for k in sorted(topics)]
    if source == "stdlib_docstrings":
        return [d for f in _stdlib_files() for d in _docstrings(f)]
    if source == "stdlib_source":
        out = []
        for f in _stdlib_files():
            try:
                out.append(f.read_text(encoding="utf-8")[:MAX_SOURCE_CHARS])
            except UnicodeDecodeError:
                continue
        return out
    raise CorpusError(f"unknown corpus source {source!r}")


@dataclass(frozen=True)
class Corpus:
    """Fixed-length token contexts plus where they came from."""

    tokens: torch.Tensor  # (n_contexts, context_len) int64, BOS at position 0
    source_of: torch.Tensor  # (n_contexts,) int64 index into recipe.sources
    recipe: CorpusRecipe
    sha256: str
    """Hash of the token bytes (the content every harvested statistic depends on)."""
    tokenizer_sha256: str
    """Hash of the tokenizer's serialized vocabulary and rules."""

    def provenance(self) -> dict[str, Any]:
        counts = torch.bincount(self.source_of, minlength=len(self.recipe.sources)).tolist()
        return {
            "description": self.recipe.description,
            "recipe": self.recipe.to_dict(),
            "sha256": self.sha256,
            "n_tokens": int(self.tokens.numel()),
            "contexts_per_source": dict(zip(self.recipe.sources, counts, strict=True)),
            "python": sys.version.split()[0],
            "tokenizer_sha256": self.tokenizer_sha256,
        }


def _windows(tokenizer: Any, docs: list[str], width: int,
             rng: np.random.Generator) -> tuple[torch.Tensor, int]:
    """(windows (n_windows, width), tokens of the joined text): the documents in seeded order,
    joined by the tokenizer's EOS, tokenized, cut into ``width``-token windows."""
    order = rng.permutation(len(docs))
    sep = tokenizer.eos_token or "\n\n"
    text = sep.join(docs[i] for i in order)
    ids = _encode(tokenizer, text)
    n = len(ids) // width
    return torch.tensor(ids[: n * width], dtype=torch.long).view(n, width), len(ids)


_ENCODED: dict[tuple[str, str], np.ndarray] = {}
"""Token ids of the last few (tokenizer, text) pairs of this process: a source's shuffled text
is the same for the same seed, and tokenizing it takes seconds (the suite's tests build small
corpora from the same recipes repeatedly)."""
_ENCODED_MAX = 6


def _encode(tokenizer: Any, text: str) -> np.ndarray:
    key = (tokenizer_hash(tokenizer), hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest())
    if key not in _ENCODED:
        while len(_ENCODED) >= _ENCODED_MAX:
            del _ENCODED[next(iter(_ENCODED))]
        ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
        ids.setflags(write=False)
        _ENCODED[key] = ids
    return _ENCODED[key]


def build_corpus(tokenizer: Any, recipe: CorpusRecipe = CorpusRecipe()) -> Corpus:
    """Tokenize the recipe's sources with ``tokenizer`` (a transformers tokenizer)."""
    rng = np.random.default_rng([recipe.seed, 0xC0FFEE])
    bos = tokenizer.bos_token_id
    if bos is None:
        raise CorpusError("the tokenizer has no BOS token; contexts need one at position 0")
    w = np.asarray(recipe.weights, dtype=float)
    want = np.floor(w / w.sum() * recipe.n_contexts).astype(int)
    want[np.argmax(w)] += recipe.n_contexts - want.sum()  # rounding remainder to the largest
    rows, src = [], []
    for i, (name, n_want) in enumerate(zip(recipe.sources, want, strict=True)):
        if n_want == 0:
            continue
        docs = recipe.user.documents() if recipe.user is not None else documents(name)
        windows, n_tokens = _windows(tokenizer, docs, recipe.context_len - 1, rng)
        if len(windows) < n_want:
            raise CorpusError(_too_few(recipe, name, n_tokens, int(n_want)))
        pick = np.sort(rng.choice(len(windows), size=int(n_want), replace=False))
        rows.append(windows[torch.from_numpy(pick)])
        src.append(torch.full((int(n_want),), i, dtype=torch.long))
    body = torch.cat(rows)  # (n_contexts, context_len - 1)
    source_of = torch.cat(src)
    perm = torch.from_numpy(rng.permutation(len(body)))
    tokens = torch.cat([torch.full((len(body), 1), bos, dtype=torch.long), body[perm]], dim=1)
    digest = hashlib.sha256(tokens.numpy().tobytes()).hexdigest()
    return Corpus(
        tokens=tokens,
        source_of=source_of[perm],
        recipe=recipe,
        sha256=digest,
        tokenizer_sha256=tokenizer_hash(tokenizer),
    )


def _too_few(recipe: CorpusRecipe, name: str, n_tokens: int, want: int) -> str:
    """The error for a source too small for its share: what is needed against what is there."""
    body = recipe.context_len - 1
    have = n_tokens // body
    if recipe.user is None:
        return (f"source {name} yields {have} contexts of {recipe.context_len} tokens, the "
                f"recipe asks for {want}: lower n_contexts or context_len")
    return (f"--corpus {recipe.user.path} is too small: {want} contexts of {recipe.context_len} "
            f"tokens (each {body} text tokens + BOS) need {want * body:,} text tokens, and it "
            f"tokenizes to {n_tokens:,} ({have} contexts): give more text, or lower "
            f"--corpus-contexts (to {have} at this length) or --corpus-context-len")


def tokenizer_hash(tokenizer: Any) -> str:
    """sha256 of a fast tokenizer's JSON serialization (vocabulary, merges, normalizers)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise CorpusError(f"{type(tokenizer).__name__} is not a fast tokenizer; cannot hash it")
    return hashlib.sha256(backend.to_str().encode()).hexdigest()
