"""Family S: SAE category specialists (CLAIMS.md; source notebooks seeds/002).

One vector per text: the texts run as ONE right-padded batch with BOS prepended, the hook's
activations are mean-pooled under each policy of the padding matrix (masked / unmasked x BOS
kept / dropped; ``harness.activations.capture.pool``), then ``sae.encode``-d. The source's "masked" pooling
is masked-nobos here (GPT-2's pad id is its BOS id, so the source's mask dropped BOS too) and
its "unmasked" (the bug) is unmasked-bos; the other two cells are reported beside them.

The specialist search is the source's (``harness.saes.specialists``) under two thresholds: the
source's strict 5.0 (a number specific to the gpt2-small-res-jb SAEs' scale) and a scale-free
one (the 0.99 quantile of the SAE's positive pooled codes on the train texts, source-masked
pooling).

Splits. The texts ship a train and a held-out split (``"split"`` in the texts file). Whatever
is SELECTED (the candidates, the best candidate per category, the scale-free threshold, S3's
most frequent feature, S5's trigger tokens) is chosen on the train split, and every headline
that scores a selection is measured on the held-out split: choosing the best of 5 candidates
on the texts that then score it favours the luckiest one. S1, S2 and S6 count and compare
held-out scores of the train-selected specialists (a category "has a specialist" when its
train-selected feature scores > 0 on the held-out texts), S3 measures the train-selected most
frequent feature's held-out coverage, S5 the held-out firing of train-chosen trigger tokens.
S4 (a max over all codes) and S7 (reconstruction of every token) select nothing and use every
text. Each headline records the split it selected on and the one it scored on, with their
sizes. Intervals resample texts within categories (within each split); nulls shuffle the
category labels (within each split). A texts file without held-out rows (the split is
optional, default train) ends S1, S2, S3, S5 and S6 inconclusive/too-few-texts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from harness.activations.capture import (
    POOLING_POLICIES,
    PoolingPolicy,
    block_index,
    cached_capture,
    first_content_position,
    pool,
    tokenize,
)
from harness.evidence.figures import pyplot
from harness.saes.sources import depth_trend_problem
from harness.saes.specialists import (
    MIN_OUTSIDE,
    SCALE_FREE_QUANTILE,
    SOURCE_THRESHOLD,
    TRIGGER_TOKENS,
    SplitRows,
    coverage_slope,
    feature_token_codes,
    heldout_specialists,
    most_frequent_coverage,
    peak_activation,
    positive_quantile,
    resample_split,
    row_tops,
    scale_free_threshold,
    split_bootstrap,
    split_label_null,
    stratified_bootstrap,
    trigger_ratio,
)
from harness.statistics.stats import (
    bootstrap_indices,
    exact,
    null_estimate,
    percentile_estimate,
    slope,
    spearman,
)

MIN_TEXTS_PER_CATEGORY = 10  # the source's 10 per category: in the train split where it selects
MIN_HELDOUT_PER_CATEGORY = 5  # texts per category that score a selection (the fixture ships 6)
SELECT, SCORE = "train", "heldout"
N_BOOT = 300
N_NULL = 50
MASKED = PoolingPolicy(mask_padding=True, keep_bos=False)  # the source's masked pooling
UNMASKED = PoolingPolicy(mask_padding=False, keep_bos=True)  # the source's bug
THRESHOLDS = ("source-5.0", f"scale-free-q{SCALE_FREE_QUANTILE}")
HARD_CATEGORIES = ("social", "conversational")  # S6's two categories; matched by TextSet.find
STRATIFIED = "bootstrap-percentile (texts within categories)"
SPLIT_STRATIFIED = "bootstrap-percentile (train and held-out texts, each within categories)"
SYNTAX_RATIO = 0.5  # S5: also in the registry's decision; used here only to label the figure


@dataclass(frozen=True)
class SData:
    labels: tuple[str, ...]
    depths: tuple[int, ...]
    hooks: tuple[str, ...]
    codes: dict[tuple[str, str], np.ndarray]  # (hook, policy name) -> (n_texts, d_sae)
    truncated: tuple[int, ...]
    thresholds: dict[tuple[str, str], float]  # (kind, hook) -> strong-activation threshold
    split: SplitRows  # train texts select, held-out texts score
    tops: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    """(hook, policy name) -> every text's own top candidates (row_tops), filled on first use."""

    def threshold(self, kind: str, hook: str) -> float:
        return self.thresholds[(kind, hook)]

    def table(self, kind: str, hook: str, policy: PoolingPolicy = MASKED, rows: SplitRows | None = None):
        """Specialists selected on the train texts and scored on the held-out ones (``rows``:
        a resample or a label shuffle of ``split``). The codes were checked for NaN when
        s_data built them; each text's top candidates are computed once (heldout_specialists)."""
        key = (hook, policy.name)
        codes = self.codes[key]
        if key not in self.tops:
            self.tops[key] = row_tops(codes)
        return heldout_specialists(codes, rows or self.split, self.threshold(kind, hook),
                                   check=False, tops=self.tops[key])

    def split_record(self) -> dict:
        """Which split selected and which scored, with their sizes (recorded with a headline)."""
        return {"selected_on": SELECT, "scored_on": SCORE, "n_selected": int(self.split.select.size),
                "n_scored": int(self.split.score.size)}


def _resid(saes):
    return [s for s in saes if s.hook_name.endswith("hook_resid_pre")]


@pytest.fixture(scope="module")
def s_batch(subject, texts):
    return tokenize(subject.model, [t.text for t in texts.texts])


@pytest.fixture(scope="module")
def s_acts(subject, saes, s_batch, content_cache):
    """Per-token activations at every residual SAE hook and at S7's mismatched hook, from one
    forward (read from the content cache when these exact tokens went through these weights
    before): {hook: (n_texts, pos, d_model)}."""
    resid = _resid(saes)
    hooks = [s.hook_name for s in resid] + ([_mismatched_hook(resid[0])] if resid else [])
    return cached_capture(content_cache, subject, s_batch.tokens, hooks)


def _mismatched_hook(first) -> str:
    """S7's wrong input for the shallowest residual SAE: the MLP output of its block (the
    source fed blocks.6.hook_mlp_out to a resid_pre SAE)."""
    return f"blocks.{block_index(first.hook_name)}.hook_mlp_out"


@pytest.fixture(scope="module")
def s_data(saes, texts, s_batch, s_acts) -> SData:
    resid = _resid(saes)
    if not resid:
        pytest.skip("unavailable: the subject has no residual-stream SAEs")
    hooks = tuple(s.hook_name for s in resid)
    split = SplitRows.from_splits([t.category for t in texts.texts], [t.split for t in texts.texts], SELECT, SCORE)
    codes, thresholds = {}, {}
    with torch.no_grad():
        for s in resid:
            for policy in POOLING_POLICIES:
                pooled = pool(s_acts[s.hook_name].float(), s_batch, policy)  # (n_texts, d_model)
                codes[(s.hook_name, policy.name)] = c = s.sae.encode(pooled.to(s.sae.W_enc.dtype)).cpu().numpy()
                if np.isnan(c).any():  # checked once here: the tables skip the check
                    bad = sorted({int(i) for i in np.argwhere(np.isnan(c))[:, 0]})[:5]
                    raise ValueError(f"NaN in the SAE codes at {s.hook_name} ({policy.name}) of texts {bad}")
            thresholds[(THRESHOLDS[0], s.hook_name)] = SOURCE_THRESHOLD
            # a selection parameter: from the train texts only
            thresholds[(THRESHOLDS[1], s.hook_name)] = scale_free_threshold(
                codes[(s.hook_name, MASKED.name)][split.select])
    depths = tuple(block_index(h) for h in hooks)
    return SData(split.labels, depths, hooks, codes, s_batch.truncated, thresholds, split)


def _require_texts(texts, evidence, categories=(), heldout: bool = True) -> None:
    """Enough texts per category: with ``heldout`` (a claim that selects on the train split and
    scores on the held-out one) >= MIN_TEXTS_PER_CATEGORY train and >= MIN_HELDOUT_PER_CATEGORY
    held-out texts, else >= MIN_TEXTS_PER_CATEGORY texts over both splits."""
    if not heldout:
        short = texts.require(MIN_TEXTS_PER_CATEGORY)
        if short:
            evidence.inconclusive(f"categories with fewer than {MIN_TEXTS_PER_CATEGORY} texts: {short}",
                                  code="too-few-texts")
    else:
        short = texts.require(MIN_TEXTS_PER_CATEGORY, split=SELECT)
        if short:
            evidence.inconclusive(f"categories with fewer than {MIN_TEXTS_PER_CATEGORY} texts in the "
                                  f"{SELECT!r} split, which selects the specialists: {short}", code="too-few-texts")
        few = texts.require(MIN_HELDOUT_PER_CATEGORY, split=SCORE)
        if few:
            n = {c: texts.counts()[c][SCORE] for c in few}
            evidence.inconclusive(
                f"the claim selects on the {SELECT!r} texts and scores on held-out ones, and categories "
                f"{few} have fewer than {MIN_HELDOUT_PER_CATEGORY} held-out texts ({n}): add lines with "
                f'"split": "heldout" to the texts file (at least {MIN_HELDOUT_PER_CATEGORY} per category; '
                'a line without "split" is train)', code="too-few-texts")
    missing = [c for c in categories if texts.find(c) is None]
    if missing:
        evidence.inconclusive(f"the texts have no categories {missing} (they have {list(texts.categories)}; "
                              "names match case- and separator-insensitively)", code="missing-category")


def _counts(data: SData, kind: str, policy: PoolingPolicy = MASKED, rows: SplitRows | None = None) -> list[int]:
    """Per depth: categories whose train-selected specialist scores > 0 on the held-out texts."""
    return [data.table(kind, h, policy, rows).count for h in data.hooks]


def _require_depths(data: SData, evidence) -> None:
    """S2-S4 are trends over the source's relative depths (harness.saes.sources.depth_trend_problem)."""
    problem = depth_trend_problem(data.depths)
    if problem:
        evidence.inconclusive(problem, code="not-applicable")


def _published_series(claim, quantity: str) -> str:
    """The source's per-depth numbers for a note, from the registry."""
    return "/".join(f"{p.value:g}" for p in claim.published_values(quantity))


# --- S1: the padding matrix ---------------------------------------------------------------------


@pytest.mark.claim(id="S1")
@pytest.mark.parametrize("kind", THRESHOLDS)
def test_padding_masking_raises_specialist_counts(saes, s_data, texts, kind, evidence, rng):
    """A specialist count is a selection (the best of 5 candidates) and its score: the
    candidates and the best one are chosen on the train texts under each pooling policy, and
    a category counts when that feature scores > 0 on the held-out texts."""
    _require_texts(texts, evidence)
    matrix = {p.name: _counts(s_data, kind, p) for p in POOLING_POLICIES}
    gain = sum(matrix[MASKED.name]) - sum(matrix[UNMASKED.name])
    n_scored = int(s_data.split.score.size)
    boots = split_bootstrap(s_data.split, lambda rows: sum(_counts(s_data, kind, MASKED, rows))
                            - sum(_counts(s_data, kind, UNMASKED, rows)), rng, N_BOOT)
    null = split_label_null(s_data.split, lambda rows: sum(_counts(s_data, kind, MASKED, rows))
                            - sum(_counts(s_data, kind, UNMASKED, rows)), rng, N_NULL)
    evidence.record("specialist_gain_masked_minus_unmasked",
                    percentile_estimate(gain, boots, n_scored, SPLIT_STRATIFIED),
                    null=null_estimate(null),
                    description=f"sum over depths {s_data.depths} of specialists({MASKED.name}) - "
                    f"specialists({UNMASKED.name}), threshold {kind}; specialists selected on the "
                    f"{SELECT} texts, counted where they score > 0 on the {SCORE} texts",
                    padding_matrix=matrix, depths=list(s_data.depths), split=s_data.split_record(),
                    thresholds={h: s_data.threshold(kind, h) for h in s_data.hooks})
    for p in POOLING_POLICIES:
        evidence.record(f"specialists_{p.name}", percentile_estimate(
            float(sum(matrix[p.name])),
            split_bootstrap(s_data.split, lambda rows, p=p: sum(_counts(s_data, kind, p, rows)), rng, 100),
            n_scored, SPLIT_STRATIFIED),
            description=f"specialists summed over depths {s_data.depths} under {p.name} pooling "
            f"(selected on {SELECT}, scored on {SCORE})",
            per_depth=matrix[p.name])
    _padding_decomposition(evidence, s_data, kind, matrix, rng)
    _strong_features_data(evidence, s_data, kind)
    changed = sorted(p for p, c in matrix.items() if c != matrix[MASKED.name])
    evidence.note(f"padding matrix, specialists per depth {s_data.depths} (of {len(set(s_data.labels))} "
                  f"categories): {matrix}; settings that change the count relative to {MASKED.name} "
                  f"(the source's masked): {changed or 'none'}. {len(s_data.labels)} texts in one "
                  f"right-padded batch ({s_data.split.select.size} {SELECT} select, "
                  f"{s_data.split.score.size} {SCORE} score); truncated: {list(s_data.truncated) or 'none'}")
    _figure_padding(evidence, s_data, matrix, kind)
    if not _selected_anywhere(s_data, kind, POOLING_POLICIES):
        evidence.inconclusive(f"no specialists at any depth under threshold {kind} with any pooling "
                              f"policy (selected on the {SELECT} texts): no count that masking could "
                              "raise", code="no-specialists")
    evidence.judge()


def _figure_padding(evidence, data: SData, matrix, kind) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, (name, counts) in enumerate(matrix.items()):
        ax.plot(data.depths, np.asarray(counts) + (i - 1.5) * 0.06, marker="o", label=name)
    ax.set(xlabel="layer (SAE depth)", ylabel="categories with a specialist",
           ylim=(-0.3, len(set(data.labels)) + 0.3), title=f"S1: specialists by pooling policy ({kind})")
    ax.set_xticks(data.depths)
    ax.legend(fontsize=8)
    evidence.figure(fig, f"padding_policies_{kind}")
    plt.close(fig)


def _strong_features_data(evidence, data: SData, kind: str) -> None:
    """Per (hook, pooling policy, text): the pooled code's strong features (code > the
    threshold), from which every specialist count of S1, S2 and S6 can be recomputed with
    harness.saes.specialists' definition (score = strong inside - strong outside, top-5
    candidates; the best candidate chosen on the train texts, scored on the held-out ones)."""
    split_of = {int(i): SELECT for i in data.split.select} | {int(i): SCORE for i in data.split.score}
    cols: dict[str, list] = {"hook": [], "policy": [], "text": [], "split": [], "category": [],
                             "threshold": [], "strong_features": []}
    for h in data.hooks:
        thr = data.threshold(kind, h)
        for p in POOLING_POLICIES:
            strong = data.codes[(h, p.name)] > thr  # (n_texts, d_sae)
            for t, row in enumerate(strong):
                cols["hook"].append(h)
                cols["policy"].append(p.name)
                cols["text"].append(t)
                cols["split"].append(split_of.get(t, "none"))
                cols["category"].append(data.labels[t])
                cols["threshold"].append(thr)
                cols["strong_features"].append(np.flatnonzero(row).tolist())
    evidence.data("strong_features", cols, f"threshold {kind}: per SAE hook, pooling policy and "
                  "text (in the texts file's order), the features whose pooled code is > threshold")
    cand: dict[str, list] = {"hook": [], "policy": [], "category": [], "candidates": [],
                             "selected_feature": [], "train_score": [], "heldout_score": []}
    for h in data.hooks:
        for p in POOLING_POLICIES:
            for r in data.table(kind, h, p).per_category:
                cand["hook"].append(h)
                cand["policy"].append(p.name)
                cand["category"].append(r.category)
                cand["candidates"].append(list(r.candidates))
                cand["selected_feature"].append(r.best_feature)
                cand["train_score"].append(r.selection_score)
                cand["heldout_score"].append(r.best_score)
    evidence.data("candidates", cand, "per SAE hook, pooling policy and category: the top-5 "
                  f"candidate features by peak pooled code inside the category on the {SELECT} texts, the "
                  f"one with the highest strong-inside minus strong-outside count on the {SELECT} texts "
                  "(first on ties), and its score there and on the held-out texts; with strong_features, "
                  f"a category has a specialist when the selected feature's {SCORE} score is > 0, and the "
                  "headline is the masked-nobos count minus the unmasked-bos count, summed over hooks")


def _policy(mask: bool, bos: bool) -> PoolingPolicy:
    return PoolingPolicy(mask_padding=mask, keep_bos=bos)


S1_CONTRASTS = {
    # name: ((+ policy), (- policy)) over (mask_padding, keep_bos); the interaction separately
    "padding_effect_bos_dropped": ((True, False), (False, False)),
    "padding_effect_bos_kept": ((True, True), (False, True)),
    "bos_effect_masked": ((True, False), (True, True)),
    "bos_effect_unmasked": ((False, False), (False, True)),
}


def _padding_decomposition(evidence, data: SData, kind: str, matrix: dict, rng) -> None:
    """The source's contrast (masked-nobos minus unmasked-bos) changes two things at once. As a
    2 x 2: the padding effect with BOS held fixed (dropped, kept), the BOS effect with padding
    held fixed, and their interaction, each with a bootstrap interval over texts (one set of
    resamples for all). The claim's words are about padding: padding_effect_bos_dropped is its
    co-headline, reported beside the source's contrast (which stays the decision)."""
    def totals(rows=None) -> dict[tuple[bool, bool], int]:
        return {(m, b): sum(_counts(data, kind, _policy(m, b), rows)) for m in (True, False)
                for b in (True, False)}

    def contrasts(t) -> dict[str, float]:
        out = {name: float(t[plus] - t[minus]) for name, (plus, minus) in S1_CONTRASTS.items()}
        out["padding_by_bos_interaction"] = out["padding_effect_bos_dropped"] - out["padding_effect_bos_kept"]
        return out

    point = contrasts({(p.mask_padding, p.keep_bos): sum(matrix[p.name]) for p in POOLING_POLICIES})
    draws = [contrasts(totals(resample_split(data.split, rng))) for _ in range(N_BOOT)]
    for name, value in point.items():
        est = percentile_estimate(value, np.array([d[name] for d in draws]), int(data.split.score.size),
                                  SPLIT_STRATIFIED)
        evidence.record(name, est, co_headline=name == "padding_effect_bos_dropped",
                        description=f"2x2 decomposition of the source's contrast, threshold {kind}: "
                        + ("(masked - unmasked) with BOS dropped minus the same with BOS kept"
                           if name == "padding_by_bos_interaction" else
                           f"specialists({_policy(*S1_CONTRASTS[name][0]).name}) - "
                           f"specialists({_policy(*S1_CONTRASTS[name][1]).name})"))
    evidence.note("The source's contrast = padding_effect_bos_dropped + bos_effect_unmasked; the "
                  f"padding effect alone (BOS dropped) is {point['padding_effect_bos_dropped']:+g}, "
                  f"the BOS effect alone (unmasked) {point['bos_effect_unmasked']:+g}.")


# --- S2: depth trend of the count ---------------------------------------------------------------


@pytest.mark.claim(id="S2")
@pytest.mark.parametrize("kind", THRESHOLDS)
def test_deeper_layers_have_more_specialists(saes, s_data, texts, kind, claim, evidence, rng):
    """S1's count per depth (selected on the train texts, scored on the held-out ones)."""
    _require_texts(texts, evidence)
    _require_depths(s_data, evidence)
    counts = _counts(s_data, kind)
    boots = split_bootstrap(s_data.split, lambda rows: spearman(s_data.depths, _counts(s_data, kind, rows=rows)),
                            rng, N_BOOT)
    null = split_label_null(s_data.split, lambda rows: spearman(s_data.depths, _counts(s_data, kind, rows=rows)),
                            rng, N_NULL)
    per_cat = {h: s_data.table(kind, h).to_dict() for h in s_data.hooks}
    evidence.record("depth_count_spearman",
                    percentile_estimate(spearman(s_data.depths, counts), boots, int(s_data.split.score.size),
                                        SPLIT_STRATIFIED),
                    null=null_estimate(null),
                    description=f"Spearman(depth, specialists) over depths {s_data.depths}, threshold {kind}, "
                    f"{MASKED.name} pooling (0 when the counts are all equal); specialists selected on "
                    f"the {SELECT} texts, counted where they score > 0 on the {SCORE} texts",
                    split=s_data.split_record(),
                    counts=counts, non_decreasing=bool(all(np.diff(counts) >= 0)),
                    boot_share_constant=float(np.mean(boots == 0.0)), per_category=per_cat)
    evidence.note(f"specialists per depth {dict(zip(s_data.depths, counts, strict=True))} "
                  f"(non-decreasing: {all(np.diff(counts) >= 0)}); source (gpt2-small): "
                  f"{_published_series(claim, 'specialists (masked)')}")
    _figure_heatmap(evidence, s_data, per_cat, kind)
    evidence.judge()


def _figure_heatmap(evidence, data: SData, per_cat, kind) -> None:
    plt = pyplot()
    cats = sorted(set(data.labels))
    grid = np.array([[per_cat[h]["categories"][c]["score"] for h in data.hooks] for c in cats])
    fig, ax = plt.subplots(figsize=(5, 4))
    vmax = max(1, int(np.abs(grid).max()))
    im = ax.imshow(grid, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
    ax.set_xticks(range(len(data.hooks)), [str(d) for d in data.depths])
    ax.set_yticks(range(len(cats)), cats)
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=8)
    ax.set(xlabel="layer", title=f"held-out score of the train-selected specialist ({kind})")
    fig.colorbar(im, ax=ax)
    evidence.figure(fig, f"specialist_scores_{kind}")
    plt.close(fig)


# --- S3, S4: coverage and peak against depth ----------------------------------------------------


@pytest.mark.claim(id="S3")
def test_most_frequent_feature_coverage_falls_with_depth(saes, s_data, texts, claim, evidence, rng):
    """The most frequent feature is a selection (the argmax of coverage): it is picked on
    the train texts and its coverage measured on the held-out texts."""
    _require_texts(texts, evidence)
    _require_depths(s_data, evidence)

    def coverage(rows: SplitRows) -> list[tuple[int, float]]:
        return [most_frequent_coverage(s_data.codes[(h, MASKED.name)][rows.select],
                                       s_data.codes[(h, MASKED.name)][rows.score]) for h in s_data.hooks]

    n_scored = int(s_data.split.score.size)  # a stratified resample keeps the number of texts
    cov = coverage(s_data.split)
    boots = split_bootstrap(s_data.split, lambda rows: coverage_slope([c for _, c in coverage(rows)], n_scored),
                            rng, N_BOOT)
    evidence.record("coverage_slope",
                    percentile_estimate(coverage_slope([c for _, c in cov], n_scored), boots, n_scored,
                                        SPLIT_STRATIFIED),
                    description=f"slope of most-frequent-feature coverage per depth step over depths {s_data.depths}; "
                    f"the feature picked on the {SELECT} texts, its coverage measured on the {SCORE} texts",
                    split=s_data.split_record(),
                    coverage={d: {"feature": f, "coverage": c} for d, (f, c) in zip(s_data.depths, cov, strict=True)})
    evidence.note(f"coverage per depth: {[round(c, 3) for _, c in cov]} (source: "
                  f"{_published_series(claim, 'most-frequent feature coverage')})")
    evidence.judge()


@pytest.mark.claim(id="S4")
def test_peak_activation_grows_with_depth(saes, s_data, texts, claim, evidence, rng):
    """The peak is a max over every text and feature: nothing is selected and then scored, so
    it uses every text (both splits), as the source did."""
    _require_texts(texts, evidence, heldout=False)
    _require_depths(s_data, evidence)

    def log_peaks(rows=None):
        return np.log([peak_activation(s_data.codes[(h, MASKED.name)] if rows is None
                                       else s_data.codes[(h, MASKED.name)][rows]) for h in s_data.hooks])

    peaks = np.exp(log_peaks())
    # The source's statistic is a maximum, which a bootstrap cannot estimate (a resample's max
    # is never above the sample's: the interval hugs one side). The headline is the exact
    # slope over the texts at hand, without an interval; its uncertainty is the SAE seed
    # spread. Beside it, a statistic a bootstrap can estimate: the 0.99 quantile.
    evidence.record("log_peak_slope", exact(slope(np.log(peaks)), len(s_data.labels)),
                    description=f"slope of log peak (max) pooled code per depth step over depths "
                    f"{s_data.depths}; exact over the {len(s_data.labels)} texts (a max has no "
                    "consistent bootstrap)",
                    split={"selected_on": None, "scored_on": "all", "n_selected": 0, "n_scored": len(s_data.labels)},
                    peaks=dict(zip(s_data.depths, peaks.tolist(), strict=True)))

    def log_q99(rows=None):
        return np.log([positive_quantile(s_data.codes[(h, MASKED.name)] if rows is None
                                         else s_data.codes[(h, MASKED.name)][rows], 0.99)
                       for h in s_data.hooks])

    q99 = log_q99()
    if np.isfinite(q99).all():
        boots = stratified_bootstrap(s_data.labels, lambda rows: slope(log_q99(rows)), rng, N_BOOT)
        evidence.record("log_q99_slope", percentile_estimate(slope(q99), boots, len(s_data.labels), STRATIFIED),
                        description="the same slope for the 0.99 quantile of the positive pooled codes "
                        "(bootstrap over texts within categories)")
    evidence.note(f"peak pooled code per depth: {[round(float(p), 2) for p in peaks]} "
                  f"(source: {_published_series(claim, 'strongest max activation')})")
    evidence.judge()


# --- S5: token level ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Specialist:
    hook: str
    depth: int
    category: str
    feature: int
    score: int  # on the train texts that selected it
    heldout_score: int


def _selected_anywhere(data: SData, kind: str, policies=None) -> bool:
    """Whether any depth has a specialist as selected on the train texts (a best candidate
    with train score > 0) under any of ``policies`` (default: the source's masked pooling).
    With none at all a comparison of specialists is empty: the claims that compare them are
    inconclusive/no-specialists, not refuted by a 0 [0, 0] that no model could have changed."""
    for policy in policies or (MASKED,):
        for h in data.hooks:
            if any(r.selection_score > 0 for r in data.table(kind, h, policy).per_category):
                return True
    return False


def _specialists(data: SData, kind: str) -> list[Specialist]:
    """The specialists as selected: best candidate with a train score > 0 (S5 asks what a
    selected specialist fires on; whether it holds up on held-out texts is S1's question)."""
    out = []
    for h, d in zip(data.hooks, data.depths, strict=True):
        for r in data.table(kind, h).per_category:
            if r.selection_score > 0:
                out.append(Specialist(h, d, r.category, r.best_feature, r.selection_score, r.best_score))
    return out


def _token_codes(saes, s_acts, s_batch, specs: list[Specialist]) -> dict[Specialist, np.ndarray]:
    """Per-token code of each specialist's feature: (n_texts, pos), 0 at pads and BOS."""
    by_hook = {s.hook_name: s for s in _resid(saes)}
    out = {}
    for hook in dict.fromkeys(s.hook for s in specs):
        mine = [s for s in specs if s.hook == hook]
        z = feature_token_codes(by_hook[hook].sae, s_acts[hook], s_batch.content_mask, [s.feature for s in mine])
        out.update({s: z[s.feature] for s in mine})
    return out


@pytest.mark.claim(id="S5")
@pytest.mark.parametrize("kind", THRESHOLDS)
def test_specialists_detect_syntax_not_topic(subject, saes, s_data, s_acts, s_batch, texts, kind, evidence, rng):
    """The specialists and their trigger tokens are chosen on the train texts; the firing
    ratio is measured on the held-out texts' occurrences of those tokens."""
    _require_texts(texts, evidence)
    specs = _specialists(s_data, kind)
    if not specs:
        evidence.inconclusive(f"no specialists at any depth under threshold {kind} (selected on the "
                              f"{SELECT} texts): nothing to inspect", code="no-specialists")
    zs = _token_codes(saes, s_acts, s_batch, specs)
    tokens = s_batch.tokens.cpu().numpy()
    keep = s_batch.content_mask.cpu().numpy()
    labels = np.array(s_data.labels)
    select = np.isin(np.arange(labels.size), s_data.split.select)
    score = np.isin(np.arange(labels.size), s_data.split.score)
    tok = subject.model.tokenizer
    rows = []
    for s in specs:
        r = trigger_ratio(zs[s], tokens, keep, labels == s.category, select, score)
        rows.append({"depth": s.depth, "category": s.category, "feature": s.feature, "score": s.score,
                     "heldout_score": s.heldout_score,
                     **r, "trigger_strings": tok.convert_ids_to_tokens(r["triggers"])})  # byte-level pieces stay distinct
    ratios = np.array([r["ratio"] for r in rows], dtype=float)
    ok = ratios[np.isfinite(ratios)]
    if ok.size < 3:
        evidence.note(f"specialists: {rows}")
        evidence.inconclusive(f"only {ok.size} of {len(rows)} specialists have trigger tokens (chosen on the "
                              f"{SELECT} texts) occurring >= {MIN_OUTSIDE} times outside their category and at "
                              f"least once inside it in the {SCORE} texts (need 3)", code="too-few-units")
    boots = np.array([np.median(ok[idx]) for idx in bootstrap_indices(ok.size, rng, 2000)])
    evidence.record("median_outside_inside_firing_ratio",
                    percentile_estimate(float(np.median(ok)), boots, int(ok.size), "bootstrap-percentile (specialists)"),
                    description=f"median over specialists ({kind}) of firing rate on their top-{TRIGGER_TOKENS} "
                    "trigger tokens outside their category / inside it (token level, BOS and pads excluded); "
                    f"specialists and trigger tokens chosen on the {SELECT} texts, rates measured on the "
                    f"{SCORE} texts' occurrences",
                    split=s_data.split_record(),
                    specialists=rows, n_without_outside_triggers=int(np.isnan(ratios).sum()))
    evidence.note("per specialist (depth, category, feature: triggers -> ratio): " + "; ".join(
        f"L{r['depth']} {r['category']} f{r['feature']}: {r['trigger_strings']} -> "
        f"{r['ratio']:.2f}" for r in rows))
    _attach_highlight(evidence, subject, s_data, s_batch, specs, zs, kind)
    evidence.judge()


def _attach_highlight(evidence, subject, data: SData, batch, specs, zs, kind) -> None:
    """HTML: the deepest, highest-scoring specialist over 6 held-out texts of its category and
    the 4 held-out outside texts where it fires most."""
    from harness.saes.features import token_html

    s = max(specs, key=lambda x: (x.depth, x.score))
    z = zs[s]
    labels = np.array(data.labels)
    scored = np.sort(data.split.score)
    inside = scored[labels[scored] == s.category][:6]
    outside = scored[labels[scored] != s.category]
    outside = outside[np.argsort(-z[outside].max(axis=1), kind="stable")[:4]]
    tok = subject.model.tokenizer
    rows = []
    first = first_content_position(batch.has_bos)  # the text's own tokens, as everywhere
    for i in [*inside, *outside]:
        n = int(batch.lengths[i])
        ids = batch.tokens[i, first:n].tolist()
        rows.append((f"{labels[i]} #{i}", [tok.decode([t]) for t in ids], z[i, first:n].tolist()))
    evidence.attach(f"specialist_tokens_{kind}", token_html(
        rows, title=f"S5: layer {s.depth} {s.category} specialist, feature {s.feature} ({kind})",
        caption=f"per-token code of feature {s.feature} of the SAE at {s.hook} (selected on the "
        f"{SELECT} texts); first rows: its category's {SCORE} texts, last 4: the {SCORE} outside "
        "texts where it fires most"))


# --- S6: the hardest categories -----------------------------------------------------------------


@pytest.mark.claim(id="S6")
@pytest.mark.parametrize("kind", THRESHOLDS)
def test_social_and_conversational_are_hardest(saes, s_data, texts, kind, evidence, rng):
    """Best specialist score = the held-out score of the candidate selected on the train texts."""
    _require_texts(texts, evidence, HARD_CATEGORIES)
    hard_categories = tuple(texts.find(c) for c in HARD_CATEGORIES)  # as the user spelt them

    def gap(rows: SplitRows | None = None) -> float:
        scores = {c: [] for c in sorted(set(s_data.labels))}
        for h in s_data.hooks:
            for r in s_data.table(kind, h, rows=rows).per_category:
                scores[r.category].append(r.best_score)
        hard = np.mean([np.mean(scores[c]) for c in hard_categories])
        rest = np.mean([np.mean(v) for c, v in scores.items() if c not in hard_categories])
        return float(hard - rest)

    first = {}
    for c in sorted(set(s_data.labels)):
        with_spec = [d for h, d in zip(s_data.hooks, s_data.depths, strict=True)
                     if s_data.table(kind, h).by_category()[c].has_specialist]
        first[c] = with_spec[0] if with_spec else None
    boots = split_bootstrap(s_data.split, gap, rng, N_BOOT)
    null = split_label_null(s_data.split, gap, rng, N_NULL)
    evidence.record("hard_minus_other_mean_best_score",
                    percentile_estimate(gap(), boots, int(s_data.split.score.size), SPLIT_STRATIFIED),
                    null=null_estimate(null),
                    description=f"mean over depths {s_data.depths} of the best specialist score of "
                    f"{hard_categories} minus that of the other categories, threshold {kind}; the best "
                    f"candidate selected on the {SELECT} texts, its score measured on the {SCORE} texts",
                    split=s_data.split_record(),
                    first_depth_with_specialist=first)
    evidence.note(f"first depth with a specialist per category: {first} (source: social and "
                  "conversational only in deep layers)")
    if not _selected_anywhere(s_data, kind):
        evidence.inconclusive(f"no specialists at any depth under threshold {kind} (selected on the "
                              f"{SELECT} texts): no category is harder than another", code="no-specialists")
    evidence.judge()


# --- S7: sparsity and the hook-mismatch detector ------------------------------------------------


@pytest.mark.claim(id="S7")
def test_hook_mismatch_is_detectable(subject, saes, s_data, s_acts, s_batch, texts, evidence, rng):
    """Reconstruction of every content token of every text: nothing is selected, so every text
    (both splits) is used."""
    from harness.saes.sources import fve_from_sums, reconstruction_sums

    _require_texts(texts, evidence, heldout=False)
    first = _resid(saes)[0]
    wrong = _mismatched_hook(first)
    mismatched = s_acts[wrong]
    keep = s_batch.content_mask
    sums = {name: reconstruction_sums(first.sae, acts, keep)
            for name, acts in (("matched", s_acts[first.hook_name]), ("mismatched", mismatched))}
    n = len(s_data.labels)

    def boot(name):
        draws = stratified_bootstrap(s_data.labels, lambda rows: fve_from_sums(sums[name], rows), rng, 1000)
        return percentile_estimate(fve_from_sums(sums[name]), draws, n, STRATIFIED)

    matched, bad = boot("matched"), boot("mismatched")
    per_token = {name: {k: float(v.sum() / sums[name]["n"].sum()) for k, v in sums[name].items()
                        if k in ("l0", "relu_l0", "dense_nonzero")} for name in sums}
    evidence.record("fve_matched", matched,
                    description=f"FVE of the SAE at {first.hook_name} on its own hook (texts, BOS and pads excluded)")
    evidence.record("fve_mismatched", bad,
                    description=f"FVE of the same SAE fed {wrong} (the source's mismatch)",
                    split={"selected_on": None, "scored_on": "all", "n_selected": 0, "n_scored": n},
                    per_token_means=per_token, d_sae=first.sae.cfg.d_sae, d_in=first.sae.cfg.d_in,
                    code_density_matched=per_token["matched"]["l0"] / first.sae.cfg.d_sae,
                    dense_density_matched=per_token["matched"]["dense_nonzero"] / first.sae.cfg.d_in)
    evidence.note(f"sparsity: {per_token['matched']['l0']:.1f} of {first.sae.cfg.d_sae} codes nonzero per "
                  f"token vs {per_token['matched']['dense_nonzero']:.1f} of {first.sae.cfg.d_in} dense coordinates; "
                  f"ReLU-L0 (positive encoder pre-activations, what a ReLU SAE with these weights would "
                  f"fire): matched {per_token['matched']['relu_l0']:.0f}, mismatched "
                  f"{per_token['mismatched']['relu_l0']:.0f}; FVE matched {matched}, mismatched {bad}")
    if matched.ci_low < first_decision_bound(evidence):
        evidence.inconclusive(f"the SAE reconstructs its own hook with FVE {matched}: below the detector's "
                              "bound, so a low FVE cannot single out a mismatch", code="below-detection-bound")
    evidence.judge()


def first_decision_bound(evidence) -> float:
    """The registry's FVE bound for S7 (a mismatch is flagged below it)."""
    return evidence.claim.decision.threshold_for(evidence.dtype)
