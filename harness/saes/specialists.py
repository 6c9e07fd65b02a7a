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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from harness.statistics.stats import slope

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


def positive_quantile(codes: np.ndarray, q: float, empty: float = float("nan")) -> Any:
    """The q-quantile of the positive code values, a numpy scalar of the codes' dtype (as
    ``np.quantile`` gives it: S4 takes its log in that dtype); ``empty`` when no code is positive."""
    pos = np.asarray(codes)[np.asarray(codes) > 0]
    return np.quantile(pos, q) if pos.size else empty


def scale_free_threshold(codes: np.ndarray, q: float = SCALE_FREE_QUANTILE) -> float:
    """The q-quantile of the positive code values (the SAE's own scale); inf (a threshold no
    code passes) if none."""
    return float(positive_quantile(codes, q, empty=float("inf")))


def most_frequent_coverage(codes: np.ndarray) -> tuple[int, float]:
    """(feature, share of texts on which it is active (> 0)) for the most frequent feature."""
    active = (np.asarray(codes) > 0).sum(axis=0)  # (d_sae,)
    f = int(np.argmax(active))
    return f, float(active[f] / codes.shape[0])


def coverage_slope(coverages: Sequence[float], n_texts: int) -> float:
    """Slope per depth step (harness.statistics.stats.slope) of coverage shares k/n_texts,
    computed on the counts k and then divided by n_texts: shares that are equal counts can
    differ by rounding, and a slope that is 0 in exact arithmetic came out as +1.1e-17 on the
    random twin, deciding a verdict."""
    return slope([round(c * n_texts) for c in coverages]) / n_texts


def peak_activation(codes: np.ndarray) -> float:
    return float(np.max(codes))


def resample_within_categories(labels: Sequence[str], rng: np.random.Generator) -> np.ndarray:
    """Indices of a stratified bootstrap sample: each category's texts resampled with
    replacement, category sizes kept."""
    labels_arr = np.asarray(labels)
    idx = [rng.choice(np.flatnonzero(labels_arr == c), size=int((labels_arr == c).sum()))
           for c in sorted(set(labels))]
    return np.concatenate(idx)


def stratified_bootstrap(labels: Sequence[str], statistic: Callable[[np.ndarray], float],
                         rng: np.random.Generator, n_resamples: int) -> np.ndarray:
    """``statistic(rows)`` over ``n_resamples`` stratified resamples of the texts
    (:func:`resample_within_categories`), as a float array (for
    harness.statistics.stats.percentile_estimate)."""
    return np.array([statistic(resample_within_categories(labels, rng)) for _ in range(n_resamples)],
                    dtype=float)


def label_shuffle_null(labels: Sequence[str], statistic: Callable[[tuple[str, ...]], float],
                       rng: np.random.Generator, n_resamples: int) -> np.ndarray:
    """``statistic(labels)`` under ``n_resamples`` random permutations of the category labels
    across texts: what a statistic of specialists gives when categories mean nothing (for
    harness.statistics.stats.null_estimate)."""
    return np.array([statistic(tuple(rng.permutation(np.array(labels)).tolist()))
                     for _ in range(n_resamples)], dtype=float)


TRIGGER_TOKENS = 3
"""A specialist's trigger tokens: its 3 token ids of highest code mass inside its category."""
MIN_OUTSIDE = 3
"""A trigger token is kept if it occurs at least 3 times outside the category."""


def trigger_ratio(z: np.ndarray, tokens: np.ndarray, keep: np.ndarray, inside: np.ndarray,
                  n_triggers: int = TRIGGER_TOKENS, min_outside: int = MIN_OUTSIDE) -> dict:
    """How often a feature fires on its trigger tokens outside its category vs inside.

    ``z`` (n_texts, pos) the feature's per-token code, ``tokens`` (n_texts, pos) token ids,
    ``keep`` (n_texts, pos) the positions to count (content tokens), ``inside`` (n_texts,) the
    category's texts. Trigger tokens = the ``n_triggers`` token ids carrying most of the
    feature's code mass inside the category (ties: smaller id); kept if they occur >=
    ``min_outside`` times outside it. ratio = firing rate (code > 0) on kept triggers' outside
    occurrences / on their inside occurrences: a syntax detector fires on its tokens wherever
    they occur (ratio near 1), a topic detector only inside its category (ratio near 0). NaN
    when no trigger is kept or the inside rate is 0."""
    ins = keep & inside[:, None]
    outs = keep & ~inside[:, None]
    ids, inv = np.unique(tokens[ins], return_inverse=True)
    mass = np.bincount(inv, weights=z[ins], minlength=ids.size)
    order = np.argsort(-mass, kind="stable")
    triggers = [int(ids[i]) for i in order[:n_triggers] if mass[i] > 0]
    kept = [t for t in triggers if int(((tokens == t) & outs).sum()) >= min_outside]
    if not kept:
        return {"triggers": triggers, "kept": [], "ratio": float("nan")}
    on = np.isin(tokens, kept)
    rate_in = float((z[on & ins] > 0).mean())
    rate_out = float((z[on & outs] > 0).mean())
    inside_mass = float(z[ins].sum() / max(z[keep].sum(), 1e-30))
    return {"triggers": triggers, "kept": kept, "rate_in": rate_in, "rate_out": rate_out,
            "n_in": int((on & ins).sum()), "n_out": int((on & outs).sum()),
            "ratio": rate_out / rate_in if rate_in > 0 else float("nan"), "inside_mass_share": inside_mass}


def feature_token_codes(sae: Any, acts: Any, keep: Any, features: Sequence[int]) -> dict[int, np.ndarray]:
    """{feature: (n_texts, pos) per-token code}, 0 outside ``keep`` (n_texts, pos) bool:
    ``sae.encode`` of every token's activation ``acts`` (n_texts, pos, d_in), one encode for
    all the features asked for."""
    import torch

    with torch.no_grad():
        codes = sae.encode(acts.to(sae.W_enc.dtype))  # (n, pos, d_sae)
        k = keep.to(codes.device)
        return {f: (codes[..., f] * k).cpu().numpy() for f in dict.fromkeys(features)}
