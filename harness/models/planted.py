"""Planted subjects: tiny models whose answer is known because it was wired in.

``planted-tokens`` (family W's positive control): neurons ``0 .. n_planted - 1`` of every MLP
layer are wired to chosen tokens, so that both of the thesis' methods must recover the wired
token, Method 2 (cosine between ``W_E[t]`` and ``W_in[:, n]``) and Method 1 (the token at the
argmax position of the neuron's top max-activating contexts). The non-wired neurons stay random
and are the in-model negative control.

Construction (``build_planted``):

1. Every parameter is drawn from one ``torch.Generator`` seeded with ``spec.seed`` (the global
   RNG is never touched): ``W_E ~ N(0, 1)``, ``W_Q, W_K, W_V, W_in, W_U ~ N(0, 1/d_model)``,
   LayerNorm ``w ~ 1 + N(0, ln_noise^2)`` and ``b ~ N(0, ln_noise^2)``, ``W_out ~ N(0,
   write_scale^2 / d_mlp)``.
2. Attention writes nothing (``W_O = 0``, ``b_O = 0``) and there are no positional embeddings
   (``W_pos = 0``), so the residual stream at position p depends on the token at p alone:
   ``W_E[x_p]`` plus the (small, ``write_scale``) outputs of earlier MLPs. Every activation of
   the model is therefore a function of the current token, and a neuron's maximum over any
   corpus is reached exactly at the occurrences of its argmax-over-vocabulary token.
3. Wired neuron n -> token t, in every layer, with that layer's ``ln2`` weight w and bias b
   (b = 0 under RMSNorm) and ``z_t = normalised W_E[t]`` (centred under LayerNorm, divided by
   its RMS; |z_t| = sqrt(d_model)), ``u_t = z_t / |z_t|``::

       W_in[:, n] = gain * u_t / (w * sqrt(d_model))
       b_in[n]    = -gain * cutoff - gain * ((b / w) . u_t) / sqrt(d_model)

   so that the pre-activation on a residual x is ``gain * (cos(z(x), z_t) - cutoff)``: it is
   ``gain * (1 - cutoff)`` on t in layer 0 and negative on every token whose normalised
   embedding has cosine < cutoff with t's. After TL's ``fold_ln`` the processed ``W_in[:, n]``
   is ``gain * u_t / sqrt(d_model)``, parallel to the centred ``W_E[t]``: Method 2's cosine is 1.
4. Random 64-d embeddings of ~49k tokens are far from orthogonal (each wired token's nearest
   other token has cosine up to ~0.6), so the builder checks the wiring numerically over the
   whole vocabulary (:func:`check_planted`) and raises :class:`PlantingError` unless each
   wired neuron's argmax token is its wired token. With the defaults (gain 8, cutoff 0.7) the
   wired token's pre-activation is 2.4 and the best other token's at most about -0.85.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from harness.activations.capture import first_content_position
from harness.data.corpus import Corpus

ACT_FNS = ("gelu", "gelu_new", "relu")
"""Activation functions monotone on the positives (the wired token's pre-activation)."""
NORMALIZATIONS = ("LN", "RMS")


class PlantingError(ValueError):
    """Wiring that cannot be built or that the built model does not realise."""


@dataclass(frozen=True)
class PlantedSpec:
    """Shape, seed and wiring strength of a planted-tokens model."""

    n_layers: int = 2
    """Transformer blocks; every block's MLP carries wired neurons."""
    d_model: int = 64
    """Residual stream width."""
    d_mlp: int = 256
    """MLP width."""
    n_heads: int = 4
    """Attention heads (their output weights are zero: attention writes nothing)."""
    n_ctx: int = 1024
    """Maximum context length (no positional embeddings, so only the attention mask grows)."""
    n_planted: int = 64
    """Neurons 0 .. n_planted - 1 of every layer are wired, neuron i to wired token i."""
    seed: int = 0
    """Seed of the generator every random weight is drawn from."""
    act_fn: str = "gelu"
    """MLP activation (one of ACT_FNS)."""
    normalization: str = "LN"
    """``LN`` (LayerNorm) or ``RMS`` (RMSNorm, no centring and no bias)."""
    gain: float = 8.0
    """How strongly a wired neuron prefers its token: pre-activation = gain * (cos - cutoff),
    cos between the normalised residual and the token's normalised embedding."""
    cutoff: float = 0.7
    """Cosine below which a wired neuron's pre-activation is negative (off)."""
    ln_noise: float = 0.1
    """Std of the norm weights' and biases' deviation from (1, 0): non-trivial, so the
    planting has to account for them and fold_ln has something to fold."""
    write_scale: float = 0.05
    """Std of W_out entries times sqrt(d_mlp): small, so the residual stream at every layer
    stays close to the current token's embedding (|W_E[t]| is about sqrt(d_model))."""

    def __post_init__(self) -> None:
        if min(self.n_layers, self.d_model, self.d_mlp, self.n_heads, self.n_ctx) < 1:
            raise ValueError("n_layers, d_model, d_mlp, n_heads and n_ctx must be >= 1")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not a multiple of n_heads {self.n_heads}")
        if not 1 <= self.n_planted <= self.d_mlp:
            raise ValueError(f"n_planted must be in [1, d_mlp={self.d_mlp}], got {self.n_planted}")
        if self.act_fn not in ACT_FNS:
            raise ValueError(f"act_fn must be one of {ACT_FNS}, got {self.act_fn!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}")
        if self.gain <= 0 or not 0 < self.cutoff < 1:
            raise ValueError("need gain > 0 and 0 < cutoff < 1")
        if self.ln_noise < 0 or self.write_scale < 0:
            raise ValueError("ln_noise and write_scale must be >= 0")


def choose_wired_tokens(corpus: Corpus, tokenizer: Any, n: int, min_count: int = 40) -> list[int]:
    """The ``n`` most frequent eligible token ids of the corpus, most frequent first.

    Frequency counts occurrences at positions >= 1 (position 0 is the BOS every context
    starts with; the harvest skips it). Eligible: in at least ``min_count`` distinct contexts
    (so a top-k over contexts is never short of the token, for k <= min_count), not a special
    token (BOS, EOS (the corpus' document separator), padding), and not whitespace-only once
    decoded. Ties in frequency go to the smaller id. Raises PlantingError if fewer than ``n``
    are eligible.
    """
    vocab = len(tokenizer)
    body = corpus.tokens[:, first_content_position(True):]  # (n_contexts, context_len - 1)
    counts = torch.bincount(body.reshape(-1), minlength=vocab)  # (vocab,)
    rows = torch.arange(body.shape[0]).unsqueeze(1).expand_as(body)  # (n_contexts, len - 1)
    pairs = torch.unique(rows.reshape(-1) * vocab + body.reshape(-1))  # distinct (row, token)
    n_contexts = torch.bincount(pairs % vocab, minlength=vocab)  # (vocab,)
    special = set(tokenizer.all_special_ids)
    # Stable sort of ids by descending count: equal counts stay in ascending id order.
    order = torch.sort(-counts, stable=True).indices
    chosen: list[int] = []
    for t in order.tolist():
        if len(chosen) == n or counts[t] < min_count:  # n_contexts <= counts: none left
            break
        if n_contexts[t] < min_count or t in special or not tokenizer.decode([t]).strip():
            continue
        chosen.append(t)
    if len(chosen) < n:
        raise PlantingError(
            f"only {len(chosen)} tokens occur in >= {min_count} contexts of the corpus "
            f"(n_contexts={corpus.recipe.n_contexts}); {n} wanted: use a larger corpus, "
            f"a smaller n or a smaller min_count"
        )
    return chosen


def _init_(name: str, p: torch.Tensor, spec: PlantedSpec, gen: torch.Generator) -> None:
    """Fill one parameter in place according to the construction's step 1-2."""
    leaf = name.rsplit(".", 1)[-1]
    normal = torch.randn(p.shape, generator=gen, dtype=p.dtype)
    if name.endswith(("ln1.w", "ln2.w", "ln_final.w")):
        p.copy_((1 + spec.ln_noise * normal).clamp_min(0.5))
    elif name.endswith(("ln1.b", "ln2.b", "ln_final.b")):
        p.copy_(spec.ln_noise * normal)
    elif leaf == "W_E":
        p.copy_(normal)
    elif leaf in ("W_Q", "W_K", "W_V", "W_in", "W_U"):
        p.copy_(normal / math.sqrt(spec.d_model))
    elif leaf == "W_out":
        p.copy_(normal * spec.write_scale / math.sqrt(spec.d_mlp))
    else:  # W_pos, W_O and every bias: zero
        p.zero_()


def normalised_embeddings(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """``z_t``: W_E[t] centred (LN only) and divided by its RMS (with the norm's eps):
    (len(tokens), d_model), each row of norm about sqrt(d_model)."""
    x = model.embed.W_E[tokens]  # (n, d_model)
    if model.cfg.normalization_type == "LN":
        x = x - x.mean(-1, keepdim=True)
    return x / (x.pow(2).mean(-1, keepdim=True) + model.cfg.eps).sqrt()


def build_planted(tokenizer: Any, wired_tokens: list[int], spec: PlantedSpec) -> Any:
    """A HookedTransformer (float32, CPU, unprocessed weights) with neuron i of every layer
    wired to ``wired_tokens[i]``; verified over the whole vocabulary (PlantingError)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    if len(wired_tokens) != spec.n_planted or len(set(wired_tokens)) != spec.n_planted:
        raise PlantingError(f"need {spec.n_planted} distinct wired tokens, got {wired_tokens}")
    vocab = len(tokenizer)  # every id the tokenizer can emit, added tokens included
    if not all(0 <= t < vocab for t in wired_tokens):
        raise PlantingError(f"wired tokens outside the vocabulary [0, {vocab})")
    cfg = HookedTransformerConfig(
        n_layers=spec.n_layers, d_model=spec.d_model, d_mlp=spec.d_mlp, n_heads=spec.n_heads,
        d_head=spec.d_model // spec.n_heads, n_ctx=spec.n_ctx, d_vocab=vocab,
        act_fn=spec.act_fn, normalization_type=spec.normalization,
        positional_embedding_type="standard", model_name="planted-tokens",
        init_weights=False,  # every parameter is filled below from our own generator
        dtype=torch.float32, device="cpu",
    )
    model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    gen = torch.Generator().manual_seed(spec.seed)
    wired = torch.tensor(wired_tokens)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            _init_(name, p, spec, gen)
        z = normalised_embeddings(model, wired)  # (n_planted, d_model)
        u = z / z.norm(dim=-1, keepdim=True)  # (n_planted, d_model)
        root_d = math.sqrt(spec.d_model)
        for block in model.blocks:
            w = block.ln2.w  # (d_model,)
            b = block.ln2.b if spec.normalization == "LN" else torch.zeros_like(w)
            block.mlp.W_in[:, : spec.n_planted] = spec.gain * (u / w).T / root_d
            block.mlp.b_in[: spec.n_planted] = (
                -spec.gain * spec.cutoff - spec.gain * (u @ (b / w)) / root_d
            )
    for p in model.parameters():
        p.requires_grad_(False)
    check_planted(model, wiring(wired_tokens))
    return model.eval()


def wiring(wired_tokens: list[int]) -> dict[int, int]:
    """Neuron -> token, the same in every layer."""
    return dict(enumerate(wired_tokens))


@torch.no_grad()
def vocab_activations(
    model: Any, neurons: list[int], kinds: tuple[str, ...] = ("hook_pre", "hook_post"),
    chunk: int = 65536,
) -> dict[str, torch.Tensor]:
    """``blocks.L.mlp.<kind>`` of ``neurons`` for every token of the vocabulary, each token fed
    alone: kind -> (n_layers, d_vocab, len(neurons)). Exact for any context in a planted
    model, whose activations depend on the current token only. (TL's per-forward overhead
    dominates this tiny model, hence the large chunk.)"""
    layers = range(model.cfg.n_layers)
    names = {(k, layer): f"blocks.{layer}.mlp.{k}" for k in kinds for layer in layers}
    vocab = torch.arange(model.cfg.d_vocab, device=model.cfg.device)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in kinds}
    for start in range(0, len(vocab), chunk):
        tokens = vocab[start : start + chunk].unsqueeze(1)  # (chunk, 1)
        _, cache = model.run_with_cache(
            tokens, names_filter=list(names.values()), stop_at_layer=model.cfg.n_layers
        )
        for k in kinds:  # (n_layers, chunk, n)
            parts[k].append(torch.stack([cache[names[k, layer]][:, 0, neurons] for layer in layers]))
    return {k: torch.cat(v, dim=1).float().cpu() for k, v in parts.items()}


def _margins(acts: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(activation on the wired token, that minus the best other token's): (n_layers, n) each."""
    cols = torch.arange(len(tokens))
    on = acts[:, tokens, cols]  # (n_layers, n)
    others = acts.clone()
    others[:, tokens, cols] = -torch.inf
    return on, on - others.amax(dim=1)


def check_planted(model: Any, planted: Mapping[int, int]) -> torch.Tensor:
    """Pre-activation margins (n_layers, len(planted)): each wired neuron's pre-activation on
    its token minus its largest pre-activation on any other token of the vocabulary.

    Raises PlantingError unless, for every layer and wired neuron, the post-activation is
    positive on the wired token and larger there than on any other token (Method 1's argmax),
    and the pre-activation margin is positive.
    """
    neurons = sorted(planted)
    tokens = torch.tensor([planted[n] for n in neurons])
    acts = vocab_activations(model, neurons)
    post_on, post_margin = _margins(acts["hook_post"], tokens)
    _, pre_margin = _margins(acts["hook_pre"], tokens)
    bad = ((post_on <= 0) | (post_margin <= 0) | (pre_margin <= 0)).nonzero().tolist()
    if bad:
        layer, i = bad[0]
        raise PlantingError(
            f"{len(bad)} wired (layer, neuron) pairs do not prefer their token, e.g. layer "
            f"{layer} neuron {neurons[i]} (token {int(tokens[i])}): activation "
            f"{float(post_on[layer, i]):.3f}, post margin {float(post_margin[layer, i]):.3f}, "
            f"pre margin {float(pre_margin[layer, i]):.3f}"
        )
    return pre_margin


def planted_subject(
    tokenizer: Any,
    corpus: Corpus,
    spec: PlantedSpec,
    processing: Mapping[str, bool],
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> tuple[Any, dict[int, int], dict[str, torch.Tensor]]:
    """(model, neuron -> token, unprocessed state): wired tokens chosen from ``corpus``,
    weights processed with TL's ``load_and_process_state_dict(**processing)`` in float32, then
    cast and moved. The unprocessed state (a copy) names the subject in caches."""
    tokens = choose_wired_tokens(corpus, tokenizer, spec.n_planted)
    model = build_planted(tokenizer, tokens, spec)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    unprocessed = {k: v.clone() for k, v in state.items()}
    model.load_and_process_state_dict(state, **processing)
    if dtype != torch.float32:
        model.to(dtype, print_details=False)
    model.to(device, print_details=False)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), wiring(tokens), unprocessed
