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

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from harness.activations.clamp import Clamp
from harness.activations.generation import (
    GenerationResult,
    GenerationSpec,
    Sampling,
    first_divergence,
    run_generation,
    run_generations,
)
from harness.activations.rerun import Reread, reread
from harness.analyses.clamp_effects import curve_share_explained, matched_std_units, relative_shift
from harness.analyses.coactivation import (
    halves_spearman,
    halves_topk_overlap,
    predicted_signs,
    repairing_null,
    spearman_vector,
    topk_overlap,
    unit_directions,
)
from harness.analyses.neuron_choice import (
    ChoiceSpec,
    NeuronChoice,
    choose_neurons,
    has_downstream,
    top_contexts,
)
from harness.analyses.srm import (
    angle_grid,
    cosines,
    in_plane_norms,
    mean_curve_coefficients,
    mean_curve_peak,
    predicted_profile,
    srm,
    substitute_coordinate,
)
from harness.evidence.figures import pyplot
from harness.statistics.stats import (
    Estimate,
    bootstrap,
    claim_rng,
    cluster_bootstrap_columnwise_pearson,
    columnwise_pearson,
    exact,
    null_estimate,
    percentile_estimate,
)

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


def _resid(choice: NeuronChoice) -> str:
    """The residual stream after the choice's block (N4 reads it along units' output rows)."""
    return f"blocks.{choice.layer}.hook_resid_post"


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


def build_n_run(subject, corpus, content_cache, root) -> NRun:
    """Choose the neurons, build the prompts, generate once (baseline: no hook), cached."""
    model = subject.model
    choices = choose_neurons(subject, corpus, ChoiceSpec(), content_cache)
    general = [line for line in (root / PROMPTS_FILE).read_text(
        encoding="utf-8").splitlines() if line.strip()]
    specific, contexts = _neuron_prompts(model, corpus, choices["last"])
    prompts = tuple(general + specific)
    hooks = sorted({c.hook for c in choices.values()} | {_resid(c) for c in choices.values()})
    spec = GenerationSpec(prompts=prompts, max_new_tokens=MAX_NEW_TOKENS, hooks=tuple(hooks),
                          per_token=True, batch_size=32)  # one batch: 50 decoding steps, not 200
    result = run_generation(model, spec, cache=content_cache, subject=subject.weight_hash)
    kind = np.array(["general"] * len(general) + ["neuron"] * len(specific))
    return NRun(choices, prompts, kind, contexts, result)


@pytest.fixture(scope="module")
def n_run(subject, corpus, content_cache, pytestconfig) -> NRun:
    """The neuron choice, the prompts and the one baseline generation N1-N5 share."""
    return build_n_run(subject, corpus, content_cache, pytestconfig.rootpath)


def _record_choice(evidence, run: NRun) -> None:
    roles = list(run.choices.values())
    evidence.data("neuron_choice", {
        "role": [c.role for c in roles], "hook": [c.hook for c in roles],
        "layer": [c.layer for c in roles], "neuron": [c.neuron for c in roles],
        "partner": [c.partner for c in roles], "published": [c.published for c in roles],
        "variance": [float(c.variance[c.neuron]) for c in roles],
        "variance_rank": [c.variance_rank for c in roles],
        "partner_r": [float(c.r[c.partner]) for c in roles]},
        "per role: the studied site, neuron and partner (published = the source's ids, on gpt2-small's "
        "last role; else the procedure of harness.analyses.neuron_choice on the unclamped choice sample), "
        "the neuron's variance and rank by variance in its layer, and the partner's Pearson r with it")
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


# ---------------------------------------------------------------------------------------- N3

N3_GENERAL, N3_NEURON = 6, 2  # N3's prompts: the first general and neuron prompts of N2's set
SOURCE_DOSES = (-20.0, -10.0, -6.0, -3.0, -1.0, 0.0, 1.0, 3.0, 6.0, 10.0, 20.0)  # CLAIMS.md
EDGE_DOSES = (-20.0, 20.0)  # the source's extremes: the headline's doses
STD_DOSES = (-4.0, 4.0)  # in the clamped unit's own standard deviations
N_CANDIDATES = 5  # units closest in std from which the random control is drawn
SAMPLINGS = (Sampling(seed=1, top_k=50), Sampling(seed=2, top_k=50))  # control (b)
K_TOP = 10  # N4's top-k


@dataclass(frozen=True)
class Dose:
    """One clamped run of the grid: which unit, which value, in which units."""

    role: str
    unit: int
    control: bool
    """True: control (a), a random unit of matched standard deviation."""
    value: float
    """The clamped value v."""
    sd: float
    """v in the clamped unit's standard deviations (on the unclamped choice sample)."""
    grid: str
    """"source" (the source's grid, or its equivalent in std units for a control) or "std"."""
    generated: bool = True
    """False: only reread (the baseline text clamped in the rerun), never decoded: cost."""

    def clamp(self, choice: NeuronChoice, where: str = "both") -> Clamp:
        return Clamp(choice.hook, self.unit, self.value, where=where)

    @property
    def label(self) -> str:
        who = "control" if self.control else "neuron"
        return f"{self.role}/{who}/{self.grid}/v={self.value:+.4g} ({self.sd:+.3g} sd)"


@dataclass(frozen=True)
class ClampGrid:
    """N3's runs: the baseline, every dose and both controls decoded together, and the
    rereads of fixed texts (rerun-only: the baseline text clamped; generation-only: a clamped
    text unclamped)."""

    choices: dict[str, NeuronChoice]
    sigma: dict[str, float]  # role -> the neuron's std on the choice sample
    controls: dict[str, dict]  # role -> {unit, sigma, candidates}
    doses: tuple[Dose, ...]
    base: GenerationResult
    both: dict[Dose, GenerationResult]
    sampled: tuple[GenerationResult, ...]
    reference: Reread  # the baseline text reread unclamped
    rerun_only: dict[Dose, Reread]
    generation_only: dict[Dose, Reread]
    prompts: tuple[str, ...]

    def pick(self, role: str, *, control: bool = False, grid: str | None = None,
             values: tuple[float, ...] | None = None, generated: bool | None = None) -> list[Dose]:
        return [d for d in self.doses if d.role == role and d.control == control
                and (grid is None or d.grid == grid) and (values is None or d.value in values)
                and (generated is None or d.generated == generated)]


def _n3_doses(choices: dict[str, NeuronChoice], sigma: dict[str, float],
              controls: dict[str, dict]) -> tuple[Dose, ...]:
    out = []
    for role, c in choices.items():
        s = sigma[role]
        grid = [(v, "source") for v in SOURCE_DOSES] if role == "last" else []  # mid: sd only
        grid += [(k * s, "std") for k in STD_DOSES]
        out += [Dose(role, c.neuron, False, v, v / s, g) for v, g in grid]
        sm = controls[role]["sigma"]  # control (a) at the same doses in std units: decoded at
        # the headline's doses, reread (rerun-only) at +-4 sd
        sds = [(v / s, "source", True) for v in EDGE_DOSES] if role == "last" else []
        out += [Dose(role, controls[role]["unit"], True, u * sm, u, g, gen)
                for u, g, gen in sds + [(k, "std", False) for k in STD_DOSES]]
    return tuple(out)


@pytest.fixture(scope="module")
def n3_grid(n_run, subject, content_cache, run_state) -> ClampGrid:
    """N3's dose grid with its controls and rereads (N4 reads its clamped runs too)."""
    return build_grid(n_run, subject, content_cache, run_state.seed)


def build_grid(n_run: NRun, subject, content_cache, seed: int) -> ClampGrid:
    """Draw the controls, decode every run of the dose grid as rows of shared batches, reread
    the fixed texts; all cached."""
    model, choices = subject.model, n_run.choices
    general = [p for p, k in zip(n_run.prompts, n_run.kind, strict=True) if k == "general"]
    neuron = [p for p, k in zip(n_run.prompts, n_run.kind, strict=True) if k == "neuron"]
    prompts = tuple(general[:N3_GENERAL] + neuron[:N3_NEURON])
    draw = claim_rng(seed, "N3")  # the control unit: seeded by the session seed
    sigma, controls = {}, {}
    for role, c in choices.items():
        std = np.sqrt(c.variance)
        sigma[role] = float(std[c.neuron])
        candidates = matched_std_units(std, c.neuron, N_CANDIDATES, exclude=[c.partner])
        unit = int(draw.choice(candidates))
        controls[role] = {"unit": unit, "sigma": float(std[unit]), "candidates": candidates.tolist(),
                          "candidate_std": std[candidates].tolist()}
    doses = _n3_doses(choices, sigma, controls)
    hooks = tuple(sorted({c.hook for c in choices.values()} | {_resid(c) for c in choices.values()}))
    decoded = [d for d in doses if d.generated]
    # every run's rows in ONE batch (20 runs x 8 prompts on the default subject): one decode
    # of MAX_NEW_TOKENS steps, at the batch where a step's matmuls are efficient
    n_runs = 1 + len(decoded) + len(SAMPLINGS)
    base = GenerationSpec(prompts, MAX_NEW_TOKENS, hooks=hooks, batch_size=n_runs * len(prompts))
    specs = ([base] + [dataclasses.replace(base, clamp=d.clamp(choices[d.role])) for d in decoded]
             + [dataclasses.replace(base, sampling=s) for s in SAMPLINGS])
    runs = run_generations(model, specs, read="generation", cache=content_cache,
                           subject=subject.weight_hash)
    both = dict(zip(decoded, runs[1: 1 + len(decoded)], strict=True))
    # Rerun-only: the baseline text reread under the clamp (the KL, downstream readings), at
    # +-4 sd for the neurons and the controls and at the source's extremes for the last role.
    kl_doses = [d for d in doses if d.grid == "std"
                or (d.role == "last" and not d.control and d.value in EDGE_DOSES)]
    rereads = reread(model, runs[0], [None] + [d.clamp(choices[d.role], "rerun-only") for d in kl_doses],
                     hooks=hooks, kl=True, batch_size=len(prompts), cache=content_cache,
                     subject=subject.weight_hash)
    # Generation-only: the mid role's clamped texts reread unclamped (what the text alone does
    # downstream; for the last role the layer's other units are the clamped run's own).
    last = choices["last"]
    gen_only = {d: reread(model, both[d], [None], hooks=(last.hook, _resid(last)),
                          batch_size=len(prompts), cache=content_cache, subject=subject.weight_hash)[0]
                for d in doses if d.role == "mid" and not d.control and d.grid == "std"}
    return ClampGrid(choices, sigma, controls, doses, runs[0], both,
                     tuple(runs[1 + len(decoded):]), rereads[0],
                     dict(zip(kl_doses, rereads[1:], strict=True)), gen_only, prompts)


def _shift(grid: ClampGrid, role: str, run: GenerationResult, hook: str | None = None) -> np.ndarray:
    """Per prompt, the relative shift of ``run``'s mean ``hook`` vector (default: the role's
    clamped layer) from the baseline's, leaving out the coordinates of both units clamped in
    the role's runs (the neuron and its control), so that the neuron, control (a) and control
    (b) are measured on the same d - 2 coordinates."""
    c = grid.choices[role]
    hook = hook or c.hook
    keep = np.ones(grid.base.means[hook].shape[1], dtype=bool)
    if hook == c.hook:
        keep[[c.neuron, grid.controls[role]["unit"]]] = False
    return relative_shift(run.means[hook][:, keep], grid.base.means[hook][:, keep])


def _per_prompt(grid: ClampGrid) -> dict[Dose, dict[str, np.ndarray]]:
    """Per dose, per prompt: the non-arithmetic measures of N3 (NaN where not measured)."""
    last, base = grid.choices["last"], grid.base
    out = {}
    for d in grid.doses:
        c, run, p = grid.choices[d.role], grid.both.get(d), len(grid.prompts)
        m = {k: np.full(p, math.nan) for k in ("shift", "partner_shift", "kl", "down_both",
                                               "down_generation", "down_rerun", "first_divergence",
                                               "diverged")}
        if run is not None:
            m["shift"] = _shift(grid, d.role, run)
            m["first_divergence"] = first_divergence(run, base).numpy().astype(float)
            m["diverged"] = (m["first_divergence"] >= 0).astype(float)
        if run is not None and not d.control:
            m["partner_shift"] = np.abs((run.means[c.hook][:, c.partner]
                                         - base.means[c.hook][:, c.partner]).double().numpy()
                                        ) / math.sqrt(c.variance[c.partner])
        if d in grid.rerun_only:
            m["kl"] = torch.nanmean(grid.rerun_only[d].kl.double(), dim=1).numpy()
        if d.role == "mid" and run is not None:  # downstream: the last layer's hook_post
            m["down_both"] = relative_shift(run.means[last.hook], base.means[last.hook])
        if d.role == "mid":
            if d in grid.generation_only:
                m["down_generation"] = relative_shift(grid.generation_only[d].means[last.hook],
                                                      grid.reference.means[last.hook])
            if d in grid.rerun_only:
                m["down_rerun"] = relative_shift(grid.rerun_only[d].means[last.hook],
                                                 grid.reference.means[last.hook])
        out[d] = m
    return out


def _noise(grid: ClampGrid) -> dict[str, np.ndarray]:
    """Control (b) per prompt, averaged over the sampling seeds: the same measures for a
    seeded-sampling run against the greedy baseline (no hook in either)."""
    base, last = grid.base, grid.choices["last"]
    out = {f"shift_{r}": np.mean([_shift(grid, r, s) for s in grid.sampled], axis=0)
           for r in ("last", "mid")}
    out["down"] = np.mean([relative_shift(s.means[last.hook], base.means[last.hook])
                           for s in grid.sampled], axis=0)
    out["diverged"] = np.mean([first_divergence(s, base).numpy() >= 0 for s in grid.sampled], axis=0)
    return out


def _average(table: dict[Dose, dict[str, np.ndarray]], doses: list[Dose], key: str) -> np.ndarray:
    """Per prompt, the mean of ``key`` over ``doses``."""
    if not doses:
        raise ValueError(f"no doses to average {key} over")
    return np.mean([table[d][key] for d in doses], axis=0)


@pytest.mark.claim(id="N3")
def test_clamp_changes_the_model_beyond_the_coordinate(n3_grid, evidence, rng, claim):
    g = n3_grid
    table, noise = _per_prompt(g), _noise(g)
    last, n = g.choices["last"], len(g.prompts)

    def boot(x: np.ndarray) -> Estimate:
        return bootstrap(x, np.mean, rng, n_resamples=N_RESAMPLES)

    edge = g.pick("last", values=EDGE_DOSES)
    edge_ctrl = g.pick("last", control=True, grid="source")
    effect = boot(_average(table, edge, "shift"))
    ctrl_a = boot(_average(table, edge_ctrl, "shift"))
    ctrl_b = boot(noise["shift_last"])
    stronger, which = max((ctrl_a, "(a) random unit"), (ctrl_b, "(b) sampling"),
                          key=lambda e: e[0].ci_high)
    unit = g.controls["last"]
    evidence.record("clamp_shift_at_source_doses", effect, null=stronger,
                    description=f"mean over {n} prompts of the relative shift of {last.hook}'s mean vector "
                    f"without coordinates {last.neuron} (the neuron) and {unit['unit']} (control (a)), "
                    "averaged over v = -20 and +20 (clamp in both phases, greedy 50 tokens); interval: "
                    "prompts resampled")
    evidence.record("random_unit_control", ctrl_a,
                    description=f"control (a): unit {unit['unit']} (std {unit['sigma']:.4g} vs "
                    f"{g.sigma['last']:.4g}; drawn from {unit['candidates']}) clamped at "
                    f"{', '.join(f'{d.sd:+.3g}' for d in edge_ctrl)} sd; the same coordinates left out")
    evidence.record("sampling_noise_control", ctrl_b,
                    description=f"control (b): seeded top-50 sampling (seeds {[s.seed for s in SAMPLINGS]}, "
                    "no hook) against the greedy baseline, the same coordinates left out, mean over seeds")
    evidence.record("stronger_control", stronger,
                    description=f"the control whose interval reaches higher: {which}")
    _record_dose_response(evidence, g, table, noise, boot)
    _record_closed_form(evidence, g, claim)
    _n3_data(evidence, g, table)
    _figure_srm_per_dose(evidence, g)
    _figure_dose_response(evidence, g, table, noise)
    evidence.note(f"doses: {len(g.both)} clamped runs + baseline + {len(SAMPLINGS)} sampled, decoded "
                  f"as the rows of one {g.base.spec.batch_size}-row batch; read while decoding (no rerun); "
                  f"{len(g.rerun_only)} rerun-only and {len(g.generation_only)} generation-only rereads")
    for role, c in g.choices.items():
        ctrl = g.controls[role]
        mean = g.base.means[c.hook].double().mean(0)  # (d,) over prompts of the baseline means
        evidence.note(f"{role} role: neuron {c.neuron} sd {g.sigma[role]:.4g} (baseline-generation mean "
                      f"{float(mean[c.neuron]):+.4g}); control (a) unit {ctrl['unit']} sd {ctrl['sigma']:.4g} "
                      f"(mean {float(mean[ctrl['unit']]):+.4g}), drawn from {ctrl['candidates']} (sd "
                      f"{', '.join(f'{x:.3g}' for x in ctrl['candidate_std'])}); doses are values v, so a "
                      "unit far from 0 on average is moved further by the same dose in sd")
    evidence.note("same-layer units other than the clamped one move only through the text: in a "
                  "rerun-only clamp they are the baseline's bit for bit, so for the last role the "
                  "generation-only reading equals the clamped run's outside coordinate n")
    evidence.judge()


def _record_dose_response(evidence, g: ClampGrid, table, noise, boot) -> None:
    """The rest of the non-arithmetic picture, each with its control (reported, not judged)."""
    last_std = g.pick("last", grid="std")
    evidence.record("clamp_shift_at_4sd", boot(_average(table, last_std, "shift")),
                    null=boot(noise["shift_last"]),
                    description="as the headline at v = +-4 sd of the last-role neuron; null: control "
                    "(b), sampling (control (a) is decoded at the headline's doses only)")
    edge = g.pick("last", values=EDGE_DOSES)
    evidence.record("partner_shift_sd_at_source_doses", boot(_average(table, edge, "partner_shift")),
                    description=f"|change of partner {g.choices['last'].partner}'s mean| in its own sd, v = +-20")
    evidence.record("share_diverged_at_source_doses", boot(_average(table, edge, "diverged")),
                    null=boot(noise["diverged"]),
                    description="share of (prompt, v = +-20) runs whose greedy text differs from the "
                    f"baseline's within {MAX_NEW_TOKENS} tokens; null: the sampled runs against the "
                    "greedy baseline (mean over seeds)")
    evidence.record("kl_at_source_doses", boot(_average(table, edge, "kl")),
                    description="mean over generated positions of KL(unclamped || clamped) next-token "
                    "distribution, nats, on the baseline text with the clamp in the rerun only, v = +-20")
    evidence.record("kl_at_4sd", boot(_average(table, last_std, "kl")),
                    null=boot(_average(table, g.pick("last", control=True, grid="std"), "kl")),
                    description="as kl_at_source_doses at +-4 sd; null: control (a) at +-4 sd")
    mid_std, mid_ctrl = g.pick("mid", grid="std"), g.pick("mid", control=True, grid="std")
    if not has_downstream(g.choices):
        evidence.note(f"mid role's downstream shift: not applicable, the mid role's layer "
                      f"{g.choices['mid'].layer} is the last layer ({g.choices['last'].layer}): no block "
                      "lies after it (a 1-layer model), so 'downstream' would be the clamped layer itself")
    else:
        _record_downstream(evidence, g, table, noise, boot, mid_std, mid_ctrl)
    evidence.record("mid_shift_at_4sd", boot(_average(table, mid_std, "shift")),
                    null=boot(noise["shift_mid"]),
                    description="the mid layer's own other units at +-4 sd (clamp in both); null: sampling")


def _record_downstream(evidence, g: ClampGrid, table, noise, boot, mid_std, mid_ctrl) -> None:
    """The mid role's shift of the last layer (needs a block after the mid role's: has_downstream)."""
    for phase, key in (("both", "down_both"), ("generation_only", "down_generation"),
                       ("rerun_only", "down_rerun")):
        ctrl = boot(_average(table, mid_ctrl, key)) if phase == "rerun_only" else boot(noise["down"])
        evidence.record(f"mid_downstream_{phase}_at_4sd", boot(_average(table, mid_std, key)), null=ctrl,
                        description=f"mid role ({g.choices['mid'].hook}, neuron {g.choices['mid'].neuron}) "
                        f"at +-4 sd, clamp in {phase.replace('_', ' ')}: relative shift of "
                        f"{g.choices['last'].hook}'s mean vector (all coordinates); null: "
                        + ("control (a) at +-4 sd, rerun-only" if phase == "rerun_only"
                           else "sampling noise at that layer"))


def _closed_form(g: ClampGrid, d: Dose) -> tuple[float, float, float, float]:
    """(share explained, measured peak angle, predicted peak angle, rerun-only error) of one
    dose's SRM mean curve in the role's pair plane."""
    c = g.choices[d.role]
    plane = (c.neuron, c.partner)
    base = g.base.means[c.hook].double()
    measured = mean_curve_coefficients(g.both[d].means[c.hook].double(), plane)
    predicted = mean_curve_coefficients(substitute_coordinate(base, c.neuron, d.value), plane)
    share = curve_share_explained(measured, predicted, mean_curve_coefficients(base, plane))
    err = math.nan
    if d in g.rerun_only:  # the baseline text clamped in the rerun: substitution exactly
        ref = substitute_coordinate(g.reference.means[c.hook].double(), c.neuron, d.value)
        err = float(np.abs(np.subtract(mean_curve_coefficients(g.rerun_only[d].means[c.hook].double(), plane),
                                       mean_curve_coefficients(ref, plane))).max())
    return share, mean_curve_peak(*measured)[0], mean_curve_peak(*predicted)[0], err


def _record_closed_form(evidence, g: ClampGrid, claim) -> None:
    rows = {d: _closed_form(g, d) for d in g.doses if not d.control and d.generated}
    last = [d for d in rows if d.role == "last" and d.grid == "source" and d.value != 0]
    shares = np.array([rows[d][0] for d in last])
    evidence.record("closed_form_share_explained", exact(float(np.nanmedian(shares)), len(last)),
                    description="median over the last role's nonzero source doses of 1 - |m - p|^2 / "
                    "|m - b|^2 for the SRM mean curve's (A, B): m clamped, p the closed form (v "
                    "substituted into the baseline vectors), b the baseline; per dose in the data")
    errs = [rows[d][3] for d in rows if not math.isnan(rows[d][3])]
    evidence.record("rerun_only_closed_form_error", exact(max(errs), len(errs)),
                    description="max |(A, B) of the rerun-only clamped vectors - (A, B) of the closed "
                    "form on the same text|: a clamp that leaves the text alone is pure arithmetic")
    src = claim.published_value("clamped mean-curve peak angle (degrees)")
    edge = [d for d in last if d.value in EDGE_DOSES]
    evidence.note(f"clamped mean-curve peak at v = -20 / +20: measured {rows[edge[0]][1]:.0f} / "
                  f"{rows[edge[1]][1]:.0f} deg, closed form {rows[edge[0]][2]:.0f} / {rows[edge[1]][2]:.0f} "
                  f"(source on {src.subject}: about {src.value:g}); shares explained per dose "
                  + ", ".join(f"{d.value:+g}: {rows[d][0]:.3f}" for d in sorted(rows, key=lambda d: (d.role, d.value))))


def _n3_data(evidence, g: ClampGrid, table) -> None:
    cols: dict[str, list] = {k: [] for k in ("dose", "role", "unit", "control", "v", "sd", "grid",
                                             "prompt")}
    for d, m in table.items():
        for i in range(len(g.prompts)):
            for k, v in (("dose", d.label), ("role", d.role), ("unit", d.unit), ("control", d.control),
                         ("v", d.value), ("sd", d.sd), ("grid", d.grid), ("prompt", i)):
                cols[k].append(v)
            for k, arr in m.items():
                cols.setdefault(k, []).append(float(arr[i]))
    evidence.data("per_dose_prompt", cols, "per (dose, prompt): shift = relative shift of the clamped "
                  "layer's mean without the clamped coordinate (the headline averages it over v = +-20, "
                  "last role, control False); partner_shift in sd; kl (rerun-only, nats, mean over "
                  "positions); down_* = the mid role's last-layer shift (both / generation-only / "
                  "rerun-only); first_divergence (-1: none within 50 tokens)")


def _figure_srm_per_dose(evidence, g: ClampGrid) -> None:
    plt = pyplot()
    c = g.choices["last"]
    plane = (c.neuron, c.partner)
    doses = [d for d in g.pick("last") if d.value in (-20, -6, 0, 6, 20) or d.grid == "std"]
    theta = np.deg2rad(angle_grid(N_ANGLES).numpy())
    base = g.base.means[c.hook].double()
    fig, axes = plt.subplots(2, len(doses), subplot_kw={"projection": "polar"},
                             figsize=(2.6 * len(doses), 5.6))
    b_curve = srm(base, plane, N_ANGLES, dtype=torch.float64)
    for d, (ax1, ax2) in zip(doses, axes.T, strict=True):
        meas = srm(g.both[d].means[c.hook].double(), plane, N_ANGLES, dtype=torch.float64)
        pred = predicted_profile(base, c.neuron, d.value, plane, N_ANGLES, dtype=torch.float64)
        curves = [b_curve.mean_cosine.numpy(), meas.mean_cosine.numpy(), pred.mean_cosine.numpy()]
        lim = 1.2 * max(max(np.abs(x).max() for x in curves), 1e-6)
        for x, style, name in zip(curves, ("-", "-", "--"), ("baseline", "clamped", "closed form"),
                                  strict=True):
            ax1.plot(theta, x, ls=style, lw=1, label=name, color={"baseline": "grey"}.get(name))
        ax1.set_rlim(-lim, lim)
        ax1.set_title(f"v = {d.value:+.3g} ({d.sd:+.2g} sd)", fontsize=8, pad=12)
        ax1.tick_params(labelsize=5)
        for prof, style, name in ((b_curve, "-", "baseline"), (meas, "-", "clamped"),
                                  (pred, "--", "closed form")):
            ax2.plot(theta, prof.counts[-1].numpy(), ls=style, lw=1, label=name,
                     color={"baseline": "grey"}.get(name))
        ax2.set_rlim(0, len(g.prompts))
        ax2.tick_params(labelsize=5)
    axes[0, 0].legend(fontsize=5, loc="lower left")
    axes[0, 0].set_ylabel("mean cosine", fontsize=7, labelpad=18)
    axes[1, 0].set_ylabel(f"count c > {CROSS}", fontsize=7, labelpad=18)
    fig.suptitle(f"N3: SRM in the plane (e_{c.neuron}, e_{c.partner}) of {c.hook}, baseline vs "
                 "clamped (measured) and the closed form (v substituted into the baseline)", fontsize=9)
    evidence.figure(fig, "srm_polar_per_dose")
    plt.close(fig)


def _figure_dose_response(evidence, g: ClampGrid, table, noise) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))

    def series(ax, doses, key, **kw):
        doses = sorted((d for d in doses if np.isfinite(table[d][key]).all()), key=lambda d: d.sd)
        y = np.array([np.nanmean(table[d][key]) for d in doses])
        err = np.array([np.nanstd(table[d][key]) / math.sqrt(len(g.prompts)) for d in doses])
        ax.errorbar([d.sd for d in doses], y, yerr=1.96 * err, capsize=2, **kw)

    ax = axes[0]
    series(ax, g.pick("last"), "shift", marker="o", label=f"neuron {g.choices['last'].neuron}")
    series(ax, g.pick("last", control=True, generated=True), "shift", marker="s", ls="none",
           label=f"control (a): unit {g.controls['last']['unit']}")
    lo, hi = np.percentile(noise["shift_last"], [2.5, 97.5])
    ax.axhspan(lo, hi, color="tab:grey", alpha=0.2, label="control (b): sampling, 95% of prompts")
    ax.axhline(np.mean(noise["shift_last"]), color="tab:grey", lw=1)
    ax.set(xscale="symlog", xlabel="dose (sd of the clamped unit)", ylabel="relative shift, other units",
           title=f"last role {g.choices['last'].hook}: clamp in both phases")
    ax.legend(fontsize=6)
    ax = axes[1]
    series(ax, [d for d in g.pick("last") if d in g.rerun_only], "kl", marker="o", label="last role")
    series(ax, [d for d in g.pick("last", control=True) if d in g.rerun_only], "kl", marker="s", ls="none",
           label="last-role control (a)")
    series(ax, [d for d in g.pick("mid") if d in g.rerun_only], "kl", marker="^", label="mid role")
    series(ax, [d for d in g.pick("mid", control=True) if d in g.rerun_only], "kl", marker="v", ls="none",
           label="mid-role control (a)")
    ax.set(xscale="symlog", yscale="log", xlabel="dose (sd)", ylabel="KL (nats), mean over positions",
           title="next-token KL on the baseline text (rerun-only clamp)")
    ax.legend(fontsize=6)
    ax = axes[2]
    for key, name in (("down_both", "both"), ("down_generation", "generation only"),
                      ("down_rerun", "rerun only")):
        series(ax, g.pick("mid"), key, marker="o", label=name)
    series(ax, g.pick("mid", control=True), "down_rerun", marker="s", ls="none",
           label="control (a), rerun only")
    ax.axhline(np.mean(noise["down"]), color="tab:grey", lw=1, label="control (b): sampling")
    ax.set(xscale="symlog", xlabel="dose (sd)", ylabel=f"relative shift of {g.choices['last'].hook}",
           title=f"mid role {g.choices['mid'].hook} n{g.choices['mid'].neuron}: downstream")
    ax.legend(fontsize=6)
    fig.suptitle("N3 dose-response (mean over prompts, 95% normal interval; the headline's intervals "
                 "are bootstrap, in the table)", fontsize=9)
    fig.tight_layout()
    evidence.figure(fig, "dose_response")
    plt.close(fig)


# ---------------------------------------------------------------------------------------- N4

N_PERMUTATIONS = 1000  # random re-pairings for N4's null


def _w_out(model, choice: NeuronChoice) -> np.ndarray:
    """(d_mlp, d_model) float64 W_out of the choice's layer (the subject's processed weights)."""
    return model.blocks[choice.layer].mlp.W_out.detach().double().cpu().numpy()


def _source_reading(model, g: ClampGrid, role: str) -> dict | None:
    """The source's 768-d reading on N3's clamped runs of ``role``: r(resid_n, resid_j) across
    prompts x v, with the clamp term's predicted signs; None when n is no residual coordinate."""
    c, d_model = g.choices[role], model.cfg.d_model
    doses = g.pick(role, generated=True)
    post = torch.cat([g.both[d].means[c.hook] for d in doses]).double().numpy()  # (S, d_mlp)
    # the source's 3072-d reading on the same runs: the clamped coordinate is v itself
    r_post = columnwise_pearson(np.repeat(post[:, [c.neuron]], post.shape[1], axis=1), post)
    r_post[c.neuron] = math.nan
    out = {"samples": post.shape[0], "doses": len(doses),
           "post_top": np.argsort(-np.nan_to_num(r_post, nan=-2))[:5].tolist()}
    if c.neuron >= d_model:
        return out | {"applicable": False}
    R = torch.cat([g.both[d].means[_resid(c)] for d in doses]).double().numpy()  # (S, d_model)
    r = columnwise_pearson(np.repeat(R[:, [c.neuron]], d_model, axis=1), R)
    r[c.neuron] = math.nan
    w = _w_out(model, c)[c.neuron]  # (d_model,) W_out[n]
    pred = predicted_signs(w, c.neuron)
    ok = np.isfinite(r)
    top = np.argsort(-np.abs(np.nan_to_num(r)))[:K_TOP]
    order = np.argsort(np.nan_to_num(r, nan=0.0))
    return out | {"applicable": True, "r": r, "pred": pred, "w": w * np.sign(w[c.neuron]),
                  "agree": float((np.sign(r[ok]) == pred[ok]).mean()), "n_coords": int(ok.sum()),
                  "agree_top": float((np.sign(r[top]) == pred[top]).mean()),
                  "co": [(int(j), float(r[j])) for j in order[::-1][:5]],
                  "anti": [(int(j), float(r[j])) for j in order[:5]]}


def _rankings(model, run: NRun, role: str, rng, n_resamples: int) -> dict:
    """r(post_n, post_m) and r(post_n, resid . W_out[m]/|W_out[m]|) over the baseline's
    generated tokens for every other unit m, their Spearman rho and top-k overlap (cluster
    bootstrap over prompts) and the random re-pairing nulls."""
    c = run.choices[role]
    valid = run.result.new_mask  # (n_prompts, N)
    post = run.result.per_token[c.hook][valid].double().numpy()  # (T, d_mlp), prompt-major
    resid = run.result.per_token[_resid(c)][valid].double().numpy()  # (T, d_model)
    clusters = np.repeat(np.arange(valid.shape[0]), valid.sum(1).numpy())  # (T,)
    proj = resid @ unit_directions(_w_out(model, c))  # (T, d_mlp)
    keep = np.flatnonzero(np.arange(post.shape[1]) != c.neuron)
    X = np.repeat(post[:, [c.neuron]], 2 * keep.size, axis=1)  # (T, 2k): [x | x]
    Y = np.hstack([post[:, keep], proj[:, keep]])  # (T, 2k): [MLP basis | residual basis]
    r, rho = cluster_bootstrap_columnwise_pearson(X, Y, clusters, halves_spearman, rng,
                                                  n_resamples=n_resamples)
    _, overlap = cluster_bootstrap_columnwise_pearson(X, Y, clusters, halves_topk_overlap(K_TOP), rng,
                                                      n_resamples=300)
    r_mlp, r_res = r[: keep.size], r[keep.size:]
    nulls = {name: null_estimate(repairing_null(r_mlp, r_res, fn, rng, N_PERMUTATIONS),
                                 "random re-pairing null (mean, 95% range)")
             for name, fn in (("rho", spearman_vector),
                              ("overlap", lambda a, b: topk_overlap(a, b, K_TOP)))}
    return {"units": keep, "r_mlp": r_mlp, "r_res": r_res, "rho": rho, "overlap": overlap,
            "nulls": nulls, "tokens": int(valid.sum()), "prompts": int(valid.shape[0])}


@pytest.mark.claim(id="N4")
def test_coactivation_rankings_differ_between_bases(n_run, n3_grid, subject, evidence, rng, claim):
    model = subject.model
    ranks = {role: _rankings(model, n_run, role, rng, N_RESAMPLES if role == "last" else 300)
             for role in n_run.choices}
    last = ranks["last"]
    c = n_run.choices["last"]
    evidence.record("rank_spearman", last["rho"], null=last["nulls"]["rho"],
                    description=f"Spearman rho between the rankings of the {last['units'].size} other units "
                    f"m of {c.hook} by r(post_{c.neuron}, post_m) and by r(post_{c.neuron}, "
                    f"{_resid(c)} . W_out[m]/|W_out[m]|), over {last['tokens']} generated tokens of the "
                    f"{last['prompts']} baseline prompts; interval: cluster bootstrap over prompts; null: "
                    f"{N_PERMUTATIONS} random re-pairings of the units between the bases")
    evidence.record(f"top{K_TOP}_overlap", last["overlap"], null=last["nulls"]["overlap"],
                    description=f"|top-{K_TOP} co-activators in one basis & in the other| / {K_TOP}")
    mid = ranks["mid"]
    evidence.record("rank_spearman_mid", mid["rho"], null=mid["nulls"]["rho"],
                    description=f"as rank_spearman for the mid role ({n_run.choices['mid'].hook}, neuron "
                    f"{n_run.choices['mid'].neuron})")
    readings = {role: _source_reading(model, n3_grid, role) for role in n_run.choices}
    shown = next((role for role in ("last", "mid") if readings[role]["applicable"]), None)
    for role, rd in readings.items():
        ch = n3_grid.choices[role]
        text = (f"source's 768-d reading, {role} role (neuron {ch.neuron}, {rd['doses']} doses x "
                f"{len(n3_grid.prompts)} prompts = {rd['samples']} clamped runs): ")
        if rd["applicable"]:
            text += (f"r(resid_{ch.neuron}, resid_j) has the sign of W_out[n, j] W_out[n, n] for "
                     f"{100 * rd['agree']:.1f} % of {rd['n_coords']} coordinates and {100 * rd['agree_top']:.0f} % "
                     f"of the {K_TOP} largest |r|; co-activators {rd['co']}, antagonists {rd['anti']}")
        else:
            text += (f"not applicable: {ch.neuron} >= d_model {model.cfg.d_model}, so the neuron's index is "
                     "no residual coordinate")
        evidence.note(text + f"; on the same clamped runs the units most correlated with the clamped "
                      f"coordinate (= v) are {rd['post_top']} (unclamped partner {ch.partner})")
    if shown is not None:
        rd = readings[shown]
        evidence.record("source_reading_sign_agreement", exact(rd["agree"], rd["n_coords"]),
                        description=f"{shown} role: share of residual coordinates j whose r(resid_n, resid_j) "
                        "across N3's clamped runs has the sign the clamp term predicts, sign(W_out[n, j] "
                        "W_out[n, n]) (the source's reading, reproduced and predicted)")
    src = claim.published_value("top 768-d co-activator r (coordinate 266)")
    evidence.note(f"source on {src.subject}: top co-activator r {src.value} (and antagonist "
                  f"{claim.published_value('top 768-d antagonist r (coordinate 481)').value}): values near +-1 "
                  "are what the clamp term gives when v dominates the runs' variation")
    cols: dict[str, list] = {k: [] for k in ("role", "unit", "r_mlp", "r_resid", "rank_mlp", "rank_resid")}
    for role, rk in ranks.items():
        for k, v in (("unit", rk["units"]), ("r_mlp", rk["r_mlp"]), ("r_resid", rk["r_res"]),
                     ("rank_mlp", _rank(rk["r_mlp"])), ("rank_resid", _rank(rk["r_res"]))):
            cols[k] += list(v)
        cols["role"] += [role] * rk["units"].size
    evidence.data("rankings", cols, "per unit m: r with the role's neuron in the MLP basis and along "
                  "W_out[m] in the residual, and the ranks (1 = strongest co-activator); the headline is "
                  "Spearman(r_mlp, r_resid) of the last role")
    _figure_rank_scatter(evidence, n_run, ranks, readings)
    evidence.judge()


def _rank(r: np.ndarray) -> np.ndarray:
    """1 = the largest r (NaN last)."""
    order = np.argsort(-np.nan_to_num(r, nan=-np.inf), kind="stable")
    out = np.empty(r.size, dtype=int)
    out[order] = np.arange(1, r.size + 1)
    return out


def _figure_rank_scatter(evidence, run: NRun, ranks: dict, readings: dict) -> None:
    plt = pyplot()
    shown = [role for role, rd in readings.items() if rd["applicable"]]
    fig, axes = plt.subplots(1, len(ranks) + len(shown), figsize=(4.4 * (len(ranks) + len(shown)), 4.2))
    for ax, (role, rk) in zip(axes[: len(ranks)], ranks.items(), strict=True):
        c = run.choices[role]
        a, b = _rank(rk["r_mlp"]), _rank(rk["r_res"])
        top = (a <= K_TOP) | (b <= K_TOP)
        ax.scatter(a, b, s=2, color="tab:grey", alpha=0.5)
        ax.scatter(a[top], b[top], s=10, color="tab:red", label=f"top {K_TOP} in either basis")
        ax.set(xlabel=f"rank by r(post_{c.neuron}, post_m)", ylabel=f"rank by r(post_{c.neuron}, resid . W_out[m])",
               title=f"{role}: {c.hook}\nSpearman {rk['rho'].value:.3f} [{rk['rho'].ci_low:.3f}, "
               f"{rk['rho'].ci_high:.3f}]; null {rk['nulls']['rho'].ci_low:.3f}..{rk['nulls']['rho'].ci_high:.3f}")
        ax.title.set_fontsize(8)
        ax.legend(fontsize=6)
    for ax, role in zip(axes[len(ranks):], shown, strict=True):
        rd, c = readings[role], run.choices[role]
        ok = np.isfinite(rd["r"])
        agree = ok & (np.sign(rd["r"]) == rd["pred"])
        ax.scatter(rd["w"][ok], rd["r"][ok], s=3, c=np.where(agree[ok], "tab:blue", "tab:orange"))
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(0, color="grey", lw=0.5)
        # a few coordinates of a trained W_out row are 10-50x the rest: linear within 5x the median
        ax.set_xscale("symlog", linthresh=5 * float(np.median(np.abs(rd["w"][ok]))))
        ax.set(xlabel=f"W_out[{c.neuron}, j] sign(W_out[{c.neuron}, {c.neuron}])",
               ylabel=f"r(resid_{c.neuron}, resid_j), clamped runs",
               title=f"source's reading, {role} (n = {c.neuron}):\nsign as the clamp term's for "
               f"{100 * rd['agree']:.0f} % (blue)")
        ax.title.set_fontsize(8)
    fig.suptitle("N4: co-activation rankings in the MLP basis vs the residual basis (baseline tokens)",
                 fontsize=9)
    fig.tight_layout()
    evidence.figure(fig, "rank_scatter")
    plt.close(fig)
