"""Family N, N1/N2/N5: one neuron's pair plane on baseline generations (CLAIMS.md; seeds/001).

The source: gpt2-small ``blocks.11.mlp.hook_post``, neuron 373 and partner 2202, prompts without
BOS, 50 greedy new tokens, hook_post averaged over the generated positions into one vector per
prompt, a spotlight swept around the (neuron, partner) plane. Here the neuron and partner come
from harness.analyses.neuron_choice (the source's ids on gpt2-small, a stated procedure on
unclamped corpus data elsewhere); the prompts are this project's general set
(fixtures/prompts_n.txt) plus prompts cut from the chosen neuron's max-activating contexts in the
choice sample. ONE baseline run (no hook) is shared by the claims; every interval resamples
prompts. The ``last`` role (the source's depth) is the headline; the ``mid`` role's pair is
reported beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from harness.activations.generation import GenerationResult, GenerationSpec, run_generation
from harness.analyses.neuron_choice import ChoiceSpec, NeuronChoice, choose_neurons, top_contexts
from harness.analyses.srm import (
    angle_grid,
    cosines,
    in_plane_norms,
    mean_curve_coefficients,
    mean_curve_peak,
    srm,
)
from harness.evidence.figures import pyplot
from harness.statistics.stats import Estimate, bootstrap, exact, percentile_estimate

PROMPTS_FILE = "fixtures/prompts_n.txt"
N_NEURON_PROMPTS = 8  # prompts cut from the last-role neuron's top contexts
WINDOW = 24  # tokens of context up to and including the max-activating token
MAX_NEW_TOKENS = 50  # the source's
N_ANGLES = 360  # the write-up's 1-degree grid
N_RANDOM_PAIRS = 1000
N_RESAMPLES = 1000  # prompt resamples of hand-written intervals
CROSS = 0.1  # the source's lowest threshold


@dataclass(frozen=True)
class NRun:
    """The choice, the prompts and the one baseline generation the claims share."""

    choices: dict[str, NeuronChoice]
    prompts: tuple[str, ...]
    kind: np.ndarray  # (n_prompts,) "general" or "neuron"
    contexts: list[tuple[int, int, float]]  # the neuron prompts' (context, position, max value)
    result: GenerationResult

    def means(self, role: str = "last") -> torch.Tensor:  # (n_prompts, d_mlp) float64
        return self.result.means[self.choices[role].hook].double()

    def plane(self, role: str = "last") -> tuple[int, int]:
        return self.choices[role].neuron, self.choices[role].partner


def _neuron_prompts(model, corpus, choice: NeuronChoice) -> tuple[list[str], list[tuple]]:
    """Decoded windows ending at the neuron's max in its top sample contexts (non-blank ones)."""
    prompts, used = [], []
    for c, pos, value in top_contexts(choice, 4 * N_NEURON_PROMPTS):
        ids = corpus.tokens[c, max(1, pos + 1 - WINDOW): pos + 1].tolist()
        text = model.tokenizer.decode(ids)
        if text.strip() and text not in prompts:
            prompts.append(text)
            used.append((c, pos, value))
        if len(prompts) == N_NEURON_PROMPTS:
            break
    return prompts, used


@pytest.fixture(scope="module")
def n_run(subject, corpus, content_cache, pytestconfig) -> NRun:
    """Choose the neurons, build the prompts, generate once (baseline: no hook), cached."""
    model = subject.model
    choices = choose_neurons(subject, corpus, ChoiceSpec(), content_cache)
    general = [line for line in (pytestconfig.rootpath / PROMPTS_FILE).read_text(
        encoding="utf-8").splitlines() if line.strip()]
    specific, contexts = _neuron_prompts(model, corpus, choices["last"])
    prompts = tuple(general + specific)
    spec = GenerationSpec(prompts=prompts, max_new_tokens=MAX_NEW_TOKENS,
                          hooks=tuple(sorted({c.hook for c in choices.values()})), per_token=True,
                          batch_size=32)  # one batch: 50 decoding steps instead of 200 (cold cost)
    result = run_generation(model, spec, cache=content_cache, subject=subject.weight_hash)
    kind = np.array(["general"] * len(general) + ["neuron"] * len(specific))
    return NRun(choices, prompts, kind, contexts, result)


def _record_choice(evidence, run: NRun) -> None:
    for role, c in run.choices.items():
        evidence.note(c.describe())
        ups = c.runner_ups(5)
        evidence.note(f"{role} runner-ups by variance {ups['by_variance']} "
                      f"({', '.join(f'{v:.3g}' for v in ups['variance'])}); top co-activators of "
                      f"{c.neuron} {ups['by_r']} (r {', '.join(f'{v:.3f}' for v in ups['r'])})")
    evidence.note(f"prompts: {int((run.kind == 'general').sum())} general ({PROMPTS_FILE}) + "
                  f"{int((run.kind == 'neuron').sum())} cut from the last-role neuron's top contexts "
                  f"of the choice sample (bounded scan, not the corpus harvest), {WINDOW}-token windows "
                  f"ending at the max; no BOS; greedy {MAX_NEW_TOKENS} new tokens, EOS stops; "
                  f"{int(run.result.stopped.sum())} rows stopped at EOS; baseline = no hook")


# ---------------------------------------------------------------------------------------- N2


def _random_pairs(d: int, rng: np.random.Generator) -> np.ndarray:
    """(N_RANDOM_PAIRS, 2) distinct units i != j of one layer."""
    i = rng.integers(0, d, N_RANDOM_PAIRS)
    j = (i + rng.integers(1, d, N_RANDOM_PAIRS)) % d
    return np.stack([i, j], axis=1)


def _pair_norms(X: torch.Tensor, pairs: np.ndarray) -> np.ndarray:
    """(n_pairs, n_vectors) in-plane norms ||p_v|| of every vector in every coordinate plane."""
    U = (X / torch.linalg.vector_norm(X, dim=1, keepdim=True)).numpy()  # (n, d)
    return np.hypot(U[:, pairs[:, 0]], U[:, pairs[:, 1]]).T


@pytest.mark.claim(id="N2")
def test_baseline_crosses_no_threshold(n_run, evidence, rng, claim):
    _record_choice(evidence, n_run)
    X = n_run.means("last")
    n, d = X.shape
    plane = n_run.plane("last")
    norms = in_plane_norms(X, plane, dtype=torch.float64).numpy()  # (n,)
    # Random pairs of the same layer: what any pair gives on the same vectors (the null).
    pairs = _random_pairs(d, rng)
    rn = _pair_norms(X, pairs)  # (n_pairs, n)
    pair_max = rn.max(1)  # (n_pairs,)
    null = Estimate(float(np.median(pair_max)), *map(float, np.percentile(pair_max, [2.5, 97.5])),
                    N_RANDOM_PAIRS, "random-pairs-percentiles")
    evidence.record("max_in_plane_norm", bootstrap(norms, np.max, rng, n_resamples=N_RESAMPLES),
                    null=null,
                    description=f"max over {n} prompts of the in-plane norm ||p_v|| of the baseline "
                    f"mean hook_post vectors in the plane (e_{plane[0]}, e_{plane[1]}); a vector "
                    f"crosses t at some angle iff ||p_v|| > t; interval: prompts resampled; null: "
                    f"median [2.5, 97.5 percentiles] of the same max for {N_RANDOM_PAIRS} random pairs")
    profile = srm(X, plane, N_ANGLES, convention="source", dtype=torch.float64)
    crossings = profile.counts.max(1).values.tolist()  # per threshold, the max over angles
    evidence.record("max_count_over_angles_at_0.1", exact(crossings[-1], n),
                    description=f"source convention (count of c > t, strict) at t = {CROSS}, max "
                    f"over {N_ANGLES} angles; all thresholds "
                    f"{dict(zip(profile.thresholds, crossings, strict=True))}")
    idx = rng.integers(0, n, (N_RESAMPLES, n))  # prompt resamples
    shares = np.array([(rn[:, s].max(1) > CROSS).mean() for s in idx])
    evidence.record("share_random_pairs_crossing_0.1",
                    percentile_estimate(float((pair_max > CROSS).mean()), shares, N_RANDOM_PAIRS,
                                        "prompt-bootstrap"),
                    description=f"share of {N_RANDOM_PAIRS} random unit pairs of layer "
                    f"{n_run.choices['last'].layer} where some prompt's mean vector has ||p_v|| > {CROSS}")
    rms = float(np.sqrt((rn ** 2).mean()))
    evidence.record("rms_in_plane_norm_random_pairs", exact(rms, rn.size), reference=math.sqrt(2 / d),
                    description=f"sqrt(mean ||p_v||^2) over random pairs and prompts; sqrt(2/d) = "
                    f"{math.sqrt(2 / d):.4f} for d = {d} (the expectation over uniformly drawn pairs)")
    rank = float((pair_max < norms.max()).mean())
    a, b = mean_curve_coefficients(X, plane, dtype=torch.float64)
    peak, amp = mean_curve_peak(a, b)
    src_peak = claim.published_value("baseline mean-curve peak angle (degrees)")
    src_amp = claim.published_value("baseline mean-curve peak value")
    mid = n_run.choices["mid"]
    mid_norms = in_plane_norms(n_run.means("mid"), n_run.plane("mid"), dtype=torch.float64).numpy()
    evidence.note(f"the pair's max in-plane norm {norms.max():.4f} is above {100 * rank:.1f} % of the random "
                  f"pairs' (median {null.value:.4f}); by prompt set: general {norms[n_run.kind == 'general'].max():.4f}, "
                  f"neuron {norms[n_run.kind == 'neuron'].max() if (n_run.kind == 'neuron').any() else math.nan:.4f}. "
                  f"Mean curve A cos + B sin: peak {peak:.0f} deg at {amp:+.4f}, trough {(peak + 180) % 360:.0f} deg "
                  f"(source on {src_peak.subject}: peak {src_peak.value:g} deg at {src_amp.value:+g}). "
                  f"Mid role ({mid.hook}, {mid.neuron}/{mid.partner}): max in-plane norm {mid_norms.max():.4f}")
    evidence.data("prompts", {"prompt": list(n_run.prompts), "set": n_run.kind, "in_plane_norm": norms,
                              "mid_in_plane_norm": mid_norms},
                  "per prompt: the baseline mean vector's in-plane norm in the last-role pair's plane (the "
                  "headline is the max of in_plane_norm) and in the mid-role pair's plane")
    evidence.data("random_pairs", {"i": pairs[:, 0], "j": pairs[:, 1], "max_in_plane_norm": pair_max},
                  "random unit pairs of the same layer: max over prompts of ||p_v|| (the null's distribution)")
    _figure_profile(evidence, profile, a, b, n_run.choices["last"])
    _figure_histogram(evidence, pair_max, norms.max(), d, n_run.choices["last"])
    evidence.judge()


def _figure_profile(evidence, profile, a: float, b: float, choice: NeuronChoice) -> None:
    plt = pyplot()
    theta = np.deg2rad(profile.angles_deg.numpy())
    fig, (ax1, ax2) = plt.subplots(1, 2, subplot_kw={"projection": "polar"}, figsize=(9, 4.2))
    curve = profile.mean_cosine.numpy()
    lim = 1.3 * max(np.abs(curve).max(), 1e-6)
    ax1.plot(theta, curve, label="mean cosine (measured)")
    ax1.plot(theta, a * np.cos(theta) + b * np.sin(theta), ls="--", label="A cos + B sin")
    ax1.plot(theta, np.zeros_like(theta), color="grey", lw=0.5)
    ax1.set_rlim(-lim, lim)
    ax1.set_title("mean cosine (radius: value; 0 = grey circle)", fontsize=8, pad=16)
    ax1.legend(fontsize=6, loc="lower left")
    for t, row in zip(profile.thresholds, profile.counts.numpy(), strict=True):
        ax2.plot(theta, row, label=f"count c > {t}")
    ax2.set_rlim(0, max(1, profile.n_vectors))
    ax2.set_title(f"counts of {profile.n_vectors} prompt means", fontsize=8, pad=16)
    ax2.legend(fontsize=6, loc="lower left")
    fig.suptitle(f"N2 baseline SRM, plane (e_{choice.neuron}, e_{choice.partner}) of {choice.hook}",
                 fontsize=9, y=1.06)
    evidence.figure(fig, "baseline_srm_polar")
    plt.close(fig)


def _figure_histogram(evidence, pair_max: np.ndarray, observed: float, d: int,
                      choice: NeuronChoice) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(pair_max, bins=50, color="tab:grey", label=f"{pair_max.size} random pairs")
    ax.axvline(observed, color="tab:red", label=f"chosen pair {choice.neuron}/{choice.partner}")
    ax.axvline(CROSS, color="black", ls="--", label=f"threshold {CROSS}")
    ax.axvline(math.sqrt(2 / d), color="tab:blue", ls=":", label="sqrt(2/d)")
    ax.set(xlabel="max over prompts of in-plane norm ||p_v||", ylabel="pairs",
           title=f"N2: in-plane norms of baseline means, {choice.hook}")
    ax.legend(fontsize=7)
    evidence.figure(fig, "random_pair_in_plane_norms")
    plt.close(fig)


# ---------------------------------------------------------------------------------------- N5


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)


@pytest.mark.claim(id="N5")
def test_mean_is_a_faithful_summary(n_run, evidence, rng):
    choice = n_run.choices["last"]
    tokens = n_run.result.per_token[choice.hook].double()  # (n, N, d), NaN past each row's end
    valid = n_run.result.new_mask  # (n, N)
    M = _unit_rows(n_run.means("last"))  # (n, d)
    T = _unit_rows(torch.nan_to_num(tokens))  # (n, N, d); invalid rows are masked below
    cos = torch.einsum("pjd,qd->pjq", T, M)  # (n, N, n): token j of prompt p vs prompt q's mean
    n = M.shape[0]
    own = np.array([np.median(cos[i, valid[i], i].numpy()) for i in range(n)])
    other = np.array([np.median(torch.cat([cos[k, valid[k], i] for k in range(n) if k != i]).numpy())
                      for i in range(n)])
    null = bootstrap(other, np.median, rng, n_resamples=N_RESAMPLES)
    evidence.record("median_token_mean_cosine", bootstrap(own, np.median, rng, n_resamples=N_RESAMPLES),
                    null=null,
                    description=f"median over {n} prompts of the median cosine of a generated token's "
                    f"hook_post vector ({choice.hook}) to its own prompt's mean; null: tokens of the "
                    "other prompts against the same mean; interval: prompts resampled")
    evidence.record("median_other_prompt_token_cosine", null,
                    description="the null alone: median over prompts of the median cosine of the other "
                    "prompts' tokens to this prompt's mean")
    plane = n_run.plane("last")
    flat = tokens[valid]  # (n_tokens, d)
    tok_norms = in_plane_norms(flat, plane, dtype=torch.float64).numpy()
    mean_norms = in_plane_norms(n_run.means("last"), plane, dtype=torch.float64).numpy()
    evidence.record("share_tokens_crossing_0.1", exact(float((tok_norms > CROSS).mean()), tok_norms.size),
                    description=f"SRM on tokens vs on means: share of per-token vectors with in-plane norm "
                    f"> {CROSS} in the pair plane {plane} (the means' share is "
                    f"{(mean_norms > CROSS).mean():.3f}; max token norm {tok_norms.max():.4f}, max mean "
                    f"norm {mean_norms.max():.4f})")
    evidence.data("prompts", {"prompt": list(n_run.prompts), "set": n_run.kind, "median_cos_own": own,
                              "median_cos_other": other, "new_tokens": n_run.result.new_lengths.numpy()},
                  "per prompt: median cosine of its generated tokens to its mean, and of the other "
                  "prompts' tokens to the same mean (the headline is the median of median_cos_own)")
    evidence.note(f"{choice.describe()}")
    evidence.judge()


# ---------------------------------------------------------------------------------------- N1


@pytest.mark.claim(id="N1")
def test_srm_closed_forms_hold_on_the_baseline(n_run, evidence):
    theta = np.deg2rad(angle_grid(N_ANGLES).numpy())
    curve_err, bound_err, violations, checked = 0.0, 0.0, 0, 0
    for role in n_run.choices:
        X, plane = n_run.means(role), n_run.plane(role)
        profile = srm(X, plane, N_ANGLES, convention="source", dtype=torch.float64)
        a, b = mean_curve_coefficients(X, plane, dtype=torch.float64)
        curve_err = max(curve_err, float(np.abs(profile.mean_cosine.numpy()
                                                - (a * np.cos(theta) + b * np.sin(theta))).max()))
        c = cosines(X, plane, N_ANGLES, dtype=torch.float64)  # (n, n_angles)
        norms = in_plane_norms(X, plane, dtype=torch.float64)  # (n,)
        bound_err = max(bound_err, float((c.max(1).values - norms).clamp(min=0).max()))
        for k, t in enumerate(profile.thresholds):
            passing = int((norms > t).sum())  # the counts' bound at every angle
            violations += int((profile.counts[k] > passing).sum())
            violations += int(((c > t).any(1) & ~(norms > t)).sum())
            checked += N_ANGLES + X.shape[0]
    evidence.record("max_closed_form_error", exact(max(curve_err, bound_err, violations), checked),
                    description="max over both roles' planes of |mean curve - (A cos + B sin)| over "
                    f"{N_ANGLES} angles and of max(0, max_theta c - ||p_v||), float64, on the baseline "
                    "mean vectors, and the number of count-bound violations (an integer: any refutes)")
    evidence.record("mean_curve_error", exact(curve_err, 2 * N_ANGLES),
                    description="max |measured mean cosine - (A cos + B sin)|")
    evidence.record("in_plane_bound_error", exact(bound_err, int(n_run.means().shape[0]) * 2),
                    description="max over vectors of max(0, max over angles of c - in-plane norm)")
    evidence.record("count_bound_violations", exact(violations, checked),
                    description="(angle, threshold) cells whose count exceeds #(||p_v|| > t), plus "
                    "vectors counted at some angle with ||p_v|| <= t (must be 0)")
    evidence.note("The closed forms are proved for arbitrary vectors and planes by the hypothesis "
                  "properties of tests/harness/analyses/test_srm.py; this claim checks they hold on the "
                  "subject's own baseline vectors, in both roles' planes.")
    evidence.judge()
