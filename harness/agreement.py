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


def neuron_metrics(
    m1: np.ndarray, m2: np.ndarray, vocab: Vocabulary, W_E: torch.Tensor, pairing: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Per-neuron agreement. ``m1``, ``m2``: (k, n_units) token ids (−1 = unfilled).
    ``pairing[n]`` = which neuron's Method-2 list neuron n's Method-1 list is compared with
    (identity when None; a permutation for the null)."""
    k, n_units = m1.shape
    pairing = np.arange(n_units) if pairing is None else pairing
    out = {m: np.zeros(n_units) for m in METRICS}
    e1, ok1 = mean_embeddings(W_E, m1)
    e2, ok2 = mean_embeddings(W_E, m2[:, pairing])
    cos = torch.nn.functional.cosine_similarity(e1.double(), e2.double(), dim=1)  # (n_units,)
    out["embed_cos"] = torch.where(ok1 & ok2, cos, torch.nan).numpy()
    for n in range(n_units):
        ids1 = [int(i) for i in m1[:, n] if i >= 0]
        ids2 = [int(i) for i in m2[:, pairing[n]] if i >= 0]
        s1, s2 = vocab.normalise(ids1), vocab.normalise(ids2)
        a, b = {s for s in s1 if s}, {s for s in s2 if s}
        inter = len(a & b)
        out["overlap"][n] = inter
        out["overlap_any"][n] = float(inter > 0)
        out["jaccard"][n] = inter / len(a | b) if a | b else 0.0
        out["top1_match"][n] = float(bool(s1) and bool(s2) and s1[0] == s2[0] and s1[0] != "")
        out["type_match"][n] = float(dominant_type(s1) == dominant_type(s2))
    return out


def null_metrics(
    m1: np.ndarray, m2: np.ndarray, vocab: Vocabulary, W_E: torch.Tensor, rng: np.random.Generator, n_perm: int = 10
) -> dict[str, np.ndarray]:
    """Per-neuron mean of each metric over ``n_perm`` random re-pairings of the lists."""
    n_units = m1.shape[1]
    acc = {m: np.zeros(n_units) for m in METRICS}
    for _ in range(n_perm):
        res = neuron_metrics(m1, m2, vocab, W_E, pairing=rng.permutation(n_units))
        for m in METRICS:
            acc[m] += res[m]
    return {m: v / n_perm for m, v in acc.items()}


def dominant_token_ratio(m1: np.ndarray, vocab: Vocabulary) -> np.ndarray:
    """DTR per neuron = count of the most common normalised Method-1 token / k (k rows of m1;
    unfilled slots count in the denominator, so a neuron seen in fewer contexts scores lower)."""
    k, n_units = m1.shape
    out = np.zeros(n_units)
    for n in range(n_units):
        counts = Counter(s for s in vocab.normalise(int(i) for i in m1[:, n]) if s)
        out[n] = max(counts.values()) / k if counts else 0.0
    return out
