"""Family S: SAE category specialists (CLAIMS.md; source notebooks seeds/002).

One vector per text: the texts run as ONE right-padded batch with BOS prepended, the hook's
activations are mean-pooled under each policy of the padding matrix (masked / unmasked x BOS
kept / dropped; ``harness.activations.capture.pool``), then ``sae.encode``-d. The source's "masked" pooling
is masked-nobos here (GPT-2's pad id is its BOS id, so the source's mask dropped BOS too) and
its "unmasked" (the bug) is unmasked-bos; the other two cells are reported beside them.

The specialist search is the source's (``harness.saes.specialists``) under two thresholds: the
source's strict 5.0 (a number specific to the gpt2-small-res-jb SAEs' scale) and a scale-free
one (the 0.99 quantile of the SAE's positive pooled codes on the texts, source-masked pooling).
Intervals resample texts within categories; nulls shuffle the category labels.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    coverage_slope,
    feature_token_codes,
    find_specialists,
    label_shuffle_null,
    most_frequent_coverage,
    peak_activation,
    positive_quantile,
    resample_within_categories,
    scale_free_threshold,
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

MIN_TEXTS_PER_CATEGORY = 10  # the source's 10 per category
N_BOOT = 300
N_NULL = 50
MASKED = PoolingPolicy(mask_padding=True, keep_bos=False)  # the source's masked pooling
UNMASKED = PoolingPolicy(mask_padding=False, keep_bos=True)  # the source's bug
THRESHOLDS = ("source-5.0", f"scale-free-q{SCALE_FREE_QUANTILE}")
HARD_CATEGORIES = ("social", "conversational")  # S6's two categories; matched by TextSet.find
STRATIFIED = "bootstrap-percentile (texts within categories)"
SYNTAX_RATIO = 0.5  # S5: also in the registry's decision; used here only to label the figure


@dataclass(frozen=True)
class SData:
    labels: tuple[str, ...]
    depths: tuple[int, ...]
    hooks: tuple[str, ...]
    codes: dict[tuple[str, str], np.ndarray]  # (hook, policy name) -> (n_texts, d_sae)
    truncated: tuple[int, ...]
    thresholds: dict[tuple[str, str], float]  # (kind, hook) -> strong-activation threshold

    def threshold(self, kind: str, hook: str) -> float:
        return self.thresholds[(kind, hook)]

    def table(self, kind: str, hook: str, policy: PoolingPolicy = MASKED, rows=None, labels=None):
        codes = self.codes[(hook, policy.name)]
        lab = labels or self.labels
        if rows is not None:
            codes, lab = codes[rows], tuple(lab[i] for i in rows)
        return find_specialists(codes, lab, self.threshold(kind, hook))


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
    codes, thresholds = {}, {}
    with torch.no_grad():
        for s in resid:
            for policy in POOLING_POLICIES:
                pooled = pool(s_acts[s.hook_name].float(), s_batch, policy)  # (n_texts, d_model)
                codes[(s.hook_name, policy.name)] = s.sae.encode(pooled.to(s.sae.W_enc.dtype)).cpu().numpy()
            thresholds[(THRESHOLDS[0], s.hook_name)] = SOURCE_THRESHOLD
            thresholds[(THRESHOLDS[1], s.hook_name)] = scale_free_threshold(codes[(s.hook_name, MASKED.name)])
    depths = tuple(block_index(h) for h in hooks)
    return SData(tuple(t.category for t in texts.texts), depths, hooks, codes, s_batch.truncated, thresholds)


def _require_texts(texts, evidence, categories=()) -> None:
    short = texts.require(MIN_TEXTS_PER_CATEGORY)
    if short:
        evidence.inconclusive(f"categories with fewer than {MIN_TEXTS_PER_CATEGORY} texts: {short}",
                              code="too-few-texts")
    missing = [c for c in categories if texts.find(c) is None]
    if missing:
        evidence.inconclusive(f"the texts have no categories {missing} (they have {list(texts.categories)}; "
                              "names match case- and separator-insensitively)", code="missing-category")


def _counts(data: SData, kind: str, policy: PoolingPolicy = MASKED, rows=None, labels=None) -> list[int]:
    return [data.table(kind, h, policy, rows, labels).count for h in data.hooks]


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
    _require_texts(texts, evidence)
    matrix = {p.name: _counts(s_data, kind, p) for p in POOLING_POLICIES}
    gain = sum(matrix[MASKED.name]) - sum(matrix[UNMASKED.name])
    boots = stratified_bootstrap(s_data.labels, lambda rows: sum(_counts(s_data, kind, MASKED, rows))
                                 - sum(_counts(s_data, kind, UNMASKED, rows)), rng, N_BOOT)
    null = label_shuffle_null(s_data.labels, lambda lab: sum(_counts(s_data, kind, MASKED, labels=lab))
                              - sum(_counts(s_data, kind, UNMASKED, labels=lab)), rng, N_NULL)
    evidence.record("specialist_gain_masked_minus_unmasked",
                    percentile_estimate(gain, boots, len(s_data.labels), STRATIFIED),
                    null=null_estimate(null),
                    description=f"sum over depths {s_data.depths} of specialists({MASKED.name}) - "
                    f"specialists({UNMASKED.name}), threshold {kind}",
                    padding_matrix=matrix, depths=list(s_data.depths),
                    thresholds={h: s_data.threshold(kind, h) for h in s_data.hooks})
    for p in POOLING_POLICIES:
        evidence.record(f"specialists_{p.name}", percentile_estimate(
            float(sum(matrix[p.name])),
            stratified_bootstrap(s_data.labels, lambda rows, p=p: sum(_counts(s_data, kind, p, rows)), rng, 100),
            len(s_data.labels), STRATIFIED),
            description=f"specialists summed over depths {s_data.depths} under {p.name} pooling",
            per_depth=matrix[p.name])
    _padding_decomposition(evidence, s_data, kind, matrix, rng)
    _strong_features_data(evidence, s_data, kind)
    changed = sorted(p for p, c in matrix.items() if c != matrix[MASKED.name])
    evidence.note(f"padding matrix, specialists per depth {s_data.depths} (of {len(set(s_data.labels))} "
                  f"categories): {matrix}; settings that change the count relative to {MASKED.name} "
                  f"(the source's masked): {changed or 'none'}. {len(s_data.labels)} texts in one "
                  f"right-padded batch; truncated: {list(s_data.truncated) or 'none'}")
    _figure_padding(evidence, s_data, matrix, kind)
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
    harness.saes.specialists' definition (score = strong inside - strong outside, top-5 candidates)."""
    cols: dict[str, list] = {"hook": [], "policy": [], "text": [], "category": [], "threshold": [],
                             "strong_features": []}
    for h in data.hooks:
        thr = data.threshold(kind, h)
        for p in POOLING_POLICIES:
            strong = data.codes[(h, p.name)] > thr  # (n_texts, d_sae)
            for t, row in enumerate(strong):
                cols["hook"].append(h)
                cols["policy"].append(p.name)
                cols["text"].append(t)
                cols["category"].append(data.labels[t])
                cols["threshold"].append(thr)
                cols["strong_features"].append(np.flatnonzero(row).tolist())
    evidence.data("strong_features", cols, f"threshold {kind}: per SAE hook, pooling policy and "
                  "text (in the texts file's order), the features whose pooled code is > threshold")
    cand: dict[str, list] = {"hook": [], "policy": [], "category": [], "candidates": []}
    for h in data.hooks:
        for p in POOLING_POLICIES:
            for r in data.table(kind, h, p).per_category:
                cand["hook"].append(h)
                cand["policy"].append(p.name)
                cand["category"].append(r.category)
                cand["candidates"].append(list(r.candidates))
    evidence.data("candidates", cand, "per SAE hook, pooling policy and category: the top-5 "
                  "candidate features by peak pooled code inside the category; with strong_features, "
                  "a category has a specialist when some candidate's strong-inside minus "
                  "strong-outside count is > 0, and the headline is the masked-nobos count minus the "
                  "unmasked-bos count, summed over hooks")


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
    draws = [contrasts(totals(resample_within_categories(data.labels, rng))) for _ in range(N_BOOT)]
    for name, value in point.items():
        est = percentile_estimate(value, np.array([d[name] for d in draws]), len(data.labels), STRATIFIED)
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
    _require_texts(texts, evidence)
    _require_depths(s_data, evidence)
    counts = _counts(s_data, kind)
    boots = stratified_bootstrap(s_data.labels, lambda rows: spearman(s_data.depths, _counts(s_data, kind, rows=rows)),
                                 rng, N_BOOT)
    null = label_shuffle_null(s_data.labels, lambda lab: spearman(s_data.depths, _counts(s_data, kind, labels=lab)),
                              rng, N_NULL)
    per_cat = {h: s_data.table(kind, h).to_dict() for h in s_data.hooks}
    evidence.record("depth_count_spearman",
                    percentile_estimate(spearman(s_data.depths, counts), boots, len(s_data.labels), STRATIFIED),
                    null=null_estimate(null),
                    description=f"Spearman(depth, specialists) over depths {s_data.depths}, threshold {kind}, "
                    f"{MASKED.name} pooling (0 when the counts are all equal)",
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
    ax.set(xlabel="layer", title=f"best specialist score, inside - outside ({kind})")
    fig.colorbar(im, ax=ax)
    evidence.figure(fig, f"specialist_scores_{kind}")
    plt.close(fig)


# --- S3, S4: coverage and peak against depth ----------------------------------------------------


@pytest.mark.claim(id="S3")
def test_most_frequent_feature_coverage_falls_with_depth(saes, s_data, texts, claim, evidence, rng):
    _require_texts(texts, evidence)
    _require_depths(s_data, evidence)

    def coverage(rows=None):
        return [most_frequent_coverage(s_data.codes[(h, MASKED.name)] if rows is None
                                       else s_data.codes[(h, MASKED.name)][rows])[1] for h in s_data.hooks]

    n_texts = len(s_data.labels)  # a stratified resample keeps the number of texts
    cov = [most_frequent_coverage(s_data.codes[(h, MASKED.name)]) for h in s_data.hooks]
    boots = stratified_bootstrap(s_data.labels, lambda rows: coverage_slope(coverage(rows), n_texts), rng, N_BOOT)
    evidence.record("coverage_slope",
                    percentile_estimate(coverage_slope([c for _, c in cov], n_texts), boots, n_texts, STRATIFIED),
                    description=f"slope of most-frequent-feature coverage per depth step over depths {s_data.depths}",
                    coverage={d: {"feature": f, "coverage": c} for d, (f, c) in zip(s_data.depths, cov, strict=True)})
    evidence.note(f"coverage per depth: {[round(c, 3) for _, c in cov]} (source: "
                  f"{_published_series(claim, 'most-frequent feature coverage')})")
    evidence.judge()


@pytest.mark.claim(id="S4")
def test_peak_activation_grows_with_depth(saes, s_data, texts, claim, evidence, rng):
    _require_texts(texts, evidence)
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
    score: int


def _specialists(data: SData, kind: str) -> list[Specialist]:
    out = []
    for h, d in zip(data.hooks, data.depths, strict=True):
        for r in data.table(kind, h).per_category:
            if r.has_specialist:
                out.append(Specialist(h, d, r.category, r.best_feature, r.best_score))
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
    _require_texts(texts, evidence)
    specs = _specialists(s_data, kind)
    if not specs:
        evidence.inconclusive(f"no specialists at any depth under threshold {kind}: nothing to inspect",
                              code="no-specialists")
    zs = _token_codes(saes, s_acts, s_batch, specs)
    tokens = s_batch.tokens.cpu().numpy()
    keep = s_batch.content_mask.cpu().numpy()
    labels = np.array(s_data.labels)
    tok = subject.model.tokenizer
    rows = []
    for s in specs:
        r = trigger_ratio(zs[s], tokens, keep, labels == s.category)
        rows.append({"depth": s.depth, "category": s.category, "feature": s.feature, "score": s.score,
                     **r, "trigger_strings": tok.convert_ids_to_tokens(r["triggers"])})  # byte-level pieces stay distinct
    ratios = np.array([r["ratio"] for r in rows], dtype=float)
    ok = ratios[np.isfinite(ratios)]
    if ok.size < 3:
        evidence.note(f"specialists: {rows}")
        evidence.inconclusive(f"only {ok.size} of {len(rows)} specialists have trigger tokens occurring "
                              f">= {MIN_OUTSIDE} times outside their category (need 3)", code="too-few-units")
    boots = np.array([np.median(ok[idx]) for idx in bootstrap_indices(ok.size, rng, 2000)])
    evidence.record("median_outside_inside_firing_ratio",
                    percentile_estimate(float(np.median(ok)), boots, int(ok.size), "bootstrap-percentile (specialists)"),
                    description=f"median over specialists ({kind}) of firing rate on their top-{TRIGGER_TOKENS} "
                    "trigger tokens outside their category / inside it (token level, BOS and pads excluded)",
                    specialists=rows, n_without_outside_triggers=int(np.isnan(ratios).sum()))
    evidence.note("per specialist (depth, category, feature: triggers -> ratio): " + "; ".join(
        f"L{r['depth']} {r['category']} f{r['feature']}: {r['trigger_strings']} -> "
        f"{r['ratio']:.2f}" for r in rows))
    _attach_highlight(evidence, subject, s_data, s_batch, specs, zs, kind)
    evidence.judge()


def _attach_highlight(evidence, subject, data: SData, batch, specs, zs, kind) -> None:
    """HTML: the deepest, highest-scoring specialist over 6 texts of its category and the 4
    outside texts where it fires most."""
    from harness.saes.features import token_html

    s = max(specs, key=lambda x: (x.depth, x.score))
    z = zs[s]
    labels = np.array(data.labels)
    inside = np.flatnonzero(labels == s.category)[:6]
    outside = np.flatnonzero(labels != s.category)
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
        caption=f"per-token code of feature {s.feature} of the SAE at {s.hook}; first rows: its "
        "category's texts, last 4: the outside texts where it fires most"))


# --- S6: the hardest categories -----------------------------------------------------------------


@pytest.mark.claim(id="S6")
@pytest.mark.parametrize("kind", THRESHOLDS)
def test_social_and_conversational_are_hardest(saes, s_data, texts, kind, evidence, rng):
    _require_texts(texts, evidence, HARD_CATEGORIES)
    hard_categories = tuple(texts.find(c) for c in HARD_CATEGORIES)  # as the user spelt them

    def gap(rows=None, labels=None):
        scores = {c: [] for c in sorted(set(s_data.labels))}
        for h in s_data.hooks:
            for r in s_data.table(kind, h, rows=rows, labels=labels).per_category:
                scores[r.category].append(r.best_score)
        hard = np.mean([np.mean(scores[c]) for c in hard_categories])
        rest = np.mean([np.mean(v) for c, v in scores.items() if c not in hard_categories])
        return float(hard - rest)

    first = {}
    for c in sorted(set(s_data.labels)):
        with_spec = [d for h, d in zip(s_data.hooks, s_data.depths, strict=True)
                     if s_data.table(kind, h).by_category()[c].has_specialist]
        first[c] = with_spec[0] if with_spec else None
    boots = stratified_bootstrap(s_data.labels, lambda rows: gap(rows=rows), rng, N_BOOT)
    null = label_shuffle_null(s_data.labels, lambda lab: gap(labels=lab), rng, N_NULL)
    evidence.record("hard_minus_other_mean_best_score",
                    percentile_estimate(gap(), boots, len(s_data.labels), STRATIFIED),
                    null=null_estimate(null),
                    description=f"mean over depths {s_data.depths} of the best specialist score of "
                    f"{hard_categories} minus that of the other categories, threshold {kind}",
                    first_depth_with_specialist=first)
    evidence.note(f"first depth with a specialist per category: {first} (source: social and "
                  "conversational only in deep layers)")
    evidence.judge()


# --- S7: sparsity and the hook-mismatch detector ------------------------------------------------


@pytest.mark.claim(id="S7")
def test_hook_mismatch_is_detectable(subject, saes, s_data, s_acts, s_batch, texts, evidence, rng):
    from harness.saes.sources import fve_from_sums, reconstruction_sums

    _require_texts(texts, evidence)
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
