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

Held-out scoring (:class:`SplitRows`, :func:`heldout_specialists`): the candidates and the best
candidate are chosen on one set of texts (the train split) and the chosen feature is scored on
others (the held-out split): score_heldout(c) = score(c, best(c)) over the held-out texts, and c
has a specialist iff that score is > 0. Choosing the best of 5 candidates on the texts that
score it favours the one whose score is luckiest there; on texts it never saw, it is not.
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
    selection_score: int | None = None
    """``best_feature``'s score on the texts that selected it, when the other fields are
    measured on other (held-out) texts; None when one set of texts did both."""

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
                                        "candidates": list(r.candidates),
                                        "selection_score": r.selection_score}
                           for r in self.per_category},
        }


def _check(codes: np.ndarray, labels: Sequence[str]) -> np.ndarray:
    codes = np.asarray(codes, dtype=float)
    if codes.ndim != 2 or codes.shape[0] != len(labels):
        raise ValueError(f"codes must be (n_texts={len(labels)}, d_sae), got {codes.shape}")
    if np.isnan(codes).any():
        raise ValueError("NaN in SAE codes")
    return codes


def top_first(values: np.ndarray, n: int) -> np.ndarray:
    """``np.argsort(-values, kind="stable")[:n]`` (largest first, lower index on ties) by
    partition: the indices above the n-th largest value, then those equal to it in index order."""
    values = np.asarray(values)
    if n >= values.size:
        return np.argsort(-values, kind="stable")
    if n <= 0:
        return np.zeros(0, dtype=np.intp)
    cut = values[np.argpartition(-values, n - 1)[n - 1]]  # the n-th largest value
    above = np.flatnonzero(values > cut)
    tied = np.flatnonzero(values == cut)[: n - above.size]
    chosen = np.concatenate([above, tied])  # each part in index order
    return chosen[np.argsort(-values[chosen], kind="stable")]


def _top_first_rows(values: np.ndarray, n: int) -> np.ndarray:
    """:func:`top_first` of every row of ``values`` (rows x d) at once: (rows, min(n, d)) ids,
    largest first, lower id on ties."""
    rows, d = values.shape
    n = min(n, d)
    if n <= 0:
        return np.zeros((rows, 0), dtype=np.intp)
    if n == d:
        return np.argsort(-values, axis=1, kind="stable")
    cut = np.take_along_axis(values, np.argpartition(-values, n - 1, axis=1)[:, n - 1: n], axis=1)
    above = values > cut  # (rows, d)
    tied = values == cut
    room = n - above.sum(axis=1, keepdims=True)  # ties admitted per row, in id order
    chosen = above | (tied & (np.cumsum(tied, axis=1) <= room))  # exactly n per row
    ids = np.nonzero(chosen)[1].reshape(rows, n)  # each row's ids in increasing order
    vals = np.take_along_axis(values, ids, axis=1)
    return np.take_along_axis(ids, np.argsort(-vals, axis=1, kind="stable"), axis=1)


def find_specialists(
    codes: np.ndarray, labels: Sequence[str], threshold: float, n_candidates: int = N_CANDIDATES
) -> SpecialistTable:
    """The source's specialist search (module docstring) for every category in ``labels``.

    Family S runs it ~10^4 times per claim (bootstraps and nulls), so it works in the codes'
    own float dtype (no float64 copy of the whole matrix), finds the candidates by partition
    and compares only their columns, in float64, with the threshold: the same table as the
    direct search (tests/harness/saes/test_specialists.py compares them)."""
    codes = np.asarray(codes)
    if codes.dtype.kind != "f":
        codes = codes.astype(float)
    if codes.ndim != 2 or codes.shape[0] != len(labels):
        raise ValueError(f"codes must be (n_texts={len(labels)}, d_sae), got {codes.shape}")
    if np.isnan(codes).any():
        raise ValueError("NaN in SAE codes")
    labels_arr = np.asarray(labels)
    results = []
    for cat in sorted(set(labels)):
        inside = labels_arr == cat
        peak = codes[inside].max(axis=0)  # (d_sae,)
        # Highest max activation first, lower feature id on ties (a stable sort of -peak).
        candidates = top_first(peak, n_candidates)
        strong = codes[:, candidates].astype(np.float64) > threshold  # (n_texts, n_candidates)
        ins = strong[inside].sum(axis=0)
        outs = strong[~inside].sum(axis=0)
        scores = ins - outs
        j = int(np.argmax(scores))  # first maximum = candidate order
        results.append(CategoryResult(cat, int(candidates[j]), int(scores[j]), int(ins[j]),
                                      int(outs[j]), tuple(int(c) for c in candidates)))
    return SpecialistTable(float(threshold), tuple(results))


@dataclass(frozen=True)
class SplitRows:
    """Which texts select specialists and which score them, as indices into all texts (repeats
    allowed: a bootstrap resample), with every text's category label (permuted under a
    label-shuffle null)."""

    select: np.ndarray
    """(n_select,) int: the texts that choose candidates and the best one (the train split)."""
    score: np.ndarray
    """(n_score,) int: the texts the chosen features are scored on (the held-out split)."""
    labels: tuple[str, ...]
    """Category of every text (all splits), in the texts file's order."""

    @classmethod
    def from_splits(cls, labels: Sequence[str], splits: Sequence[str], select: str = "train",
                    score: str = "heldout") -> SplitRows:
        sp = np.asarray(splits)
        return cls(np.flatnonzero(sp == select), np.flatnonzero(sp == score), tuple(labels))

    def labels_of(self, rows: np.ndarray) -> list[str]:
        return [self.labels[i] for i in rows]


def score_selected(table: SpecialistTable, codes: np.ndarray, labels: Sequence[str]) -> SpecialistTable:
    """``table``'s chosen features (``best_feature`` per category, selected on other texts)
    scored on ``codes`` (n_texts, d_sae) / ``labels`` by the module docstring's score, at the
    table's threshold; candidates kept, the selecting score kept as ``selection_score``."""
    codes = _check(codes, labels)
    labels_arr = np.asarray(labels)
    results = []
    for r in table.per_category:
        inside = labels_arr == r.category
        strong = codes[:, r.best_feature] > table.threshold  # (n_texts,)
        ins, outs = int(strong[inside].sum()), int(strong[~inside].sum())
        results.append(CategoryResult(r.category, r.best_feature, ins - outs, ins, outs, r.candidates,
                                      selection_score=r.best_score))
    return SpecialistTable(table.threshold, tuple(results))


def row_tops(codes: np.ndarray, n_candidates: int = N_CANDIDATES) -> np.ndarray:
    """Every text's own :func:`top_first` features, (n_texts, min(n, d_sae)): the candidates of
    any set of texts are among the union of its texts' rows (see :func:`heldout_specialists`)."""
    return _top_first_rows(np.asarray(codes), n_candidates)


def heldout_specialists(codes: np.ndarray, rows: SplitRows, threshold: float,
                        n_candidates: int = N_CANDIDATES, *, check: bool = True,
                        tops: np.ndarray | None = None) -> SpecialistTable:
    """Specialists selected on ``rows.select`` (:func:`find_specialists`) and scored on
    ``rows.score`` (:func:`score_selected`): ``count`` is the number of categories whose
    selected feature scores > 0 on the held-out texts.

    Family S evaluates this ~3 x 10^4 times per run (bootstraps and label nulls over several
    SAEs), so it reads ``codes`` (all texts, n_texts x d_sae) in place instead of copying and
    converting the selected and scored rows, and, given ``tops`` (:func:`row_tops` of
    ``codes``), looks for a category's candidates only among its texts' own top features: a
    feature among the n highest peaks of a set of texts is among the n highest features of the
    text where it peaks (else n features rank above it in that text, hence in the peaks, ties
    by lower id included), so the union of the texts' rows holds every candidate. Max,
    partition and the float64 comparisons are exact: the table equals
    ``score_selected(find_specialists(...), ...)`` (tested on random splits and ties), at
    about half the time. ``check=False`` skips the NaN check for callers that checked
    ``codes`` once."""
    codes = np.asarray(codes)
    if codes.dtype.kind != "f":
        codes = codes.astype(float)
    if codes.ndim != 2 or codes.shape[0] != len(rows.labels):
        raise ValueError(f"codes must be (n_texts={len(rows.labels)}, d_sae), got {codes.shape}")
    if check and np.isnan(codes).any():
        raise ValueError("NaN in SAE codes")
    if tops is not None and tops.shape != (codes.shape[0], min(n_candidates, codes.shape[1])):
        raise ValueError(f"tops must be row_tops(codes, {n_candidates}), got shape {tops.shape}")
    labels = np.asarray(rows.labels)
    sel_labels, sco_labels = labels[rows.select], labels[rows.score]
    chosen = []
    for cat in sorted(set(sel_labels.tolist())):
        inside = sel_labels == cat
        mine = rows.select[inside]
        if tops is None:
            candidates = top_first(codes[mine].max(axis=0), n_candidates)
        else:
            pool = np.unique(tops[mine])  # increasing ids: top_first's tie order is kept
            candidates = pool[top_first(codes[np.ix_(mine, pool)].max(axis=0), n_candidates)]
        strong = codes[np.ix_(rows.select, candidates)].astype(np.float64) > threshold  # (n_sel, n_cand)
        ins, outs = strong[inside].sum(axis=0), strong[~inside].sum(axis=0)
        j = int(np.argmax(ins - outs))  # first maximum = candidate order
        chosen.append((cat, int(candidates[j]), int(ins[j] - outs[j]), candidates))
    best = np.array([c[1] for c in chosen], dtype=np.intp)
    fired = codes[np.ix_(rows.score, best)].astype(np.float64) > threshold  # (n_score, n_cats)
    results = []
    for k, (cat, feature, selection_score, candidates) in enumerate(chosen):
        inside = sco_labels == cat
        ins, outs = int(fired[inside, k].sum()), int(fired[~inside, k].sum())
        results.append(CategoryResult(cat, feature, ins - outs, ins, outs,
                                      tuple(int(c) for c in candidates),
                                      selection_score=selection_score))
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


def most_frequent_coverage(codes: np.ndarray, scored: np.ndarray | None = None) -> tuple[int, float]:
    """(feature, share of texts on which it is active (> 0)) for the most frequent feature of
    ``codes`` (lower id on ties); the share is measured on ``scored`` (other texts' codes: the
    held-out split) when given, else on ``codes``."""
    active = (np.asarray(codes) > 0).sum(axis=0)  # (d_sae,)
    f = int(np.argmax(active))
    if scored is None:
        return f, float(active[f] / codes.shape[0])
    scored = np.asarray(scored)
    return f, float((scored[:, f] > 0).sum() / scored.shape[0])


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


def resample_split(rows: SplitRows, rng: np.random.Generator) -> SplitRows:
    """A stratified bootstrap of both splits: each split's texts resampled within categories
    (:func:`resample_within_categories`), so selection and scoring both vary."""
    sel = rows.select[resample_within_categories(rows.labels_of(rows.select), rng)]
    sco = rows.score[resample_within_categories(rows.labels_of(rows.score), rng)]
    return SplitRows(sel, sco, rows.labels)


def shuffle_within_splits(rows: SplitRows, rng: np.random.Generator) -> SplitRows:
    """The category labels permuted among the selecting texts and, independently, among the
    scoring texts (each split keeps its category sizes): selection and scoring when categories
    mean nothing."""
    labels = np.array(rows.labels, dtype=object)
    for idx in (rows.select, rows.score):
        labels[idx] = rng.permutation(labels[idx])
    return SplitRows(rows.select, rows.score, tuple(labels.tolist()))


def split_bootstrap(rows: SplitRows, statistic: Callable[[SplitRows], float],
                    rng: np.random.Generator, n_resamples: int) -> np.ndarray:
    """``statistic`` over ``n_resamples`` :func:`resample_split` resamples, as a float array."""
    return np.array([statistic(resample_split(rows, rng)) for _ in range(n_resamples)], dtype=float)


def split_label_null(rows: SplitRows, statistic: Callable[[SplitRows], float],
                     rng: np.random.Generator, n_resamples: int) -> np.ndarray:
    """``statistic`` under ``n_resamples`` :func:`shuffle_within_splits` label permutations:
    what a statistic of specialists gives when categories mean nothing (for
    harness.statistics.stats.null_estimate)."""
    return np.array([statistic(shuffle_within_splits(rows, rng)) for _ in range(n_resamples)], dtype=float)


TRIGGER_TOKENS = 3
"""A specialist's trigger tokens: its 3 token ids of highest code mass inside its category."""
MIN_OUTSIDE = 3
"""A trigger token is kept if it occurs at least 3 times outside the category."""


def trigger_ratio(z: np.ndarray, tokens: np.ndarray, keep: np.ndarray, inside: np.ndarray,
                  select: np.ndarray | None = None, score: np.ndarray | None = None,
                  n_triggers: int = TRIGGER_TOKENS, min_outside: int = MIN_OUTSIDE) -> dict:
    """How often a feature fires on its trigger tokens outside its category vs inside.

    ``z`` (n_texts, pos) the feature's per-token code, ``tokens`` (n_texts, pos) token ids,
    ``keep`` (n_texts, pos) the positions to count (content tokens), ``inside`` (n_texts,) the
    category's texts; ``select`` / ``score`` (n_texts,) bool: the texts that choose the trigger
    tokens and the texts they are measured on (both default to all texts; family S chooses on
    the train split and measures on the held-out one).

    Trigger tokens = the ``n_triggers`` token ids carrying most of the feature's code mass in
    the category's selecting texts (ties: smaller id); kept if they occur >= ``min_outside``
    times outside the category among the scoring texts. ratio = firing rate (code > 0) on the
    kept triggers' outside occurrences / on their inside occurrences, both among the scoring
    texts: a syntax detector fires on its tokens wherever they occur (ratio near 1), a topic
    detector only inside its category (ratio near 0). NaN when no trigger is kept, or the kept
    ones never occur (``n_in`` 0) or never fire inside the category among the scoring texts."""
    n = len(inside)
    select = np.ones(n, dtype=bool) if select is None else np.asarray(select, dtype=bool)
    score = np.ones(n, dtype=bool) if score is None else np.asarray(score, dtype=bool)
    chooser = keep & (inside & select)[:, None]
    ins = keep & (inside & score)[:, None]
    outs = keep & (~inside & score)[:, None]
    ids, inv = np.unique(tokens[chooser], return_inverse=True)
    mass = np.bincount(inv, weights=z[chooser], minlength=ids.size)
    order = np.argsort(-mass, kind="stable")
    triggers = [int(ids[i]) for i in order[:n_triggers] if mass[i] > 0]
    kept = [t for t in triggers if int(((tokens == t) & outs).sum()) >= min_outside]
    if not kept:
        return {"triggers": triggers, "kept": [], "ratio": float("nan")}
    on = np.isin(tokens, kept)
    n_in, n_out = int((on & ins).sum()), int((on & outs).sum())
    rate_in = float((z[on & ins] > 0).mean()) if n_in else float("nan")
    rate_out = float((z[on & outs] > 0).mean())
    scored = keep & score[:, None]
    inside_mass = float(z[ins].sum() / max(z[scored].sum(), 1e-30))
    return {"triggers": triggers, "kept": kept, "rate_in": rate_in, "rate_out": rate_out,
            "n_in": n_in, "n_out": n_out,
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
