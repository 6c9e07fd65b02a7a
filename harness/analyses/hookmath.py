"""Independent re-computation of TransformerLens MLP hook values (claims family H).

Every function here reads weights and ``model.cfg`` and does the arithmetic itself (under
``torch.no_grad``); none calls a module's ``forward``. That independence is the point: an identity
check such as ``cache["blocks.L.mlp.hook_pre"] == expected_pre(model, cache, L)`` only means
something if the right-hand side was not produced by the code under test.

What the formulas mirror (TransformerLens 3.9, ``components/`` and ``components/mlps/``):

- ``ln2`` is applied to ``hook_resid_mid`` (``hook_resid_pre`` for parallel attn/MLP blocks).
  ``hook_normalized`` fires *before* the weight ``w`` (and bias ``b``) are applied, for LayerNorm
  and RMSNorm alike, so it is not the MLP's input unless the norm has been folded.
- Plain MLP: ``hook_pre = x @ W_in + b_in``; ``hook_post = act(hook_pre)``.
- SoLU (``act_fn="solu_ln"``): ``hook_mid = hook_pre * softmax(hook_pre)`` over d_mlp, then the
  MLP's own norm ``mlp.ln`` (a LayerNorm with ``w``, ``b`` when ``normalization_type == "LN"``,
  otherwise the weightless centre-and-scale LayerNormPre), and ``hook_post`` fires after that norm.
- Gated MLP: ``hook_pre = x @ W_gate`` (no gate bias exists), ``hook_pre_linear = x @ W_in``
  (no bias either) and ``hook_post = act(hook_pre) * hook_pre_linear + b_in``: TL adds ``b_in``
  *after* the product, not inside the linear branch.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:  # annotation only: importing TL here would slow `import harness`
    from transformer_lens import HookedTransformer

__all__ = [
    "HookCache",
    "apply_activation",
    "expected_mlp_out",
    "expected_post",
    "expected_pre",
    "expected_pre_linear",
    "expected_resid_mid",
    "expected_resid_post",
    "hook_names_for_layer",
    "layer_norm_pre",
    "max_errors",
    "mlp_input",
    "norm_input",
    "rms_norm_pre",
]


class HookCache(Protocol):
    """Anything indexable by hook name: an ``ActivationCache`` or a plain ``dict``."""

    def __getitem__(self, key: str) -> Tensor: ...


NormName = Literal["ln1", "ln2"]

# Architectural options these formulas do not model; refusing them beats a silent mismatch.
_UNSUPPORTED_FLAGS = (
    "attn_only",
    "use_normalization_before_and_after",
    "load_in_4bit",
)


def _check_supported(model: HookedTransformer) -> None:
    cfg = model.cfg
    for flag in _UNSUPPORTED_FLAGS:
        if getattr(cfg, flag, False):
            raise NotImplementedError(f"hookmath does not model cfg.{flag}=True")
    if getattr(cfg, "num_experts", None):
        raise NotImplementedError("hookmath does not model mixture-of-experts MLPs")
    if cfg.original_architecture in {"Olmo2ForCausalLM", "Olmo3ForCausalLM"}:
        # Post-norm blocks apply ln2 to the MLP *output*, not its input.
        raise NotImplementedError("hookmath does not model post-norm architectures")


def ln_activation(model: HookedTransformer) -> bool:
    """True for SoLU-style activations that carry their own norm (``act_fn`` ending in ``_ln``):
    ``hook_mid`` is then the nonlinearity's output and ``hook_post`` the norm's."""
    act_fn = model.cfg.act_fn
    return act_fn is not None and act_fn.endswith("_ln")



def _check_mlp_variant(model: HookedTransformer) -> None:
    if model.cfg.gated_mlp and ln_activation(model):
        # TL accepts this config, but its GatedMLP then silently drops W_in and b_in
        # (hook_post = ln(act(gate))); no real model has it, so there is no formula to match.
        raise NotImplementedError("gated MLP with a *_ln activation has no defined formula")


def _upcast(x: Tensor) -> Tensor:
    """TL norms compute in float32 when the model runs in half precision; do the same."""
    return x if x.dtype in (torch.float32, torch.float64) else x.to(torch.float32)


def layer_norm_pre(x: Tensor, eps: float) -> Tensor:
    """LayerNormPre(x) = (x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps), over the last dim."""
    centred = x - x.mean(dim=-1, keepdim=True)  # (..., d)
    return centred / (centred.pow(2).mean(dim=-1, keepdim=True) + eps).sqrt()  # (..., d)


def rms_norm_pre(x: Tensor, eps: float) -> Tensor:
    """RMSNormPre(x) = x / sqrt(mean(x^2) + eps), over the last dim (no centring)."""
    return x / (x.pow(2).mean(dim=-1, keepdim=True) + eps).sqrt()  # (..., d)


@torch.no_grad()
def norm_input(
    model: HookedTransformer, resid: Tensor, layer: int, which: NormName = "ln2"
) -> Tensor:
    """Apply block ``layer``'s ``ln1``/``ln2`` as configured by ``cfg.normalization_type``.

    LN:     (x - mean) / sqrt(var + eps) * w + b
    LNPre:  (x - mean) / sqrt(var + eps)               (what fold_ln leaves behind)
    RMS:    x / sqrt(mean(x^2) + eps) * w
    RMSPre: x / sqrt(mean(x^2) + eps)
    None:   x
    """
    if which not in ("ln1", "ln2"):
        raise ValueError(f"which must be 'ln1' or 'ln2', got {which!r}")
    cfg = model.cfg
    norm_type = cfg.normalization_type
    if norm_type is None:
        return resid
    x = _upcast(resid)  # (batch, pos, d_model)
    if norm_type in ("LN", "LNPre"):
        normed = layer_norm_pre(x, cfg.eps).to(cfg.dtype)  # (batch, pos, d_model)
    elif norm_type in ("RMS", "RMSPre"):
        normed = rms_norm_pre(x, cfg.eps).to(cfg.dtype)  # (batch, pos, d_model)
    else:
        raise ValueError(f"unknown normalization_type {norm_type!r}")
    if norm_type in ("LNPre", "RMSPre"):
        return normed
    norm = getattr(model.blocks[layer], which)
    out = normed * norm.w  # (batch, pos, d_model)
    return out + norm.b if norm_type == "LN" else out


def _mlp_source_hook(model: HookedTransformer, layer: int) -> str:
    """The residual hook the MLP reads: resid_mid, or resid_pre for parallel attn/MLP blocks."""
    stage = "resid_pre" if model.cfg.parallel_attn_mlp else "resid_mid"
    return f"blocks.{layer}.hook_{stage}"


@torch.no_grad()
def mlp_input(model: HookedTransformer, cache: HookCache, layer: int) -> Tensor:
    """x = ln2(resid_mid), the tensor the MLP actually multiplies. Shape (batch, pos, d_model)."""
    _check_supported(model)
    return norm_input(model, cache[_mlp_source_hook(model, layer)], layer, "ln2")


@torch.no_grad()
def expected_pre(model: HookedTransformer, cache: HookCache, layer: int) -> Tensor:
    """Expected ``blocks.{layer}.mlp.hook_pre``. Shape (batch, pos, d_mlp).

    Plain MLP: x @ W_in + b_in.  Gated MLP: x @ W_gate (TL's GatedMLP has no gate bias).
    """
    _check_mlp_variant(model)
    mlp = model.blocks[layer].mlp
    x = mlp_input(model, cache, layer)  # (batch, pos, d_model)
    if not model.cfg.gated_mlp:
        return x @ mlp.W_in + mlp.b_in  # (batch, pos, d_mlp)
    if hasattr(mlp, "b_gate"):
        # A later TL that adds a gate bias must be modelled, not silently ignored.
        raise NotImplementedError("this GatedMLP has a b_gate; hookmath does not model it")
    return x @ mlp.W_gate  # (batch, pos, d_mlp)


@torch.no_grad()
def expected_pre_linear(model: HookedTransformer, cache: HookCache, layer: int) -> Tensor:
    """Expected ``blocks.{layer}.mlp.hook_pre_linear`` = x @ W_in (gated MLPs only; no b_in)."""
    if not model.cfg.gated_mlp:
        raise ValueError("hook_pre_linear exists only for gated MLPs (cfg.gated_mlp=True)")
    _check_mlp_variant(model)
    x = mlp_input(model, cache, layer)  # (batch, pos, d_model)
    return x @ model.blocks[layer].mlp.W_in  # (batch, pos, d_mlp)


def _gelu_new(x: Tensor) -> Tensor:
    """GPT-2's tanh GELU: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

    Written out rather than imported from ``transformer_lens.utils`` because that is the very
    function whose output ``hook_post`` holds; re-using it would make the H4 check circular.
    """
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def apply_activation(name: str, x: Tensor) -> Tensor:
    """act(x) for TL's ``cfg.act_fn`` names. ``solu``/``solu_ln``: x * softmax(x) over d_mlp."""
    if name == "gelu":
        # Exact erf GELU. TL maps "gelu" to this same torch primitive, so H4 checks here that
        # TL applies the right function at the right place, not torch's GELU numerics.
        return F.gelu(x)
    if name == "gelu_new":
        return _gelu_new(x)
    if name == "relu":
        return x.clamp_min(0.0)
    if name == "silu":
        return x * torch.sigmoid(x)
    if name in ("solu", "solu_ln"):
        return x * torch.softmax(x, dim=-1)
    raise ValueError(f"activation {name!r} is not modelled by hookmath")


@torch.no_grad()
def expected_post(model: HookedTransformer, cache: HookCache, layer: int) -> Tensor:
    """Expected ``blocks.{layer}.mlp.hook_post`` from the cached pre-activations.

    Plain:  act(hook_pre)
    SoLU:   mlp.ln(hook_pre * softmax(hook_pre)); mlp.ln is LayerNorm(w, b) when
            normalization_type == "LN", else LayerNormPre (centre and scale, even for RMS models).
    Gated:  act(hook_pre) * hook_pre_linear + b_in
    """
    _check_supported(model)
    _check_mlp_variant(model)
    cfg = model.cfg
    mlp = model.blocks[layer].mlp
    prefix = f"blocks.{layer}.mlp"
    pre = cache[f"{prefix}.hook_pre"]  # (batch, pos, d_mlp)
    act = apply_activation(cfg.act_fn, pre)  # (batch, pos, d_mlp)
    if cfg.gated_mlp:
        return act * cache[f"{prefix}.hook_pre_linear"] + mlp.b_in  # (batch, pos, d_mlp)
    if not ln_activation(model):
        return act
    normed = layer_norm_pre(_upcast(act), cfg.eps).to(cfg.dtype)  # (batch, pos, d_mlp)
    if cfg.normalization_type == "LN":
        return normed * mlp.ln.w + mlp.ln.b  # (batch, pos, d_mlp)
    return normed


@torch.no_grad()
def expected_mlp_out(model: HookedTransformer, cache: HookCache, layer: int) -> Tensor:
    """Expected ``blocks.{layer}.hook_mlp_out`` = hook_post @ W_out + b_out. (batch, pos, d_model)."""
    _check_supported(model)
    mlp = model.blocks[layer].mlp
    post = cache[f"blocks.{layer}.mlp.hook_post"]  # (batch, pos, d_mlp)
    return post @ mlp.W_out + mlp.b_out  # (batch, pos, d_model)


def expected_resid_mid(cache: HookCache, layer: int) -> Tensor:
    """Expected ``hook_resid_mid`` = hook_resid_pre + hook_attn_out. (batch, pos, d_model)."""
    return cache[f"blocks.{layer}.hook_resid_pre"] + cache[f"blocks.{layer}.hook_attn_out"]


def expected_resid_post(cache: HookCache, layer: int) -> Tensor:
    """Expected ``hook_resid_post`` = hook_resid_mid + hook_mlp_out (sequential blocks only)."""
    return cache[f"blocks.{layer}.hook_resid_mid"] + cache[f"blocks.{layer}.hook_mlp_out"]


def hook_names_for_layer(model: HookedTransformer, layer: int) -> list[str]:
    """Hook names the functions above read for ``layer``, for ``run_with_cache(names_filter=)``."""
    _check_supported(model)
    block = f"blocks.{layer}"
    names = [f"{block}.hook_resid_pre", f"{block}.hook_attn_out", f"{block}.mlp.hook_pre"]
    if not model.cfg.parallel_attn_mlp:
        names.append(f"{block}.hook_resid_mid")
    if model.cfg.gated_mlp and not ln_activation(model):
        names.append(f"{block}.mlp.hook_pre_linear")
    names += [f"{block}.mlp.hook_post", f"{block}.hook_mlp_out", f"{block}.hook_resid_post"]
    return names


def max_errors(actual: Tensor, expected: Tensor) -> dict[str, float]:
    """Worst-case disagreement, computed in float64.

    max_abs_error = max |actual - expected|
    max_rel_error = max_abs_error / max |expected|  (0 when both are all zero, inf when only
                    ``expected`` is). A NaN anywhere in either input makes both results NaN.
    """
    if actual.shape != expected.shape:
        raise ValueError(f"shape mismatch: actual {tuple(actual.shape)} vs {tuple(expected.shape)}")
    if actual.numel() == 0:
        raise ValueError("nothing to compare: both tensors are empty")
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    # torch.max propagates NaN, so a NaN in either tensor surfaces in max_abs (never hidden).
    max_abs = (a - e).abs().max().item()
    nan_in_input = bool(torch.isnan(a).any() or torch.isnan(e).any())
    if nan_in_input or math.isnan(max_abs):
        return {"max_abs_error": math.nan, "max_rel_error": math.nan}
    scale = e.abs().max().item()
    if scale > 0.0:
        return {"max_abs_error": max_abs, "max_rel_error": max_abs / scale}
    return {"max_abs_error": max_abs, "max_rel_error": 0.0 if max_abs == 0.0 else math.inf}
