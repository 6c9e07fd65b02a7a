"""Synthetic superposition data, an SAE trained on it, and feature-recovery metrics (claim R1).

Data come from sae-lens' synthetic module: a :class:`FeatureDictionary` of ``num_features``
unit-norm ground-truth directions in ``hidden_dim`` dimensions (more features than dimensions,
so they sit in superposition), and an :class:`ActivationGenerator` firing each feature
independently with its own probability. A sample is x = sum_i a_i f_i with a_i >= 0 and most
a_i = 0. The SAE is sae-lens' :class:`TopKTrainingSAE`, trained by sae-lens' synthetic entry
point :func:`sae_lens.synthetic.train_toy_sae` (which drives the ordinary ``SAETrainer``).

sae-lens draws training batches and SAE initial weights from torch's global generator; every
such call here runs inside :func:`seeded_torch`, which forks that generator and restores it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.synthetic import (
    ActivationGenerator,
    FeatureDictionary,
    SyntheticDataEvalResult,
    eval_sae_on_synthetic_data,
    linear_firing_probabilities,
    train_toy_sae,
)
from scipy import stats
from torch import Tensor

from harness.statistics.stats import Estimate, fraction_variance_explained

RECOVERED_COSINE = 0.9
"""A true feature counts as recovered when some decoder row has cosine > this with it."""


@dataclass(frozen=True)
class SyntheticConfig:
    """Data, SAE and training sizes. Defaults: 256 features in 64 dims, ~20 s on a busy CPU."""

    num_features: int = 256
    """Number of ground-truth features (dictionary rows)."""
    hidden_dim: int = 64
    """Dimension of the activations; < num_features puts the features in superposition."""
    max_firing_prob: float = 0.04
    """Firing probability of the most frequent feature (probabilities fall linearly)."""
    min_firing_prob: float = 0.01
    """Firing probability of the rarest feature. Expected true L0 = num_features * mean prob."""
    magnitude_std: float = 0.1
    """Std of a firing feature's magnitude around 1 (relu'd by sae-lens)."""
    d_sae: int = 256
    """SAE latents (one per true feature: no spare capacity)."""
    k: int = 8
    """TopK latents kept per sample; at least the expected true L0 (6.4 by default)."""
    training_steps: int = 1000
    """Optimiser steps; training samples = training_steps * batch_size, all freshly drawn."""
    batch_size: int = 512
    lr: float = 5e-3
    n_heldout: int = 8192
    """Fresh samples for the held-out L0 / variance explained."""

    def __post_init__(self) -> None:
        if self.hidden_dim >= self.num_features:
            raise ValueError(f"superposition needs num_features > hidden_dim, got "
                             f"{self.num_features} <= {self.hidden_dim}")
        if not 0 < self.min_firing_prob <= self.max_firing_prob <= 1:
            raise ValueError("need 0 < min_firing_prob <= max_firing_prob <= 1")
        if not 0 < self.k <= self.d_sae:
            raise ValueError(f"need 0 < k <= d_sae, got k={self.k}, d_sae={self.d_sae}")
        if min(self.training_steps, self.batch_size, self.n_heldout) < 1:
            raise ValueError("training_steps, batch_size and n_heldout must be positive")

    @property
    def expected_true_l0(self) -> float:
        """E[#firing features per sample] = sum_i p_i = n * (p_max + p_min) / 2 (linear p)."""
        return self.num_features * (self.max_firing_prob + self.min_firing_prob) / 2


@dataclass(frozen=True)
class SyntheticSeeds:
    """Independent torch seeds for each random step, derived from one integer."""

    dictionary: int
    training: int
    null: int
    heldout: int

    @classmethod
    def from_int(cls, seed: int) -> SyntheticSeeds:
        """Spawn four 32-bit seeds with numpy's SeedSequence (no overlap between streams)."""
        return cls(*(int(s) for s in np.random.SeedSequence(seed).generate_state(4)))


@contextmanager
def seeded_torch(seed: int) -> Iterator[None]:
    """Run with torch's global CPU generator seeded, then restore it; one intra-op thread.

    One thread because the CPU is shared (two threads on two contended cores measured ~10x
    slower than one) and because it fixes the reduction order, so a seed gives one result.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(threads)


def make_data(cfg: SyntheticConfig, seed: int) -> tuple[FeatureDictionary, ActivationGenerator]:
    """Ground-truth dictionary (rows orthogonalised as far as superposition allows, unit norm)
    and a generator with linearly falling firing probabilities."""
    with seeded_torch(seed):
        feature_dict = FeatureDictionary(cfg.num_features, cfg.hidden_dim, seed=seed)
    probs = linear_firing_probabilities(cfg.num_features, cfg.max_firing_prob, cfg.min_firing_prob)
    generator = ActivationGenerator(cfg.num_features, probs, std_firing_magnitudes=cfg.magnitude_std,
                                    mean_firing_magnitudes=1.0)
    return feature_dict, generator


def train_sae(cfg: SyntheticConfig, feature_dict: FeatureDictionary,
              generator: ActivationGenerator, seed: int) -> TopKTrainingSAE:
    """A TopK SAE trained with ``sae_lens.synthetic.train_toy_sae`` (constant lr, Adam)."""
    with seeded_torch(seed):
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=cfg.hidden_dim, d_sae=cfg.d_sae, k=cfg.k))
        train_toy_sae(sae, feature_dict, generator, training_samples=cfg.training_steps * cfg.batch_size,
                      batch_size=cfg.batch_size, lr=cfg.lr)
    sae.eval()
    return sae


class ShuffledDimensions(torch.nn.Module):
    """A feature dictionary whose outputs have every hidden dimension permuted independently
    across the samples of a batch: each dimension's marginal distribution is kept, the
    directions (the ground-truth features) are destroyed. An SAE trained on it is R1's null:
    what the same training 'recovers' from data with the same marginals and no features (a
    random dictionary is too easy a null: it is never trained)."""

    def __init__(self, feature_dict: FeatureDictionary, seed: int) -> None:
        super().__init__()
        self.feature_dict = feature_dict
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def feature_vectors(self) -> Tensor:
        return self.feature_dict.feature_vectors

    def forward(self, features: Tensor) -> Tensor:
        hidden = self.feature_dict(features)  # (batch, hidden_dim)
        keys = torch.rand(hidden.shape, generator=self.generator).to(hidden.device)
        return torch.gather(hidden, 0, keys.argsort(dim=0))  # each column permuted on its own


def shuffled_seed(seed: int) -> int:
    """The shuffled-data SAE's seed, from its own SeedSequence stream (the four of
    SyntheticSeeds stay what they were)."""
    return int(np.random.SeedSequence([seed, 1]).generate_state(1)[0])


def random_dictionary(n_rows: int, dim: int, seed: int) -> Tensor:
    """(n_rows, dim) i.i.d. Gaussian rows: directions uniform on the sphere (the null)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_rows, dim, generator=g)


def max_cosine_per_feature(true: Tensor, decoder: Tensor, *, absolute: bool = False) -> np.ndarray:
    """m_i = max_j cos(t_i, d_j) over decoder rows j, for every true feature i.

    ``true`` is (n_features, d), ``decoder`` (n_rows, d). Invariant to permuting or positively
    rescaling decoder rows; permuting true features permutes the output. Signed by default:
    an SAE latent fires with a non-negative coefficient, so a row -t_i does not represent t_i.
    With ``absolute=True``, m_i = max_j |cos| and flipping a row's sign changes nothing.
    Raises on a zero row (its cosine is undefined). float64 throughout.
    """
    t = true.detach().to(torch.float64).cpu()
    d = decoder.detach().to(torch.float64).cpu()
    if t.ndim != 2 or d.ndim != 2 or t.shape[1] != d.shape[1]:
        raise ValueError(f"need (n, d) and (m, d) matrices, got {tuple(t.shape)} and {tuple(d.shape)}")
    for name, m in (("true", t), ("decoder", d)):
        if (m.norm(dim=1) == 0).any():
            raise ValueError(f"{name} has a zero row: cosine undefined")
    cos = (t / t.norm(dim=1, keepdim=True)) @ (d / d.norm(dim=1, keepdim=True)).T  # (n, m)
    if absolute:
        cos = cos.abs()
    return cos.max(dim=1).values.numpy()


@dataclass(frozen=True)
class Heldout:
    """Per-sample quantities on fresh samples (n,): latents != 0, true features > 0,
    e = ||x - x_hat||^2 and v = ||x - mean(x)||^2."""

    sae_l0: np.ndarray
    true_l0: np.ndarray
    sq_err: np.ndarray
    sq_dev: np.ndarray


@torch.no_grad()
def heldout(sae: TopKTrainingSAE, feature_dict: FeatureDictionary, generator: ActivationGenerator,
            n: int, seed: int) -> Heldout:
    """Draw n fresh samples (never seen in training: each training batch is a new draw)."""
    with seeded_torch(seed):
        feats = generator.sample(n)  # (n, num_features)
        x = feature_dict(feats)  # (n, d)
        latents = sae.encode(x)  # (n, d_sae)
        x_hat = sae.decode(latents)  # (n, d)
    x64, xh64 = x.to(torch.float64), x_hat.to(torch.float64)
    return Heldout(
        sae_l0=(latents != 0).sum(dim=1).numpy().astype(float),
        true_l0=(feats > 0).sum(dim=1).numpy().astype(float),
        sq_err=((x64 - xh64) ** 2).sum(dim=1).numpy(),
        sq_dev=((x64 - x64.mean(dim=0)) ** 2).sum(dim=1).numpy(),
    )


def sae_lens_eval(sae: TopKTrainingSAE, feature_dict: FeatureDictionary,
                  generator: ActivationGenerator, n: int, seed: int) -> SyntheticDataEvalResult:
    """sae-lens' own synthetic evals (L0, explained variance, MCC, uniqueness, classification).

    With the same ``n`` and ``seed`` as :func:`heldout` it draws the very same samples (one
    ``generator.sample(n)`` right after seeding), so the two computations can be compared.
    """
    with seeded_torch(seed):
        return eval_sae_on_synthetic_data(sae, feature_dict, generator, num_samples=n)


def heldout_fve(h: Heldout) -> float:
    """FVE of the held-out samples (harness.statistics.stats.fraction_variance_explained):
    1 - sum_i ||x_i - x_hat_i||^2 / sum_i ||x_i - mean(x)||^2 (sae-lens' R^2)."""
    return float(fraction_variance_explained(np.sum(h.sq_err), np.sum(h.sq_dev)))


def fve_bootstrap(h: Heldout, rng: np.random.Generator, *, n_resamples: int = 2000,
                  confidence: float = 0.95) -> Estimate:
    """FVE with a paired percentile bootstrap over samples (mean(x) fixed at the full sample's:
    a resample's own mean differs by O(1/n))."""
    def fve(e: np.ndarray, v: np.ndarray, axis: int = -1) -> np.ndarray:
        return fraction_variance_explained(e.sum(axis=axis), v.sum(axis=axis))

    res = stats.bootstrap((h.sq_err, h.sq_dev), fve, paired=True, vectorized=True,
                          n_resamples=n_resamples, confidence_level=confidence,
                          method="percentile", rng=rng)
    ci = res.confidence_interval
    return Estimate(heldout_fve(h), float(ci.low), float(ci.high),
                    len(h.sq_err), "bootstrap-percentile", confidence)


@dataclass(frozen=True)
class SyntheticRun:
    """Everything R1 measures: the data, the trained SAE and the null dictionary."""

    cfg: SyntheticConfig
    seeds: SyntheticSeeds
    feature_dict: FeatureDictionary
    generator: ActivationGenerator
    sae: TopKTrainingSAE
    null_decoder: Tensor
    """(d_sae, hidden_dim) random dictionary of the SAE decoder's shape."""
    train_seconds: float
    shuffled_sae: TopKTrainingSAE | None = None
    """The same SAE trained the same way on dimension-shuffled data (ShuffledDimensions)."""

    @property
    def shuffled_decoder(self) -> Tensor:
        if self.shuffled_sae is None:
            raise ValueError("this run trained no shuffled-data SAE")
        return self.shuffled_sae.W_dec.detach()  # (d_sae, d)

    @property
    def true_features(self) -> Tensor:
        return self.feature_dict.feature_vectors.detach()  # (num_features, d)

    @property
    def decoder(self) -> Tensor:
        return self.sae.W_dec.detach()  # (d_sae, d)


SYNTHETIC_SAE = "synthetic-sae"
SYNTHETIC_SAE_VERSION = "1"


def _trained(cache, cfg: SyntheticConfig, data: torch.nn.Module, generator: ActivationGenerator,
             seed: int, parts: dict) -> tuple[TopKTrainingSAE, float]:
    """(:func:`train_sae`, its training seconds), through the content cache when ``cache`` is
    given (``parts`` name the data: the run's seed and which dictionary). The training is the
    bulk of R1's cost (~8 s per SAE on one thread) and a pure function of the key."""
    if cache is None:
        start = time.perf_counter()
        sae = train_sae(cfg, data, generator, seed)
        return sae, time.perf_counter() - start
    from dataclasses import asdict
    from importlib.metadata import version

    key = {**parts, "cfg": asdict(cfg), "training_seed": seed, "sae_lens": version("sae-lens"),
           "torch": torch.__version__}

    def compute() -> tuple[dict[str, Tensor], dict]:
        sae = train_sae(cfg, data, generator, seed)
        return {k: v.detach().clone() for k, v in sae.state_dict().items()}, {}

    entry = cache.get_or_compute(SYNTHETIC_SAE, SYNTHETIC_SAE_VERSION, key, compute)
    with seeded_torch(seed):  # construction draws from torch's generator: leave it untouched
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=cfg.hidden_dim, d_sae=cfg.d_sae, k=cfg.k))
    sae.load_state_dict(entry.tensors)
    sae.eval()
    return sae, float(entry.meta.get("compute_seconds", float("nan")))


def run(cfg: SyntheticConfig, seed: int, cache=None) -> SyntheticRun:
    """Make data, train the SAE, draw the random null and train the shuffled-data SAE, each
    from its own seed spawned from ``seed``. ``cache``: a ContentCache the two trained SAEs are
    read from (or written to); None trains them here."""
    seeds = SyntheticSeeds.from_int(seed)
    feature_dict, generator = make_data(cfg, seeds.dictionary)
    sae, seconds = _trained(cache, cfg, feature_dict, generator, seeds.training,
                            {"seed": seed, "data": "features"})
    null = random_dictionary(cfg.d_sae, cfg.hidden_dim, seeds.null)
    shuffled, _ = _trained(cache, cfg, ShuffledDimensions(feature_dict, shuffled_seed(seed)), generator,
                           seeds.training, {"seed": seed, "data": "shuffled-dimensions"})
    return SyntheticRun(cfg, seeds, feature_dict, generator, sae, null, seconds, shuffled)
