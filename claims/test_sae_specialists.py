# DRAFT (not collected by pytest: the file name lacks the test_ prefix). Family S claims, written
# against harness.saes; not yet run on trained SmolLM2 SAEs, so not yet in the suite. Rename to
# test_sae_specialists.py once the SAE build is measured and the verdicts reviewed.
"""Family S: SAE category specialists (CLAIMS.md; source notebooks seeds/002).

One vector per text: the texts run as ONE right-padded batch with BOS prepended, the hook's
activations are mean-pooled under each policy of the padding matrix (masked / unmasked x BOS
kept / dropped; ``harness.capture.pool``), then ``sae.encode``-d. The specialist search is the
source's (``harness.specialists``) under two thresholds: the source's strict 5.0 (a number
specific to the gpt2-small-res-jb SAEs' scale) and a scale-free one (the 0.99 quantile of the
SAE's positive codes on the texts, masked pooling with BOS).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from scipy import stats

from harness.capture import POOLING_POLICIES, PoolingPolicy, capture, pool, tokenize
from harness.figures import pyplot
from harness.specialists import (
    SCALE_FREE_QUANTILE,
    SOURCE_THRESHOLD,
    find_specialists,
    most_frequent_coverage,
    peak_activation,
    resample_within_categories,
    scale_free_threshold,
)
from harness.stats import Estimate

MIN_TEXTS_PER_CATEGORY = 10  # the source's 10 per category
N_BOOT = 300
N_NULL = 50
MASKED_BOS = PoolingPolicy(mask_padding=True, keep_bos=True)
UNMASKED_BOS = PoolingPolicy(mask_padding=False, keep_bos=True)
THRESHOLDS = ("source-5.0", f"scale-free-q{SCALE_FREE_QUANTILE}")


@dataclass(frozen=True)
class SData:
    labels: tuple[str, ...]
    depths: tuple[int, ...]
    hooks: tuple[str, ...]
    codes: dict[tuple[str, str], np.ndarray]  # (hook, policy name) -> (n_texts, d_sae)
    truncated: tuple[int, ...]

    def threshold(self, kind: str, hook: str) -> float:
        if kind == THRESHOLDS[0]:
            return SOURCE_THRESHOLD
        return scale_free_threshold(self.codes[(hook, MASKED_BOS.name)])


@pytest.fixture(scope="module")
def s_data(subject, saes, texts) -> SData:
    model = subject.model
    resid = [s for s in saes if s.hook_name.endswith("hook_resid_pre")]
    hooks = tuple(s.hook_name for s in resid)
    labels = tuple(t.category for t in texts.texts)
    batch = tokenize(model, [t.text for t in texts.texts])
    acts = capture(model, batch.tokens, hooks)
    codes = {}
    with torch.no_grad():
        for s in resid:
            for policy in POOLING_POLICIES:
                pooled = pool(acts[s.hook_name].float(), batch, policy)  # (n_texts, d_model)
                codes[(s.hook_name, policy.name)] = s.sae.encode(pooled.to(s.sae.W_enc.dtype)).cpu().numpy()
    depths = tuple(int(h.split(".")[1]) for h in hooks)
    return SData(labels, depths, hooks, codes, batch.truncated)


def _require_texts(texts, evidence) -> None:
    short = texts.require(MIN_TEXTS_PER_CATEGORY)
    if short:
        evidence.inconclusive(f"categories with fewer than {MIN_TEXTS_PER_CATEGORY} texts: {short}")


def _counts(data: SData, kind: str, policy: PoolingPolicy, rows: np.ndarray | None = None,
            labels: tuple[str, ...] | None = None) -> list[int]:
    labels = labels or data.labels
    out = []
    for h in data.hooks:
        codes = data.codes[(h, policy.name)]
        lab = labels if rows is None else tuple(labels[i] for i in rows)
        sub = codes if rows is None else codes[rows]
        out.append(find_specialists(sub, lab, data.threshold(kind, h)).count)
    return out


def _boot(data: SData, fn, rng, n: int = N_BOOT) -> np.ndarray:
    return np.array([fn(resample_within_categories(data.labels, rng)) for _ in range(n)])


def _estimate(value: float, boots: np.ndarray, n: int, method: str = "bootstrap-percentile (texts within categories)") -> Estimate:
    lo, hi = np.nanpercentile(boots, [2.5, 97.5]) if np.isfinite(boots).any() else (np.nan, np.nan)
    return Estimate(float(value), float(lo), float(hi), n, method)


def _shuffled_counts(data: SData, kind: str, rng) -> list[float]:
    """Specialist counts per depth with category labels shuffled across texts (mean of N_NULL)."""
    acc = np.zeros(len(data.hooks))
    for _ in range(N_NULL):
        acc += _counts(data, kind, MASKED_BOS, labels=tuple(rng.permutation(np.array(data.labels))))
    return (acc / N_NULL).tolist()


@pytest.mark.claim(id="S1")
@pytest.mark.parametrize("kind", THRESHOLDS)
def test_padding_masking_raises_specialist_counts(s_data, texts, kind, evidence, rng):
    _require_texts(texts, evidence)
    matrix = {p.name: _counts(s_data, kind, p) for p in POOLING_POLICIES}
    gain = sum(matrix[MASKED_BOS.name]) - sum(matrix[UNMASKED_BOS.name])
    boots = _boot(s_data, lambda rows: sum(_counts(s_data, kind, MASKED_BOS, rows))
                  - sum(_counts(s_data, kind, UNMASKED_BOS, rows)), rng)
    evidence.record("specialist_gain_masked_minus_unmasked", _estimate(gain, boots, len(s_data.labels)),
                    description=f"sum over depths {s_data.depths} of specialists(masked, BOS) - "
                    f"specialists(unmasked, BOS), threshold {kind}",
                    padding_matrix=matrix, depths=list(s_data.depths),
                    thresholds={h: s_data.threshold(kind, h) for h in s_data.hooks})
    evidence.record("null_specialists_shuffled_labels",
                    Estimate(float(np.mean(_shuffled_counts(s_data, kind, rng))), np.nan, np.nan, N_NULL, "label-shuffle mean"),
                    description="mean specialists per depth with category labels shuffled (masked, BOS)")
    changed = sorted({p for p, c in matrix.items() if c != matrix[MASKED_BOS.name]})
    evidence.note(f"padding matrix (counts per depth {s_data.depths}): {matrix}; settings that change the "
                  f"count relative to masked-bos: {changed or 'none'}; {len(s_data.labels)} texts in one "
                  f"right-padded batch, truncated: {list(s_data.truncated) or 'none'}")
    _figure_padding(evidence, s_data, matrix, kind)
    evidence.judge()


def _figure_padding(evidence, data: SData, matrix, kind) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, counts in matrix.items():
        ax.plot(data.depths, counts, marker="o", label=name)
    ax.set(xlabel="layer (SAE depth)", ylabel="categories with a specialist", ylim=(-0.3, 7.3),
           title=f"S1: specialists by padding policy ({kind})")
    ax.legend(fontsize=8)
    evidence.figure(fig, f"padding_policies_{kind}")
    plt.close(fig)


def _spearman(depths, counts) -> float:
    if len(set(counts)) < 2:
        return float("nan")
    return float(stats.spearmanr(depths, counts).statistic)


@pytest.mark.claim(id="S2")
@pytest.mark.parametrize("kind", THRESHOLDS)
def test_deeper_layers_have_more_specialists(s_data, texts, kind, evidence, rng):
    _require_texts(texts, evidence)
    counts = _counts(s_data, kind, MASKED_BOS)
    boots = _boot(s_data, lambda rows: _spearman(s_data.depths, _counts(s_data, kind, MASKED_BOS, rows)), rng)
    evidence.record("depth_count_spearman", _estimate(_spearman(s_data.depths, counts), boots, len(s_data.labels)),
                    description=f"Spearman(depth, specialists) over depths {s_data.depths}, threshold {kind}",
                    counts=counts, non_decreasing=bool(all(np.diff(counts) >= 0)),
                    null_counts_shuffled_labels=_shuffled_counts(s_data, kind, rng))
    per_cat = {h: find_specialists(s_data.codes[(h, MASKED_BOS.name)], s_data.labels,
                                   s_data.threshold(kind, h)).to_dict() for h in s_data.hooks}
    evidence.note(f"specialists per depth {dict(zip(s_data.depths, counts, strict=True))} (non-decreasing: "
                  f"{all(np.diff(counts) >= 0)}); per-category tables in the statistic's extra fields")
    evidence.statistics["depth_count_spearman"]["per_category"] = per_cat
    _figure_heatmap(evidence, s_data, per_cat, kind)
    evidence.judge()


def _figure_heatmap(evidence, data: SData, per_cat, kind) -> None:
    plt = pyplot()

    cats = sorted(set(data.labels))
    grid = np.array([[per_cat[h]["categories"][c]["score"] for h in data.hooks] for c in cats])
    fig, ax = plt.subplots(figsize=(5, 4))
    im = ax.imshow(grid, cmap="RdBu_r", vmin=-np.abs(grid).max(), vmax=np.abs(grid).max())
    ax.set_xticks(range(len(data.hooks)), [str(d) for d in data.depths])
    ax.set_yticks(range(len(cats)), cats)
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=8)
    ax.set(xlabel="layer", title=f"best specialist score ({kind})")
    fig.colorbar(im, ax=ax)
    evidence.figure(fig, f"specialist_scores_{kind}")
    plt.close(fig)


def _slope(y) -> float:
    return float(np.polyfit(np.arange(len(y), dtype=float), np.asarray(y, dtype=float), 1)[0])


@pytest.mark.claim(id="S3")
def test_most_frequent_feature_coverage_falls_with_depth(s_data, texts, evidence, rng):
    _require_texts(texts, evidence)
    cov = [most_frequent_coverage(s_data.codes[(h, MASKED_BOS.name)]) for h in s_data.hooks]
    boots = _boot(s_data, lambda rows: _slope([most_frequent_coverage(s_data.codes[(h, MASKED_BOS.name)][rows])[1]
                                                for h in s_data.hooks]), rng)
    evidence.record("coverage_slope", _estimate(_slope([c for _, c in cov]), boots, len(s_data.labels)),
                    description=f"slope of most-frequent-feature coverage over depths {s_data.depths}",
                    coverage={d: {"feature": f, "coverage": c} for d, (f, c) in zip(s_data.depths, cov, strict=True)})
    evidence.judge()


@pytest.mark.claim(id="S4")
def test_peak_activation_grows_with_depth(s_data, texts, evidence, rng):
    _require_texts(texts, evidence)
    peaks = [peak_activation(s_data.codes[(h, MASKED_BOS.name)]) for h in s_data.hooks]
    boots = _boot(s_data, lambda rows: _slope(np.log([peak_activation(s_data.codes[(h, MASKED_BOS.name)][rows])
                                                      for h in s_data.hooks])), rng)
    evidence.record("log_peak_slope", _estimate(_slope(np.log(peaks)), boots, len(s_data.labels)),
                    description=f"slope of log peak pooled code over depths {s_data.depths}",
                    peaks=dict(zip(s_data.depths, peaks, strict=True)))
    evidence.judge()

