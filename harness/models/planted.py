"""Planted subjects: tiny models whose answer is known because it was wired in.

``planted-tokens`` (family W's positive control): neurons ``0 .. n_planted - 1`` of every MLP
layer are wired to chosen tokens, so that both of the thesis' methods must recover the wired
token, Method 2 (cosine between ``W_E[t]`` and ``W_in[:, n]``) and Method 1 (the token at the
argmax position of the neuron's top max-activating contexts). Some wired neurons are also
TYPE-wired (step 5): they respond to a set of tokens of one token type, so that both methods'
dominant token type is the planted one (W3's positive control). The non-wired neurons stay
random and are the in-model negative control.

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
5. Type wiring (family W's W3 needs a planted token TYPE: with single wired tokens Method 2's
   top 5 is the wired token plus four near-random tokens, ~96 % of this vocabulary is
   ``latin``, so both methods' dominant type matches the re-pairing null). For every token type
   T (:func:`harness.analyses.agreement.token_type` of the normalised token), the first
   ``typed_per_type`` wired neurons whose token has type T (fewer if fewer wired tokens have
   type T) are TYPE-wired: their type set ``S_T`` is their wired tokens followed by
   ``DOMINANT_OF - 1`` fillers, tokens of type T drawn from the rest of the vocabulary
   (non-empty once normalised, not special, not wired) with a generator seeded by
   ``(spec.seed, TYPE_STREAM)``. Each type gets a unit direction ``g_T`` (drawn from the
   weights' generator after every parameter; centred under LayerNorm; Gram-Schmidt makes the
   directions orthonormal), and every t in S_T gets, with ``c_t`` the centred part of W_E[t]
   (W_E[t] itself under RMSNorm), ``h_t`` the unit vector along ``c_t - (c_t . g_T) g_T`` and
   ``rho = type_cosine``::

       W_E[t] <- (W_E[t] - c_t) + |c_t| * (sqrt(rho) * g_T + sqrt(1 - rho) * h_t)

   which keeps |c_t| (hence the norm's scale) and gives, for s != t in S_T,
   ``cos(z_s, z_t) = rho + (1 - rho) * (h_s . h_t)``, i.e. rho +- (1 - rho) / sqrt(d_model)
   (0.9 +- 0.0125 by default), against ~N(0, 1/d_model) for any other pair of tokens. Step 3
   then wires the typed neuron to its (moved) token as before, so on the whole vocabulary its
   pre-activation is ``gain * (1 - cutoff)`` on its token, about ``gain * (rho - cutoff)``
   (1.6 > 0) on the rest of S_T and negative elsewhere: it responds to the set S_T, whose
   tokens all have type T. Hence Method 2's top 5 (cosine, = the layer-0 pre-activation order)
   is its token plus four tokens of S_T, and Method 1's top contexts all peak on its token
   (its argmax over the vocabulary, step 3): both methods' dominant type over their first 5
   is T. The builder checks both over the whole vocabulary (:func:`check_typed`; Method 2 on
   the folded weights TL's processing produces) and raises PlantingError otherwise.
   Untyped wired and random neurons are bit-identical to ``typed_per_type=0`` (the type
   draws come after every parameter's and only rows of W_E in some S_T move). The planted
   types are those of the wired tokens, ``typed_per_type`` neurons each where the corpus
   allows: the 64 most frequent tokens of the default corpus (seed 0) are latin, symbol and
   numeric only, so 5 + 5 + 5 typed neurons (neither non_latin nor other tokens occur in 40
   contexts of it beside them: Method 1 could not see them). Method 1's guarantee needs the
   typed token in DOMINANT_OF contexts of the corpus it runs on (the wired tokens are in >= 40
   of the corpus they were chosen from).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from harness.activations.capture import first_content_position
from harness.analyses.agreement import DOMINANT_OF, TOKEN_TYPES, Vocabulary, dominant_type
from harness.analyses.geometry import score_topk
from harness.data.corpus import Corpus

ACT_FNS = ("gelu", "gelu_new", "relu")
"""Activation functions monotone on the positives (the wired token's pre-activation)."""
NORMALIZATIONS = ("LN", "RMS")
TYPE_STREAM = 0x7E9ED
"""Second word of the seed of the generator that draws the type sets' fillers (step 5)."""


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
    typed_per_type: int = 5
    """Type wiring (step 5), family W3's positive control: for each token type, the first
    ``typed_per_type`` wired neurons whose token has that type (all of them if fewer) are also
    TYPE-wired, responding to a set of tokens of that type. 0 turns type wiring off (the
    weights are then those of the single-token construction alone)."""
    type_cosine: float = 0.9
    """Cosine between the normalised embeddings of two tokens of one type set (step 5's rho):
    above ``cutoff``, so a typed neuron responds to its whole set, and below 1, so its own
    token stays its argmax."""

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
        if self.typed_per_type < 0:
            raise ValueError(f"typed_per_type must be >= 0, got {self.typed_per_type}")
        if not self.cutoff < self.type_cosine < 1:
            raise ValueError(
                f"need cutoff={self.cutoff} < type_cosine < 1, got type_cosine={self.type_cosine}"
            )


@dataclass(frozen=True)
class TypeWiring:
    """Which wired neurons are type-wired, and to which token set (step 5). Read-only."""

    neuron_types: dict[int, str]
    """Type-wired neuron -> its planted type (a TOKEN_TYPES name), the same in every layer."""
    members: dict[str, tuple[int, ...]]
    """Planted type T -> S_T: the typed neurons' wired tokens (in neuron order), then the
    fillers."""

    def to_dict(self) -> dict:
        return {"neuron_types": {str(n): t for n, t in self.neuron_types.items()},
                "members": {t: list(ids) for t, ids in self.members.items()}}


def plan_types(vocab: Vocabulary, special: Sequence[int], wired_tokens: list[int],
               spec: PlantedSpec) -> TypeWiring:
    """Step 5's choice of typed neurons and type sets, from the vocabulary's token types.

    Neuron i (wired to ``wired_tokens[i]``) is typed when fewer than ``spec.typed_per_type``
    earlier wired neurons have its token's type. Each planted type's fillers are
    ``DOMINANT_OF - 1`` tokens of that type, drawn uniformly without replacement from the
    vocabulary's tokens of that type that are non-empty once normalised, not special and not
    wired. Raises PlantingError when a type has too few such tokens.
    """
    neuron_types: dict[int, str] = {}
    count = dict.fromkeys(TOKEN_TYPES, 0)
    for n, t in enumerate(wired_tokens):
        kind = TOKEN_TYPES[int(vocab.types[t])]
        if count[kind] < spec.typed_per_type:
            neuron_types[n] = kind
            count[kind] += 1
    rng = np.random.default_rng([spec.seed, TYPE_STREAM])
    excluded = set(wired_tokens) | set(special)
    members: dict[str, tuple[int, ...]] = {}
    for kind in TOKEN_TYPES:
        anchors = [wired_tokens[n] for n, k in neuron_types.items() if k == kind]
        if not anchors:
            continue
        code = TOKEN_TYPES.index(kind)
        pool = [i for i in np.flatnonzero(vocab.types == code).tolist()
                if vocab.strings[i] and i not in excluded]
        if len(pool) < DOMINANT_OF - 1:
            raise PlantingError(
                f"only {len(pool)} unwired {kind} tokens in the vocabulary; a type set needs "
                f"{DOMINANT_OF - 1} fillers"
            )
        fillers = rng.choice(len(pool), size=DOMINANT_OF - 1, replace=False)
        members[kind] = tuple(anchors) + tuple(pool[i] for i in fillers.tolist())
    return TypeWiring(neuron_types, members)


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


def _plant_types(model: Any, typed: TypeWiring, rho: float, gen: torch.Generator) -> None:
    """Step 5's move of the type sets' embedding rows, in place (one direction per type, drawn
    from ``gen`` in the order of ``typed.members``)."""
    W_E = model.embed.W_E  # (d_vocab, d_model)
    d_model = W_E.shape[1]
    centred = model.cfg.normalization_type == "LN"
    # Gram-Schmidt against the directions so far (and, under LayerNorm, the all-ones vector,
    # which the norm removes)
    basis = [torch.full((d_model,), 1 / math.sqrt(d_model))] if centred else []
    for ids in typed.members.values():
        g = torch.randn(d_model, generator=gen, dtype=W_E.dtype)  # (d_model,)
        for b in basis:
            g = g - (g @ b) * b
        g = g / g.norm()
        basis.append(g)
        rows = torch.tensor(ids)
        x = W_E[rows]  # (|S_T|, d_model)
        mean = x.mean(-1, keepdim=True) if centred else torch.zeros_like(x[:, :1])  # (|S_T|, 1)
        c = x - mean
        h = c - (c @ g).unsqueeze(-1) * g
        h = h / h.norm(dim=-1, keepdim=True)
        W_E[rows] = mean + c.norm(dim=-1, keepdim=True) * (math.sqrt(rho) * g + math.sqrt(1 - rho) * h)


def build_planted(tokenizer: Any, wired_tokens: list[int], spec: PlantedSpec,
                  typed: TypeWiring | None = None, vocab_strings: Vocabulary | None = None) -> Any:
    """A HookedTransformer (float32, CPU, unprocessed weights) with neuron i of every layer
    wired to ``wired_tokens[i]`` and the neurons of ``typed`` (default: :func:`plan_types`)
    type-wired; verified over the whole vocabulary (PlantingError). ``vocab_strings``: the
    tokenizer's :class:`Vocabulary`, if the caller has it (decoding it takes ~0.7 s)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    if len(wired_tokens) != spec.n_planted or len(set(wired_tokens)) != spec.n_planted:
        raise PlantingError(f"need {spec.n_planted} distinct wired tokens, got {wired_tokens}")
    vocab = len(tokenizer)  # every id the tokenizer can emit, added tokens included
    if not all(0 <= t < vocab for t in wired_tokens):
        raise PlantingError(f"wired tokens outside the vocabulary [0, {vocab})")
    if vocab_strings is None and (spec.typed_per_type or (typed is not None and typed.neuron_types)):
        vocab_strings = Vocabulary.from_tokenizer(tokenizer, vocab)
    if typed is None:
        typed = (plan_types(vocab_strings, tokenizer.all_special_ids, wired_tokens, spec)
                 if spec.typed_per_type else TypeWiring({}, {}))
    for n, kind in typed.neuron_types.items():
        if not 0 <= n < spec.n_planted or wired_tokens[n] not in typed.members.get(kind, ()):
            raise PlantingError(f"typed neuron {n} ({kind}) is not a wired neuron whose token is in S_{kind}")
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
        if typed.members:  # step 5, before step 3 reads the (moved) embeddings
            _plant_types(model, typed, spec.type_cosine, gen)
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
    acts = vocab_activations(model, list(range(spec.n_planted)))  # column = neuron
    check_planted(model, wiring(wired_tokens), acts)
    if typed.neuron_types:
        check_typed(model, typed, vocab_strings, acts)
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


def check_planted(
    model: Any, planted: Mapping[int, int], acts: Mapping[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """Pre-activation margins (n_layers, len(planted)): each wired neuron's pre-activation on
    its token minus its largest pre-activation on any other token of the vocabulary.
    ``acts``: :func:`vocab_activations` of neurons ``0 .. m - 1`` (m > every neuron of
    ``planted``) if the caller has them, else computed.

    Raises PlantingError unless, for every layer and wired neuron, the post-activation is
    positive on the wired token and larger there than on any other token (Method 1's argmax),
    and the pre-activation margin is positive.
    """
    neurons = sorted(planted)
    tokens = torch.tensor([planted[n] for n in neurons])
    acts = _columns(model, neurons, acts)
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


@torch.no_grad()
def method2_tokens(model: Any, neurons: list[int], k: int = DOMINANT_OF) -> torch.Tensor:
    """Method 2 (tl_cosine: cosine between W_E rows and ``W_in[:, n]``) of ``neurons``, token
    ids (n_layers, k, len(neurons)). On an unprocessed model (LN or RMS), computed as TL's
    default processing would give it: centred W_E rows against the centred ``ln2.w * W_in[:, n]``
    (no centring under RMSNorm); on a processed one, on its weights as they are."""
    norm = model.cfg.normalization_type
    W_E = model.embed.W_E.detach().float()  # (d_vocab, d_model)
    if norm == "LN":
        W_E = W_E - W_E.mean(-1, keepdim=True)
    out = []
    for block in model.blocks:
        W = block.mlp.W_in[:, neurons].float()  # (d_model, n)
        if norm in NORMALIZATIONS:
            W = block.ln2.w.float().unsqueeze(1) * W
        if norm == "LN":
            W = W - W.mean(0, keepdim=True)
        out.append(score_topk(W_E, W, k, cosine=True).context)  # (k, n)
    return torch.stack(out)


def _columns(
    model: Any, neurons: list[int], acts: Mapping[str, torch.Tensor] | None
) -> Mapping[str, torch.Tensor]:
    """:func:`vocab_activations` of ``neurons``: computed, or the columns of ``acts`` (whose
    column j is neuron j)."""
    if acts is None:
        return vocab_activations(model, neurons)
    return {k: v[:, :, neurons] for k, v in acts.items()}


def check_typed(model: Any, typed: TypeWiring, vocab_strings: Vocabulary,
                acts: Mapping[str, torch.Tensor] | None = None) -> None:
    """Step 5 over the whole vocabulary, for every layer and type-wired neuron n of type T.

    Raises PlantingError unless (a) n's ``|S_T|`` largest pre-activations are on exactly the
    tokens of S_T, all positive (it responds to the set and to nothing else); (b) the dominant
    type (:func:`harness.analyses.agreement.dominant_type`) of its DOMINANT_OF most activating
    tokens (``hook_post``) is T: with :func:`check_planted`'s argmax, Method 1's first contexts
    peak on n's token, of type T, in any corpus holding it in DOMINANT_OF contexts; (c) the
    dominant type of its Method-2 top DOMINANT_OF (:func:`method2_tokens`) is T.
    ``acts`` as in :func:`check_planted`.
    """
    neurons = sorted(typed.neuron_types)
    acts = _columns(model, neurons, acts)
    method2 = method2_tokens(model, neurons)  # (n_layers, DOMINANT_OF, n)
    strings = vocab_strings.strings
    for layer in range(model.cfg.n_layers):
        for i, n in enumerate(neurons):
            kind = typed.neuron_types[n]
            members = typed.members[kind]
            pre = acts["hook_pre"][layer, :, i]  # (d_vocab,)
            top = torch.topk(pre, len(members))
            post_top = torch.topk(acts["hook_post"][layer, :, i], DOMINANT_OF).indices.tolist()
            m2 = method2[layer, :, i].tolist()
            problems = [
                what for what, bad in (
                    ("its top pre-activations are not its type set", set(top.indices.tolist()) != set(members)),
                    ("it does not respond to its whole type set", bool((top.values <= 0).any())),
                    ("Method 1's dominant type differs", dominant_type([strings[t] for t in post_top]) != kind),
                    ("Method 2's dominant type differs", dominant_type([strings[t] for t in m2]) != kind),
                ) if bad
            ]
            if problems:
                raise PlantingError(
                    f"layer {layer} neuron {n} (type {kind}, set {list(members)}): "
                    f"{'; '.join(problems)} (Method-1 top {post_top}, Method-2 top {m2})"
                )


def planted_subject(
    tokenizer: Any,
    corpus: Corpus,
    spec: PlantedSpec,
    processing: Mapping[str, bool],
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> tuple[Any, dict[int, int], TypeWiring, dict[str, torch.Tensor]]:
    """(model, neuron -> token, type wiring, unprocessed state): wired tokens chosen from
    ``corpus``, weights processed with TL's ``load_and_process_state_dict(**processing)`` in
    float32, then cast and moved. The unprocessed state (a copy) names the subject in caches."""
    tokens = choose_wired_tokens(corpus, tokenizer, spec.n_planted)
    typed, vocab_strings = TypeWiring({}, {}), None
    if spec.typed_per_type:
        vocab_strings = Vocabulary.from_tokenizer(tokenizer, len(tokenizer))
        typed = plan_types(vocab_strings, tokenizer.all_special_ids, tokens, spec)
    model = build_planted(tokenizer, tokens, spec, typed, vocab_strings)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    unprocessed = {k: v.clone() for k, v in state.items()}
    model.load_and_process_state_dict(state, **processing)
    if dtype != torch.float32:
        model.to(dtype, print_details=False)
    model.to(device, print_details=False)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), wiring(tokens), typed, unprocessed
