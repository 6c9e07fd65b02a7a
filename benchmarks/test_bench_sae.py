"""Benchmarks of the SAE hot paths on real sae-lens SAEs at the suite's SmolLM2-135M shapes:
the residual SAEs (d_in 576, d_sae 2304 = 4 x d_model, k 32) and the MLP SAE (d_in 1536,
d_sae 3072 = 2 x d_mlp, k 64), taken from ``harness.saes.sources.default_sae_specs`` and built as the
suite builds them (harness.saes.train). Random
seeded inputs, no model. Numbers go to ``benchmark.extra_info``; nothing is asserted about time.

- ``sae.encode`` of 4096 activation vectors vs ``torch.addmm(b_enc, x, W_enc)`` of the same
  shape, its matmul bound. Good: ``encode_over_addmm`` within ~1.5x for TopK (a row-wise
  top-k, a zero fill and a scatter over the (4096, d_sae) pre-activations on top of the GEMM;
  ``topk_only_over_addmm`` is the top-k alone), near 1 for ReLU ("standard").
  ``plain_encode_over_addmm`` is the same math written directly (checked equal to
  ``sae.encode``): the gap to it is sae-lens' own overhead (the bias added in a second pass,
  and for TopK a rescale by decoder norms that to_inference has already folded to 1, which
  ``encode_without_rescale_over_addmm`` leaves out).
- one training step on a batch of 512 (the suite's ``train_batch_size_tokens``), exactly
  sae-lens 6.54's ``SAETrainer._train_step``: ``training_forward_pass`` (encode, dense decode,
  MSE and, once features count as dead, the TopK auxiliary loss) + firing statistics +
  ``loss.backward()`` + grad-norm clipping + Adam step + lr-scheduler step, vs the same
  ``training_forward_pass`` under ``no_grad``. Good: ``step_over_forward`` about 3x (backward
  about 2x the forward, less here as no gradient flows to the input; Adam and the clipping a
  few elementwise passes over the parameters). ``backward_over_forward`` and
  ``update_share_of_step`` (clipping, Adam, schedulers, firing statistics) split the step.
  Cases: no feature dead (the first ``dead_feature_window`` steps) and a quarter dead, which
  adds the auxiliary top-k and a second dense decode to both sides.

Timings alternate the functions round by round and keep each one's best (``timing.interleaved_best``,
as in test_bench_geometry.py); the load average is recorded with them, since on shared cores the
absolute times (and, less so, the ratios) move with other jobs.

Run: python -m pytest benchmarks/test_bench_sae.py -q -p no:cacheprovider --benchmark-only
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from timing import interleaved_best

from harness.saes.sources import SAESpec, default_sae_specs, sae_from_state
from harness.saes.train import new_training_sae, to_inference

# SmolLM2-135M's dimensions; the SAE specs are the suite's own (default_sae_specs), so the
# benchmark follows any change to their size.
_SMOLLM2 = SimpleNamespace(cfg=SimpleNamespace(d_model=576, d_mlp=1536, n_layers=30))
_SPECS = default_sae_specs(_SMOLLM2)
# name: (d_in, d_sae, k, hook) -- the shallowest residual SAE and the MLP SAE.
SHAPES = {
    "resid": (_SMOLLM2.cfg.d_model, _SPECS[0].d_sae, _SPECS[0].k, _SPECS[0].hook_name),
    "mlp": (_SMOLLM2.cfg.d_mlp, _SPECS[-1].d_sae, _SPECS[-1].k, _SPECS[-1].hook_name),
}
ENCODE_BATCH = 4096


def _spec(shape: str, architecture: str = "topk") -> SAESpec:
    _, d_sae, k, hook = SHAPES[shape]
    return SAESpec(hook_name=hook, d_sae=d_sae, k=k, architecture=architecture)


@functools.cache
def _inference_state(shape: str, architecture: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A freshly initialised SAE's inference (config dict, state dict) through the suite's path:
    TrainingSAE -> to_inference (TopK folds its decoder norms here)."""
    d_in = SHAPES[shape][0]
    return to_inference(new_training_sae(_spec(shape, architecture), d_in, "cpu"))


def _inference_sae(shape: str, architecture: str, **cfg_overrides: Any) -> Any:
    """The inference SAE as the suite loads it (sae_from_state), with optional config overrides."""
    cfg_dict, state = _inference_state(shape, architecture)
    return sae_from_state({**cfg_dict, **cfg_overrides}, state)


def _inputs(n: int, d_in: int, seed: int) -> torch.Tensor:
    """(n, d_in) float32 Gaussian rows: mean norm ~sqrt(d_in), the scale SAEs train at."""
    return torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("architecture", ["topk", "standard"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_encode_vs_addmm(benchmark, shape: str, architecture: str) -> None:
    """sae.encode of (4096, d_in) vs torch.addmm(b_enc, x, W_enc) -> (4096, d_sae)."""
    sae = _inference_sae(shape, architecture)
    d_in, d_sae, k, _ = SHAPES[shape]
    x = _inputs(ENCODE_BATCH, d_in, seed=0)  # (batch, d_in)
    W_enc, b_enc, b_dec = sae.W_enc, sae.b_enc, sae.b_dec  # (d_in, d_sae), (d_sae,), (d_in,)

    def encode(x: torch.Tensor = x) -> torch.Tensor:
        return sae.encode(x)

    def addmm() -> torch.Tensor:
        return torch.addmm(b_enc, x, W_enc)

    def plain_encode(x: torch.Tensor = x) -> torch.Tensor:
        pre = torch.addmm(b_enc, x - b_dec, W_enc)  # (batch, d_sae)
        if architecture == "standard":
            return pre.relu_()
        top = pre.topk(k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())

    fns: dict[str, Callable[[], object]] = {"addmm": addmm, "encode": encode,
                                            "plain_encode": plain_encode}
    same = [plain_encode]  # functions that must equal sae.encode
    if architecture == "topk":
        pre = addmm()
        fns["topk_only"] = lambda: pre.topk(k, dim=-1, sorted=False)
        # to_inference folds the decoder norms into the weights yet keeps
        # rescale_acts_by_decoder_norm=True, so every encode still multiplies the (batch, d_sae)
        # pre-activations by norms that are 1: the same SAE without that flag.
        unscaled = _inference_sae(shape, architecture, rescale_acts_by_decoder_norm=False)
        fns["encode_without_rescale"] = lambda: unscaled.encode(x)
        same.append(unscaled.encode)
    with torch.no_grad():
        few = x[:256]  # equivalence on 256 rows: cheap, and the same code path
        for fn in same:
            torch.testing.assert_close(fn(few), encode(few), rtol=1e-5, atol=1e-5)
        t = interleaved_best(fns)  # warms every function up first
        benchmark.pedantic(encode, rounds=1, iterations=1, warmup_rounds=0)
    flop = 2 * ENCODE_BATCH * d_in * d_sae
    benchmark.extra_info.update(
        {
            "architecture": architecture,
            "shape": [ENCODE_BATCH, d_in, d_sae],
            "k": k if architecture == "topk" else None,
            "threads": torch.get_num_threads(),
            "loadavg_1min": os.getloadavg()[0],
            **{f"{name}_s": v for name, v in t.items()},
            "addmm_gflop_per_s": flop / t["addmm"] / 1e9,
            "encode_over_addmm": t["encode"] / t["addmm"],
            "plain_encode_over_addmm": t["plain_encode"] / t["addmm"],
            **({"topk_only_over_addmm": t["topk_only"] / t["addmm"],
                "encode_without_rescale_over_addmm": t["encode_without_rescale"] / t["addmm"],
                "rescale_flag": sae.cfg.rescale_acts_by_decoder_norm}
               if architecture == "topk" else {}),
            "target": "encode_over_addmm <= ~1.5",
        }
    )


@pytest.mark.slow
@pytest.mark.parametrize("dead_share", [0.0, 0.25], ids=["none-dead", "quarter-dead"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_train_step_vs_forward(benchmark, shape: str, dead_share: float) -> None:
    """One sae-lens training step of a TopK TrainingSAE on 512 vectors vs its forward alone."""
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.training.sae_trainer import SAETrainer

    spec = _spec(shape)
    d_in, d_sae, k, _ = SHAPES[shape]
    batch = spec.train_batch_size_tokens
    sae = new_training_sae(spec, d_in, "cpu")
    steps = spec.training_tokens // batch
    trainer = SAETrainer(
        SAETrainerConfig(
            total_training_samples=spec.training_tokens, train_batch_size_samples=batch,
            lr=spec.lr, lr_end=spec.lr / 10,  # the runner config's default lr_end
            lr_decay_steps=int(spec.lr_decay_fraction * steps),
            dead_feature_window=spec.dead_feature_window, device="cpu",
        ),
        sae,
        data_provider=iter(()),  # never read: the steps are fed by hand
    )
    x = _inputs(batch, d_in, seed=1)  # (batch, d_in)
    gen = torch.Generator().manual_seed(2)
    dead = torch.rand(d_sae, generator=gen) < dead_share  # (d_sae,) bool

    def pin_dead() -> None:
        """Make exactly ``dead`` the trainer's dead set (a step resets features that fire)."""
        trainer.n_forward_passes_since_fired.zero_()
        trainer.n_forward_passes_since_fired[dead] = spec.dead_feature_window + 1

    def step() -> object:
        pin_dead()
        return trainer._train_step(sae, x)

    def forward() -> object:
        with torch.no_grad():
            return sae.training_forward_pass(
                TrainStepInput(sae_in=x, coefficients=trainer.get_coefficients(),
                               dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False)
            )

    def forward_backward() -> None:  # the step without statistics, clipping, Adam, schedulers
        pin_dead()
        sae.zero_grad(set_to_none=True)
        sae.training_forward_pass(
            TrainStepInput(sae_in=x, coefficients=trainer.get_coefficients(),
                           dead_neuron_mask=trainer.dead_neurons, n_training_steps=0,
                           is_logging_step=False)
        ).loss.backward()

    def encode_decode() -> object:
        with torch.no_grad():
            return sae.decode(sae.encode(x))

    pin_dead()
    assert torch.equal(trainer.dead_neurons, dead)
    out = forward()
    has_aux = float(out.losses["auxiliary_reconstruction_loss"]) > 0
    t = interleaved_best({"forward": forward, "forward_backward": forward_backward, "step": step,
                           "encode_decode": encode_decode})
    benchmark.pedantic(step, rounds=1, iterations=1, warmup_rounds=0)
    n_params = sum(p.numel() for p in sae.parameters())
    benchmark.extra_info.update(
        {
            "architecture": "topk",
            "shape": [batch, d_in, d_sae],
            "k": k,
            "dead_features": int(dead.sum()),
            "aux_loss_active": has_aux,
            "params": n_params,
            "threads": torch.get_num_threads(),
            "loadavg_1min": os.getloadavg()[0],
            **{f"{name}_s": v for name, v in t.items()},
            "step_over_forward": t["step"] / t["forward"],
            "backward_over_forward": (t["forward_backward"] - t["forward"]) / t["forward"],
            "update_share_of_step": (t["step"] - t["forward_backward"]) / t["step"],
            "step_over_encode_decode": t["step"] / t["encode_decode"],
            "target": "step_over_forward ~3",
        }
    )
