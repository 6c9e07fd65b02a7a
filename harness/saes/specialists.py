"""Family S: category specialists among SAE features, with the source notebooks' definitions.

Input: ``codes`` (n_texts, d_sae), one SAE code per text (``sae.encode`` of the text's pooled
activation), and each text's category.

- strong(t, f)  = codes[t, f] > threshold  (strict, as the source)
- candidates(c) = the ``n_candidates`` features with the highest max activation over the texts
  of category c (ties: lower feature id first)
- score(c, f)   = #{t in c : strong(t, f)} - #{t not in c : strong(t, f)}
- best(c)       = the candidate with the highest score (ties: candidate order)
- c has a specialist iff score(c, best(c)) > 0;  count = number of such categories
- most-frequent-feature coverage = max_f #{t : codes[t, f] > 0} / n_texts
- peak activation = max_{t, f} codes[t, f]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SOURCE_THRESHOLD = 5.0
"""The source's strong-activation threshold, specific to the gpt2-small-res-jb SAEs' scale."""
SCALE_FREE_QUANTILE = 0.99
"""The scale-free alternative: this quantile of the SAE's positive code values on the texts."""
N_CANDIDATES = 5


@dataclass(frozen=True)
class CategoryResult:
    category: str
    best_feature: int
    best_score: int
    inside_strong: int
    outside_strong: int
    candidates: tuple[int, ...]

    @property
    def has_specialist(self) -> bool:
        return self.best_score > 0


@dataclass(frozen=True)
class SpecialistTable:
    threshold: float
    per_category: tuple[CategoryResult, ...]

    @property
    def count(self) -> int:
        return sum(r.has_specialist for r in self.per_category)

    def by_category(self) -> dict[str, CategoryResult]:
        return {r.category: r for r in self.per_category}

    def to_dict(self) -> dict:
        return {
            "threshold": self.threshold,
            "count": self.count,
            "categories": {r.category: {"best_feature": r.best_feature, "score": r.best_score,
                                        "inside_strong": r.inside_strong,
                                        "outside_strong": r.outside_strong,
                                        "candidates": list(r.candidates)}
                           for r in self.per_category},
        }


def _check(codes: np.ndarray, labels: Sequence[str]) -> np.ndarray:
    codes = np.asarray(codes, dtype=float)
    if codes.ndim != 2 or codes.shape[0] != len(labels):
        raise ValueError(f"codes must be (n_texts={len(labels)}, d_sae), got {codes.shape}")
    if np.isnan(codes).any():
        raise ValueError("NaN in SAE codes")
    return codes


def find_specialists(
    codes: np.ndarray, labels: Sequence[str], threshold: float, n_candidates: int = N_CANDIDATES
) -> SpecialistTable:
    """The source's specialist search (module docstring) for every category in ``labels``."""
    codes = _check(codes, labels)
    labels_arr = np.asarray(labels)
    strong = codes > threshold  # (n_texts, d_sae)
    results = []
    for cat in sorted(set(labels)):
        inside = labels_arr == cat
        peak = codes[inside].max(axis=0)  # (d_sae,)
        # Highest max activation first, lower feature id on ties: stable sort of -peak.
        candidates = np.argsort(-peak, kind="stable")[:n_candidates]
        ins = strong[inside][:, candidates].sum(axis=0)
        outs = strong[~inside][:, candidates].sum(axis=0)
        scores = ins - outs
        j = int(np.argmax(scores))  # first maximum = candidate order
        results.append(CategoryResult(cat, int(candidates[j]), int(scores[j]), int(ins[j]),
                                      int(outs[j]), tuple(int(c) for c in candidates)))
    return SpecialistTable(float(threshold), tuple(results))


def scale_free_threshold(codes: np.ndarray, q: float = SCALE_FREE_QUANTILE) -> float:
    """The q-quantile of the positive code values (the SAE's own scale); inf if none."""
    pos = np.asarray(codes)[np.asarray(codes) > 0]
    return float(np.quantile(pos, q)) if pos.size else float("inf")


def most_frequent_coverage(codes: np.ndarray) -> tuple[int, float]:
    """(feature, share of texts on which it is active (> 0)) for the most frequent feature."""
    active = (np.asarray(codes) > 0).sum(axis=0)  # (d_sae,)
    f = int(np.argmax(active))
    return f, float(active[f] / codes.shape[0])


def peak_activation(codes: np.ndarray) -> float:
    return float(np.max(codes))


def resample_within_categories(labels: Sequence[str], rng: np.random.Generator) -> np.ndarray:
    """Indices of a stratified bootstrap sample: each category's texts resampled with
    replacement, category sizes kept."""
    labels_arr = np.asarray(labels)
    idx = [rng.choice(np.flatnonzero(labels_arr == c), size=int((labels_arr == c).sum()))
           for c in sorted(set(labels))]
    return np.concatenate(idx)
