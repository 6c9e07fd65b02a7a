"""Family W: agreement between Method 1 (max-activating tokens) and Method 2 (weight-decoded
tokens) per neuron, with the thesis's token normalisation, and a re-pairing null.

Per neuron n, with A = set of normalised Method-1 tokens (the argmax token of each of the top-k
contexts) and B = set of normalised Method-2 top-k tokens:

- overlap = |A ∩ B|; overlap_any = overlap > 0
- jaccard = |A ∩ B| / |A ∪ B| (0 when both are empty)
- top1_match = normalised Method-1 top-1 token == normalised Method-2 top-1 token
- embed_cos = cos(mean_{t in A ids} W_E[t], mean_{t in B ids} W_E[t])
- type_match = dominant token type of Method 1's first 5 == that of Method 2's first 5
- dtr = (count of the most common normalised Method-1 token) / k  ("Dominant Token Ratio")

Null: the same statistic with neurons' Method-1 and Method-2 lists re-paired by a random
permutation (averaged over ``n_perm`` permutations, per neuron).
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

TOKEN_TYPES = ("symbol", "latin", "non_latin", "numeric", "other")
METRICS = ("overlap", "overlap_any", "jaccard", "top1_match", "embed_cos", "type_match")
DOMINANT_OF = 5


def normalize_token(s: str) -> str:
    """NFKC, drop U+FFFD replacement characters, strip whitespace (the thesis's Method-1 tokens
    had no leading space, its Method-2 tokens did)."""
    return unicodedata.normalize("NFKC", s).replace("\ufffd", "").strip()


def token_type(s: str) -> str:
    """symbol / latin / non_latin / numeric / other, for a normalised token string.

    numeric: every char a decimal digit; latin: every char a Latin letter; non_latin: every
    char a letter and at least one not Latin; symbol: every char punctuation or a symbol
    (Unicode categories P*, S*); other: empty or mixed.
    """
    if not s:
        return "other"
    if all(unicodedata.category(c) == "Nd" for c in s):
        return "numeric"
    if all(c.isalpha() for c in s):
        return "latin" if all("LATIN" in unicodedata.name(c, "") for c in s) else "non_latin"
    if all(unicodedata.category(c)[0] in "PS" for c in s):
        return "symbol"
    return "other"


def dominant_type(strings: Sequence[str]) -> str:
    """Most common type among the first DOMINANT_OF strings; ties go to TOKEN_TYPES order."""
    counts = Counter(token_type(s) for s in strings[:DOMINANT_OF])
    if not counts:
        return "other"
    best = max(counts.values())
    return next(t for t in TOKEN_TYPES if counts.get(t, 0) == best)


@dataclass(frozen=True)
class Vocabulary:
    """Normalised string of every token id of a tokenizer (decoded one id at a time)."""

    strings: tuple[str, ...]

    @classmethod
    def from_tokenizer(cls, tokenizer, d_vocab: int) -> Vocabulary:
        n = min(d_vocab, len(tokenizer))
        decoded = tokenizer.batch_decode([[i] for i in range(n)])
        return cls(tuple(normalize_token(s) for s in decoded) + ("",) * (d_vocab - n))

    def normalise(self, ids: Sequence[int]) -> list[str]:
        """Strings of ``ids`` (negative ids = unfilled slots are skipped)."""
        return [self.strings[i] for i in ids if i >= 0]

    @cached_property
    def codes(self) -> np.ndarray:
        """Per token id: the index of its normalised string among the distinct non-empty ones
        (two ids with the same normalised string share a code); -1 for an empty string."""
        index: dict[str, int] = {}
        return np.array([index.setdefault(s, len(index)) if s else -1 for s in self.strings], dtype=np.int64)

    @cached_property
    def types(self) -> np.ndarray:
        """Per token id: the index in TOKEN_TYPES of its normalised string's type."""
        return np.array([TOKEN_TYPES.index(token_type(s)) for s in self.strings], dtype=np.int64)


def mean_embeddings(W_E: torch.Tensor, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean embedding of each column's DISTINCT token ids: ids (k, n_units), -1 = unfilled.
    Returns (means (n_units, d_model), nonempty (n_units,) bool). Vectorised: a Python loop
    over tens of thousands of neurons would dominate the family's run time."""
    s, _ = torch.from_numpy(np.asarray(ids)).long().sort(dim=0)  # (k, n_units)
    dup = torch.zeros_like(s, dtype=torch.bool)
    dup[1:] = s[1:] == s[:-1]
    valid = ((s >= 0) & ~dup).unsqueeze(-1)  # (k, n_units, 1)
    emb = W_E.detach().float().cpu()[s.clamp(min=0)]  # (k, n_units, d_model)
    count = valid.sum(0)  # (n_units, 1)
    means = (emb * valid).sum(0) / count.clamp(min=1)  # (n_units, d_model)
    return means, count[:, 0] > 0


@dataclass(frozen=True)
class _Lists:
    """One method's (k, n_units) token lists in the forms the metrics need, computed once per
    list so that the null's re-pairings only permute columns (the per-neuron Python loop this
    replaces took ~40 s of family W on SmolLM2; tests/harness/test_agreement.py checks the
    two agree exactly)."""

    distinct: np.ndarray  # (k, n) sorted distinct non-empty string codes, -1 elsewhere
    size: np.ndarray  # (n,) number of distinct non-empty strings
    first: np.ndarray  # (n,) code of the first filled slot's string (-1: empty string), -2: no slot
    dominant: np.ndarray  # (n,) TOKEN_TYPES index of the dominant type of the first DOMINANT_OF
    means: torch.Tensor  # (n, d_model) mean embedding of the distinct ids
    nonempty: torch.Tensor  # (n,) bool

    @classmethod
    def of(cls, ids: np.ndarray, vocab: Vocabulary, W_E: torch.Tensor) -> _Lists:
        ids = np.asarray(ids, dtype=np.int64)
        filled = ids >= 0
        safe = np.where(filled, ids, 0)
        codes = np.where(filled, vocab.codes[safe], -1)
        distinct = np.sort(codes, axis=0)
        distinct[1:][distinct[1:] == distinct[:-1]] = -1
        has = filled.any(axis=0)
        first_row = filled.argmax(axis=0)
        first = np.where(has, codes[first_row, np.arange(ids.shape[1])], -2)
        in_first = filled & (np.cumsum(filled, axis=0) <= DOMINANT_OF)
        types = vocab.types[safe]
        counts = np.stack([((types == t) & in_first).sum(axis=0) for t in range(len(TOKEN_TYPES))])
        dominant = np.where(has, counts.argmax(axis=0), TOKEN_TYPES.index("other"))
        means, nonempty = mean_embeddings(W_E, ids)
        return cls(distinct, (distinct >= 0).sum(axis=0), first, dominant, means, nonempty)


def _paired_metrics(a: _Lists, b: _Lists, pairing: np.ndarray) -> dict[str, np.ndarray]:
    """The METRICS of neuron n's Method-1 lists ``a`` against Method-2 lists ``b[pairing[n]]``."""
    b_distinct = b.distinct[:, pairing]
    both = np.sort(np.concatenate([a.distinct, b_distinct]), axis=0)
    inter = ((both[1:] == both[:-1]) & (both[1:] >= 0)).sum(axis=0)
    union = a.size + b.size[pairing] - inter
    b_first = b.first[pairing]
    cos = torch.nn.functional.cosine_similarity(a.means.double(), b.means[pairing].double(), dim=1)
    return {
        "overlap": inter.astype(float),
        "overlap_any": (inter > 0).astype(float),
        "jaccard": np.where(union > 0, inter / np.maximum(union, 1), 0.0),
        "top1_match": ((a.first >= 0) & (a.first == b_first)).astype(float),
        "embed_cos": torch.where(a.nonempty & b.nonempty[pairing], cos, torch.nan).numpy(),
        "type_match": (a.dominant == b.dominant[pairing]).astype(float),
    }


def neuron_metrics(
    m1: np.ndarray, m2: np.ndarray, vocab: Vocabulary, W_E: torch.Tensor, pairing: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Per-neuron agreement. ``m1``, ``m2``: (k, n_units) token ids (−1 = unfilled).
    ``pairing[n]`` = which neuron's Method-2 list neuron n's Method-1 list is compared with
    (identity when None; a permutation for the null)."""
    n_units = np.asarray(m1).shape[1]
    pairing = np.arange(n_units) if pairing is None else np.asarray(pairing)
    return _paired_metrics(_Lists.of(m1, vocab, W_E), _Lists.of(m2, vocab, W_E), pairing)


def null_metrics(
    m1: np.ndarray, m2: np.ndarray, vocab: Vocabulary, W_E: torch.Tensor, rng: np.random.Generator, n_perm: int = 10
) -> dict[str, np.ndarray]:
    """Per-neuron mean of each metric over ``n_perm`` random re-pairings of the lists."""
    n_units = np.asarray(m1).shape[1]
    a, b = _Lists.of(m1, vocab, W_E), _Lists.of(m2, vocab, W_E)
    acc = {m: np.zeros(n_units) for m in METRICS}
    for _ in range(n_perm):
        res = _paired_metrics(a, b, rng.permutation(n_units))
        for m in METRICS:
            acc[m] += res[m]
    return {m: v / n_perm for m, v in acc.items()}


def dominant_token_ratio(m1: np.ndarray, vocab: Vocabulary) -> np.ndarray:
    """DTR per neuron = count of the most common normalised Method-1 token / k (k rows of m1;
    unfilled slots count in the denominator, so a neuron seen in fewer contexts scores lower)."""
    ids = np.asarray(m1, dtype=np.int64)
    k = ids.shape[0]
    codes = np.where(ids >= 0, vocab.codes[np.where(ids >= 0, ids, 0)], -1)
    same = (codes[:, None, :] == codes[None, :, :]) & (codes >= 0)[:, None, :]  # (k, k, n)
    return same.sum(axis=1).max(axis=0, initial=0) / k
