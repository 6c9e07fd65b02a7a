"""Categorized texts for family S: loaded from JSONL into typed objects, with a fixed split.

One JSON object per line: ``{"category": str, "text": str, "split": "train" | "heldout"}``;
``split`` is optional (default ``"train"``) and no other keys are accepted, so a misspelt key is
an error rather than a silently defaulted field. Blank lines are skipped; a UTF-8 BOM and CRLF
line endings are accepted. Every other problem raises :class:`TextsError` with a ``path:line:``
prefix. Texts are kept exactly as written (no stripping); empty or whitespace-only texts are
rejected. Over-long texts are not this module's concern: the tokenizer / capture step truncates
them and reports it.

``TextSet.sha256`` is the hash of the file's bytes (BOM and line endings included), so the same
texts in a differently formatted file hash differently; it identifies the input, not the content.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PATH = Path(__file__).resolve().parents[2] / "fixtures" / "texts" / "categorized.jsonl"
SPLITS = ("train", "heldout")
KEYS = ("category", "text", "split")


class TextsError(ValueError):
    """A categorized-texts file that cannot be used; the message starts with ``path:line:``."""


@dataclass(frozen=True)
class LabeledText:
    """One text with its category and split, and where it came from."""

    category: str
    """Category id, e.g. ``"python"``; any non-blank string in a user's file."""
    text: str
    """The text exactly as written in the file."""
    split: str
    """``"train"`` or ``"heldout"``."""
    line: int
    """1-based line number in the source file."""


@dataclass(frozen=True)
class TextSet:
    """Texts loaded from one file (or a split of them), with the file's identity."""

    texts: tuple[LabeledText, ...]
    """In file order."""
    source: str
    """Path of the file, relative to the repository when it lies inside it."""
    sha256: str
    """SHA-256 of the file's bytes (not of the parsed texts)."""

    def __post_init__(self) -> None:
        bad = sorted({t.split for t in self.texts} - set(SPLITS))
        if bad:
            raise ValueError(f"unknown split(s) {bad}; allowed: {list(SPLITS)}")

    @property
    def categories(self) -> tuple[str, ...]:
        """Sorted category ids present in this set."""
        return tuple(sorted({t.category for t in self.texts}))

    def find(self, name: str) -> str | None:
        """This set's category that a claim's ``name`` means, or None.

        Category names are user input: "Social", "social", " SOCIAL " and "Social_Media" vs
        "social media" are matched as a user means them (:func:`category_key`: case-folded,
        with runs of spaces, '-' and '_' as one space). Two categories of one file with the
        same key are refused when the file is loaded."""
        key = category_key(name)
        for c in self.categories:
            if category_key(c) == key:
                return c
        return None

    def _select(self, split: str | None) -> Iterable[LabeledText]:
        if split is None:
            return self.texts
        _check_split_name(split)
        return (t for t in self.texts if t.split == split)

    def by_category(self, split: str | None = None) -> dict[str, list[str]]:
        """Texts per category (sorted keys, file order within), from one split or all.

        Every category of the set is a key, with an empty list if the split has none of it.
        """
        out: dict[str, list[str]] = {c: [] for c in self.categories}
        for t in self._select(split):
            out[t.category].append(t.text)
        return out

    def split(self, name: str) -> TextSet:
        """The texts of one split. Its ``categories`` are those present in that split only:
        check coverage on the full set first with ``require(n, split=name)``."""
        _check_split_name(name)
        return TextSet(tuple(self._select(name)), self.source, self.sha256)

    def counts(self) -> dict[str, dict[str, int]]:
        """``{category: {"train": n, "heldout": m}}`` with sorted category keys."""
        out = {c: dict.fromkeys(SPLITS, 0) for c in self.categories}
        for t in self.texts:
            out[t.category][t.split] += 1
        return out

    def require(self, min_per_category: int, split: str | None = None) -> list[str]:
        """Categories (sorted) with fewer than ``min_per_category`` texts in ``split`` (all
        splits if None). An empty list means the requirement holds; callers turn a non-empty
        one into an inconclusive verdict naming the categories, not an error."""
        if min_per_category < 0:
            raise ValueError(f"min_per_category must be >= 0, got {min_per_category}")
        return [c for c, ts in self.by_category(split).items() if len(ts) < min_per_category]

    def provenance(self) -> dict:
        """What the evidence records about the texts a claim ran on."""
        return {
            "source": self.source,
            "sha256": self.sha256,
            "n_texts": len(self.texts),
            "counts": self.counts(),
        }


def category_key(name: str) -> str:
    """How category names are compared: case-folded, separators (spaces, '-', '_') folded
    into single spaces, stripped."""
    return " ".join(re.split(r"[\s_\-]+", name.casefold())).strip()


def _check_split_name(name: str) -> None:
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; allowed: {list(SPLITS)}")


def _display_path(path: Path) -> str:
    resolved = path.resolve()
    try:
        return resolved.relative_to(DEFAULT_PATH.parents[2]).as_posix()
    except ValueError:
        return str(resolved)


def _parse_line(raw: bytes, path: Path, line_no: int) -> LabeledText | None:
    """One physical line -> a LabeledText, or None for a blank line."""
    where = f"{path}:{line_no}:"
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TextsError(f"{where} not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TextsError(f"{where} invalid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise TextsError(f"{where} expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(KEYS))
    if unknown:
        raise TextsError(f"{where} unknown key(s) {unknown}; allowed: {list(KEYS)}")
    for key in ("category", "text"):
        if key not in obj:
            raise TextsError(f"{where} missing key {key!r}")
    values = {"split": "train", **obj}
    for key in KEYS:
        if not isinstance(values[key], str):
            raise TextsError(
                f"{where} {key!r} must be a string, got {type(values[key]).__name__}"
            )
    if values["split"] not in SPLITS:
        raise TextsError(f"{where} unknown split {values['split']!r}; allowed: {list(SPLITS)}")
    for key in ("category", "text"):
        if not values[key].strip():
            raise TextsError(f"{where} {key!r} is empty or whitespace-only")
        # json.loads accepts "\ud800"; such a string cannot be tokenized or written back.
        try:
            values[key].encode("utf-8")
        except UnicodeEncodeError:
            raise TextsError(f"{where} {key!r} contains a lone surrogate escape") from None
    return LabeledText(values["category"], values["text"], values["split"], line_no)


def load_texts(path: Path | None = None) -> TextSet:
    """Read a categorized-texts JSONL file (default: the project's fixture).

    Lines are split on ``\\n`` in the raw bytes and decoded one at a time, so a bad byte is
    reported with its line number, and characters such as U+2028 inside a text (legal
    unescaped in JSON) do not start a new line. An unreadable file is reported as line 0.
    """
    path = DEFAULT_PATH if path is None else Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        # Line 0: the file as a whole; keeps the one "path:line:" shape for every error.
        raise TextsError(f"{path}:0: cannot read ({exc.strerror or exc})") from None
    digest = hashlib.sha256(data).hexdigest()
    body = data[len(codecs.BOM_UTF8):] if data.startswith(codecs.BOM_UTF8) else data
    texts = []
    for i, raw in enumerate(body.split(b"\n"), 1):
        parsed = _parse_line(raw.removesuffix(b"\r"), path, i)
        if parsed is not None:
            texts.append(parsed)
    if not texts:
        raise TextsError(f"{path}:1: empty file (no texts)")
    first: dict[str, LabeledText] = {}
    for t in texts:
        other = first.setdefault(category_key(t.category), t)
        if other.category != t.category:
            raise TextsError(
                f"{path}:{t.line}: category {t.category!r} and {other.category!r} (line "
                f"{other.line}) differ only in case or separators: claims match category names "
                "that way, so give them one spelling")
    return TextSet(tuple(texts), _display_path(path), digest)
