"""Family R on synthetic data (CLAIMS.md; source: the SAE-on-MLP-activations write-up, seeds/003).

R1 does not touch the language model: it runs (and passes or fails) the same way on every
``--subject``. Data, SAE and trainer are sae-lens' (see harness/saes/synthetic.py): a
FeatureDictionary of 256 unit-norm features in 64 dims, linearly falling firing probabilities
(4 % to 1 %), a TopK SAE trained by ``sae_lens.synthetic.train_toy_sae``.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
from sae_lens.synthetic import mean_correlation_coefficient

from harness.evidence.figures import pyplot
from harness.saes import synthetic
from harness.statistics.stats import bootstrap, exact

R1_CONFIG = synthetic.SyntheticConfig()


@pytest.mark.claim(id="R1")
def test_sae_recovers_synthetic_features(evidence, rng, content_cache):
    cfg = R1_CONFIG
    seed = int(rng.integers(2**32))
    run = synthetic.run(cfg, seed, content_cache)  # the two trained SAEs are content-cached
    true, dec, null = run.true_features, run.decoder, run.null_decoder

    trained = synthetic.max_cosine_per_feature(true, dec)  # (num_features,)
    rand = synthetic.max_cosine_per_feature(true, null)
    random_est = bootstrap(rand, np.mean, rng)
    evidence.record(
        "recovery_minus_random", bootstrap(trained - rand, np.mean, rng), null=0.0,
        description="mean over true features of [max_j cos(f_i, W_dec[j]) - max_j cos(f_i, R[j])], "
        "R a Gaussian dictionary of W_dec's shape; paired bootstrap over true features",
        config=asdict(cfg), seeds=asdict(run.seeds),
    )
    evidence.record("mean_max_cosine", bootstrap(trained, np.mean, rng), null=random_est,
                    description="mean over true features of max cosine with any SAE decoder row",
                    quantiles={q: float(np.quantile(trained, q)) for q in (0.05, 0.25, 0.5, 0.75)},
                    absolute_cosine_variant=float(synthetic.max_cosine_per_feature(true, dec, absolute=True).mean()))
    evidence.record("mean_max_cosine_random", random_est,
                    description="the same for the random dictionary (the null)",
                    absolute_cosine_variant=float(synthetic.max_cosine_per_feature(true, null, absolute=True).mean()))
    thr = synthetic.RECOVERED_COSINE
    shuffled = synthetic.max_cosine_per_feature(true, run.shuffled_decoder)
    evidence.record("share_recovered_shuffled_data", bootstrap((shuffled > thr).astype(float), np.mean, rng),
                    description="the null: the same share for the same SAE trained the same way on "
                    "data whose dimensions were shuffled independently (marginals kept, features gone)",
                    mean_max_cosine=float(shuffled.mean()))
    evidence.record("share_recovered", bootstrap((trained > thr).astype(float), np.mean, rng),
                    null=float(np.mean(rand > thr)),
                    description=f"share of true features with some decoder row at cosine > {thr} "
                    "(null here: the random dictionary's share)",
                    n_recovered=int((trained > thr).sum()), cosine_bar=thr)

    # Held-out: fresh samples; sae-lens' eval with the same seed draws the identical samples.
    h = synthetic.heldout(run.sae, run.feature_dict, run.generator, cfg.n_heldout, run.seeds.heldout)
    ev = synthetic.sae_lens_eval(run.sae, run.feature_dict, run.generator, cfg.n_heldout, run.seeds.heldout)
    evidence.record("sae_l0", bootstrap(h.sae_l0, np.mean, rng), null=bootstrap(h.true_l0, np.mean, rng),
                    description=f"mean latents != 0 per held-out sample (TopK k = {cfg.k}); null = the "
                    "true number of firing features on the same samples",
                    sae_lens_sae_l0=ev.sae_l0, sae_lens_true_l0=ev.true_l0)
    evidence.record("fraction_variance_explained", synthetic.fve_bootstrap(h, rng),
                    description="1 - sum ||x - x_hat||^2 / sum ||x - mean x||^2 on held-out samples",
                    sae_lens_explained_variance=ev.explained_variance, shrinkage=ev.shrinkage)
    evidence.record("mcc", exact(ev.mcc, cfg.num_features),
                    null=mean_correlation_coefficient(null, true),
                    description="sae-lens mean_correlation_coefficient: mean |cos| over a one-to-one "
                    "(Hungarian) matching of decoder rows to true features; exact given the decoder",
                    sae_lens_eval=ev.to_dict())
    evidence.note(f"{cfg.num_features} features in {cfg.hidden_dim} dims, firing p {cfg.max_firing_prob} "
                  f"to {cfg.min_firing_prob} (expected true L0 {cfg.expected_true_l0:.1f}); TopK SAE d_sae "
                  f"{cfg.d_sae}, k {cfg.k}; {cfg.training_steps} steps x {cfg.batch_size} samples, lr "
                  f"{cfg.lr}, trained in {run.train_seconds:.1f} s by sae_lens.synthetic.train_toy_sae; "
                  f"{cfg.n_heldout} held-out samples. sae-lens eval: dead latents {ev.dead_latents}, "
                  f"uniqueness {ev.uniqueness:.3f}, detection F1 {ev.classification.f1_score:.3f}.")
    _figure_r1(evidence, trained, rand)
    evidence.judge()


def _figure_r1(evidence, trained: np.ndarray, rand: np.ndarray) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    bins = np.linspace(min(0.0, rand.min()), 1.0, 51)
    ax.hist(rand, bins=bins, alpha=0.6, label=f"random dictionary (mean {rand.mean():.3f})")
    ax.hist(trained, bins=bins, alpha=0.6, label=f"trained SAE decoder (mean {trained.mean():.3f})")
    ax.axvline(synthetic.RECOVERED_COSINE, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="max cosine of a true feature with any dictionary row", ylabel="true features",
           title="R1: feature recovery on synthetic superposition data")
    ax.legend(fontsize=8)
    evidence.figure(fig, "max_cosine_hist")
    plt.close(fig)
