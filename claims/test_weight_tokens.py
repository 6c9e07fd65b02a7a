"""Family W: weight-decoded tokens vs maximally activating inputs (CLAIMS.md; thesis seeds/000).

Method 1: each neuron's top-20 contexts over the background corpus (distinct contexts ranked by
their max ``hook_post``, BOS excluded) and the token at each argmax. Method 2: the top-20
vocabulary tokens by weight geometry, under both definitions of CLAIMS.md (TL-processed cosine;
neuron-viewer ``W_E @ diag(ln2.w) @ W`` on unprocessed weights) and, for gated MLPs, both the
gate and the linear branch. The headline Method-2 definition is the TL cosine on the weight that
produces ``hook_pre`` (W_gate for gated MLPs, W_in otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from harness.activations.harvest import harvest, mlp_neurons_spec
from harness.analyses.agreement import (
    Vocabulary,
    dominant_token_ratio,
    neuron_metrics,
    null_metrics,
)
from harness.analyses.geometry import GeometryDefinition, cached_method2_topk, definitions_for
from harness.evidence.figures import pyplot
from harness.models.subjects import RAW
from harness.statistics.stats import Estimate, bootstrap, claim_rng, percentile_estimate, slope

K = 20
N_PERM = 10
SHALLOWEST = 0
W1_STATISTICS = ("overlap_any", "jaccard", "top1_match", "embed_cos")


@dataclass(frozen=True)
class LayerAgreement:
    """Per-neuron metrics and their re-pairing null at one layer, one Method-2 definition."""

    observed: dict[str, np.ndarray]
    null: dict[str, np.ndarray]

    def excess(self, metric: str) -> np.ndarray:
        d = self.observed[metric] - self.null[metric]
        return d[~np.isnan(d)]


@dataclass(frozen=True)
class WData:
    layers: int
    headline: GeometryDefinition
    definitions: tuple[GeometryDefinition, ...]
    agreement: dict[tuple[str, int], LayerAgreement]  # (definition label, layer)
    dtr: dict[int, np.ndarray]
    processing: dict
    method1: dict[int, np.ndarray]  # layer -> (K, n_neurons) token ids of the top contexts' argmax
    method2: dict[tuple[str, int], np.ndarray]  # (definition label, layer) -> (K, n_neurons)


def _label(d: GeometryDefinition) -> str:
    return f"{d.name}/{d.branch}"


@pytest.fixture(scope="module")
def w_data(subject, subject_variant, corpus, content_cache, run_state) -> WData:
    model = subject.model
    n_layers = model.cfg.n_layers
    spec = mlp_neurons_spec(n_layers, k=K)
    harvested = harvest(subject, corpus, spec, content_cache)
    m1 = {layer: harvested[h].top_tokens(corpus).numpy() for layer, h in enumerate(spec.hooks)}
    raw = subject_variant(RAW)
    vocab = Vocabulary.from_tokenizer(model.tokenizer, model.cfg.d_vocab)
    defs = definitions_for(model)
    headline = next(d for d in defs if d.name == "tl_cosine" and d.branch in ("gate", "in"))
    rng = claim_rng(run_state.seed, "W-family")  # one generator for the shared nulls
    agreement, method2 = {}, {}
    for d in defs:
        source = subject if d.name == "tl_cosine" else raw
        # The headline definition at every layer (W2); the others at the shallowest layer only.
        for layer in range(n_layers) if d == headline else (SHALLOWEST,):
            m2 = cached_method2_topk(content_cache, source, layer, d, k=K).context.numpy()
            method2[(_label(d), layer)] = m2
            agreement[(_label(d), layer)] = LayerAgreement(
                observed=neuron_metrics(m1[layer], m2, vocab, model.W_E),
                null=null_metrics(m1[layer], m2, vocab, model.W_E, rng, n_perm=N_PERM),
            )
    dtr = {layer: dominant_token_ratio(m1[layer], vocab) for layer in range(n_layers)}
    return WData(n_layers, headline, defs, agreement, dtr, subject.spec.processing.as_kwargs(), m1, method2)


def _neuron_data(evidence, w_data: WData, metric: str) -> None:
    """Per neuron of the shallowest layer (headline definition): both token lists, the
    observed metric, its re-pairing null and the excess the headline averages."""
    label = _label(w_data.headline)
    la = w_data.agreement[(label, SHALLOWEST)]
    obs, null = la.observed[metric], la.null[metric]
    evidence.data("neurons", {
        "neuron": np.arange(obs.size), "method1_tokens": w_data.method1[SHALLOWEST].T,
        "method2_tokens": w_data.method2[(label, SHALLOWEST)].T, metric: obs, f"{metric}_null": null,
        "excess": obs - null,
    }, f"layer {SHALLOWEST}, Method 2 = {label}: the headline is the mean of the non-NaN "
       f"'excess' (= {metric} - {metric}_null, the null a mean over {N_PERM} re-pairings); token "
       "lists are token ids (Method 1: argmax token of each top context, in rank order)")


def _excess_estimate(values: np.ndarray, rng) -> Estimate:
    return bootstrap(values, np.mean, rng, n_resamples=2000)


@pytest.mark.claim(id="W1")
@pytest.mark.parametrize("statistic", W1_STATISTICS)
def test_agreement_beats_chance(w_data, statistic, evidence, rng):
    for d in w_data.definitions:
        la = w_data.agreement[(_label(d), SHALLOWEST)]
        obs = la.observed[statistic]
        name = "excess_over_null" if d == w_data.headline else f"excess_over_null[{_label(d)}]"
        evidence.record(
            name, _excess_estimate(la.excess(statistic), rng),
            null=float(np.nanmean(la.null[statistic])),
            description=f"mean {statistic} minus re-pairing null, layer {SHALLOWEST}, Method 2 = {_label(d)}",
            observed_mean=float(np.nanmean(obs)),
        )
    evidence.note(f"Headline Method 2: {_label(w_data.headline)}; k = {K}; null = mean over {N_PERM} "
                  f"random re-pairings of neurons; weight processing {w_data.processing}.")
    _neuron_data(evidence, w_data, statistic)
    evidence.judge()


def _per_layer_table(w_data: WData) -> list[dict]:
    rows = []
    label = _label(w_data.headline)
    for layer in range(w_data.layers):
        la = w_data.agreement[(label, layer)]
        rows.append({
            "layer": layer,
            "overlap_any": float(np.mean(la.observed["overlap_any"])),
            "overlap_any_null": float(np.mean(la.null["overlap_any"])),
            "jaccard": float(np.mean(la.observed["jaccard"])),
            "jaccard_null": float(np.mean(la.null["jaccard"])),
            "top1_match": float(np.mean(la.observed["top1_match"])),
            "share_dtr_1": float(np.mean(w_data.dtr[layer] == 1.0)),
            "mean_dtr": float(np.mean(w_data.dtr[layer])),
        })
    return rows


@pytest.mark.claim(id="W2")
def test_agreement_falls_with_depth(w_data, evidence, rng):
    if w_data.layers < 2:
        evidence.inconclusive(f"the subject has {w_data.layers} layer: a trend over depth needs at "
                              "least two (W1, W3 and W4 read the one layer)", code="not-applicable")
    label = _label(w_data.headline)
    per_layer = [w_data.agreement[(label, layer)].observed["jaccard"] for layer in range(w_data.layers)]
    means = np.array([v.mean() for v in per_layer])
    boots = np.empty(2000)
    for b in range(len(boots)):  # resample neurons within each layer
        boots[b] = slope(np.array([v[rng.integers(0, len(v), len(v))].mean() for v in per_layer]))
    evidence.record("jaccard_slope_per_layer",
                    percentile_estimate(slope(means), boots, int(sum(map(len, per_layer))),
                                        "bootstrap-percentile (neurons within layers)"),
                    description=f"least-squares slope of per-layer mean Jaccard vs layer ({label})")
    if w_data.layers > 3:
        # Is the trend more than the first layer? The same slope without layer 0.
        rest = slope(means[1:])
        boots_rest = np.array([slope(np.array([v[rng.integers(0, len(v), len(v))].mean() for v in per_layer[1:]]))
                               for _ in range(500)])
        evidence.record("jaccard_slope_without_layer_0",
                        percentile_estimate(rest, boots_rest, int(sum(map(len, per_layer[1:]))),
                                            "bootstrap-percentile (neurons within layers)"),
                        description="the same slope over layers 1..L-1 (is the fall carried by layer 0 alone?)")
    table = _per_layer_table(w_data)
    evidence.record("jaccard_first_minus_last",
                    Estimate(float(means[0] - means[-1]), float("nan"), float("nan"), w_data.layers, "difference"),
                    description="mean Jaccard at layer 0 minus the last layer", per_layer=table)
    _figure_w2(evidence, table)
    evidence.data("neurons_by_layer", {
        "layer": np.concatenate([np.full(len(v), layer) for layer, v in enumerate(per_layer)]),
        "neuron": np.concatenate([np.arange(len(v)) for v in per_layer]),
        "jaccard": np.concatenate(per_layer),
    }, f"per neuron and layer, Jaccard of the Method-1 and Method-2 ({label}) token sets; the "
       "headline is the least-squares slope of the per-layer means against the layer")
    evidence.judge()


def _figure_w2(evidence, table) -> None:
    plt = pyplot()

    layers = [r["layer"] for r in table]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    for key, colour in (("jaccard", "C0"), ("overlap_any", "C1")):
        a.plot(layers, [r[key] for r in table], marker="o", ms=3, color=colour, label=key)
        a.plot(layers, [r[f"{key}_null"] for r in table], ls="--", color=colour, label=f"{key} (null)")
    a.set(xlabel="layer", ylabel="agreement", title="W2: Method 1 vs Method 2 by layer")
    a.legend(fontsize=8)
    b.plot(layers, [r["share_dtr_1"] for r in table], marker="o", ms=3, label="share DTR = 1")
    b.plot(layers, [r["mean_dtr"] for r in table], marker="s", ms=3, label="mean DTR")
    b.set(xlabel="layer", ylabel="ratio", title="Dominant Token Ratio (Method 1)")
    b.legend(fontsize=8)
    evidence.figure(fig, "agreement_by_layer")
    plt.close(fig)


@pytest.mark.claim(id="W3")
def test_dominant_type_agreement_beats_chance(w_data, evidence, rng):
    la = w_data.agreement[(_label(w_data.headline), SHALLOWEST)]
    evidence.record("excess_over_null", _excess_estimate(la.excess("type_match"), rng),
                    null=float(np.mean(la.null["type_match"])),
                    description=f"dominant-type match minus re-pairing null, layer {SHALLOWEST}",
                    observed_mean=float(np.mean(la.observed["type_match"])))
    _neuron_data(evidence, w_data, "type_match")
    evidence.judge()


@pytest.mark.claim(id="W4")
def test_shallow_neurons_perfectly_selective(w_data, evidence, rng):
    dtr = w_data.dtr[SHALLOWEST]
    evidence.record("share_dtr_1", bootstrap((dtr == 1.0).astype(float), np.mean, rng),
                    description=f"share of layer-{SHALLOWEST} neurons whose top-{K} contexts all peak on one token")
    evidence.record("mean_dtr", bootstrap(dtr, np.mean, rng), description="mean DTR, same layer")
    evidence.data("neurons", {"neuron": np.arange(dtr.size), "method1_tokens": w_data.method1[SHALLOWEST].T,
                              "dtr": dtr},
                  f"layer {SHALLOWEST}: each neuron's Method-1 tokens and its Dominant Token Ratio; the "
                  "headline is the share of DTR == 1")
    evidence.judge()

