"""Hypothesis properties for ``harness.analyses.hookmath`` on random tiny HookedTransformers (claims H1, H4).

Every model is float64 with weights drawn from a seeded ``torch.Generator`` (never the global
RNG). LayerNorm weights are 1 + noise and every bias is non-zero, so a formula that forgot the
LN weight, the LN bias or any bias would fail.

Architecture combinations left out, and why:
- gated MLP + ``solu_ln``: TL accepts the config, but its GatedMLP then drops W_in and b_in
  (``hook_post = ln(act(gate))``); hookmath refuses it (``test_gated_solu_ln_is_refused``).
- RMS + ``solu_ln`` + fold_ln: TL refuses (AssertionError "MLP ln.b not found"; the SoLU norm of
  an RMS model is the weightless LayerNormPre, which the fold code does not expect).
- fold_ln where TL gets the maths wrong (LN + gated MLP; d_mlp == d_model; d_vocab == d_model):
  left out of the invariance property only, and pinned by strict xfails in ``test_tl_fold_ln_bugs``.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import Tensor
from transformer_lens import ActivationCache, HookedTransformer, HookedTransformerConfig

from harness.analyses import hookmath as hm

DTYPE = torch.float64
D_VOCAB = 50
N_CTX = 16
NORMS = ("LN", "LNPre", "RMS", "RMSPre")
ACTS = ("gelu", "gelu_new", "relu", "silu", "solu_ln")

# Same computation, two float64 code paths (fused addmm vs matmul + add): a few ulps on values of
# order 10, so 1e-10 is loose by five orders of magnitude yet far below any real mistake.
SAME_MODEL_ATOL = 1e-10
# TL's process_weights rounds float64 weights to float32 (test_tl_process_weights_keeps_float64),
# so processed-vs-raw comparisons can only be float32-tight: relative 2^-24 per weight, amplified
# by a few layers of matmuls and norms. Observed: at most ~1e-6 relative.
PROCESSED_RTOL = 1e-4
# A forgotten LN weight (w = 1 + 0.5 N(0, 1)) moves hook_pre by O(0.1-1); 1e-3 is a safe floor.
NEGATIVE_CONTROL_MIN_ERROR = 1e-3


@dataclasses.dataclass(frozen=True)
class TinySpec:
    """A tiny decoder-only model, fully determined by these fields."""

    d_head: int
    """Head dimension (even, for rotary)."""
    n_heads: int
    """Attention heads; d_model = n_heads * d_head lies in [8, 32]."""
    n_layers: int
    """1 or 2 blocks."""
    d_mlp: int
    """MLP hidden width."""
    normalization_type: str
    """One of NORMS."""
    act_fn: str
    """One of ACTS."""
    gated_mlp: bool
    """SwiGLU-style gate (tiny_specs never pairs it with solu_ln)."""
    positional_embedding_type: str
    """"standard" (learned W_pos) or "rotary"."""
    weight_seed: int
    """Seed of the torch.Generator that draws every parameter."""
    d_vocab: int = D_VOCAB
    """Vocabulary size; kept above 32 so it never equals d_model (a TL fold bug, see below)."""

    def config(self) -> HookedTransformerConfig:
        """A fresh config each call: fold_ln mutates the config of the model it loads into."""
        return HookedTransformerConfig(
            d_model=self.n_heads * self.d_head,
            d_head=self.d_head,
            n_heads=self.n_heads,
            n_layers=self.n_layers,
            d_mlp=self.d_mlp,
            d_vocab=self.d_vocab,
            n_ctx=N_CTX,
            act_fn=self.act_fn,
            normalization_type=self.normalization_type,
            gated_mlp=self.gated_mlp,
            positional_embedding_type=self.positional_embedding_type,
            dtype=DTYPE,
            device="cpu",
            # Every parameter is drawn below from a seeded generator; TL's own init would
            # consume the global RNG.
            init_weights=False,
        )


@st.composite
def tiny_specs(
    draw: st.DrawFn,
    norms: tuple[str, ...] = NORMS,
    acts: tuple[str, ...] = ACTS,
) -> TinySpec:
    """Random TinySpec over the given normalisation types and activations."""
    d_head = draw(st.sampled_from((4, 8)))
    n_heads = draw(st.integers(max(1, 8 // d_head), min(4, 32 // d_head)))
    act_fn = draw(st.sampled_from(acts))
    gated = False if act_fn == "solu_ln" else draw(st.booleans())
    return TinySpec(
        d_head=d_head,
        n_heads=n_heads,
        n_layers=draw(st.integers(1, 2)),
        d_mlp=draw(st.integers(8, 48)),
        normalization_type=draw(st.sampled_from(norms)),
        act_fn=act_fn,
        gated_mlp=gated,
        positional_embedding_type=draw(st.sampled_from(("standard", "rotary"))),
        weight_seed=draw(st.integers(0, 2**31 - 1)),
    )


def fold_refused(spec: TinySpec) -> bool:
    """TL raises inside load_and_process_state_dict for RMS + solu_ln (see module docstring)."""
    return spec.normalization_type == "RMS" and spec.act_fn == "solu_ln"


def fold_is_buggy(spec: TinySpec) -> bool:
    """Configs where TL's fold_ln changes the model's function (test_tl_fold_ln_bugs)."""
    d_model = spec.n_heads * spec.d_head
    ln_gated = spec.normalization_type == "LN" and spec.gated_mlp
    square = spec.normalization_type in ("LN", "RMS") and d_model in (spec.d_mlp, spec.d_vocab)
    return ln_gated or square


def randomise_(model: HookedTransformer, seed: int) -> None:
    """Overwrite every parameter: LN w ~ 1 + 0.5 N, biases ~ 0.5 N, W ~ N / sqrt(fan_in)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            noise = torch.randn(param.shape, generator=gen, dtype=param.dtype)
            if leaf == "w":
                param.copy_(1.0 + 0.5 * noise)
            elif leaf.startswith("b"):
                param.copy_(0.5 * noise)
            elif leaf in ("W_E", "W_pos"):
                param.copy_(noise)
            else:
                param.copy_(noise / math.sqrt(param.shape[-2]))


def build_raw(spec: TinySpec) -> HookedTransformer:
    """The unprocessed model: LN/RMS weights and biases kept as separate parameters."""
    model = HookedTransformer(spec.config())
    randomise_(model, spec.weight_seed)
    return model.eval()


def build_processed(raw: HookedTransformer, spec: TinySpec) -> HookedTransformer:
    """A copy of ``raw`` through fold_ln + center_writing_weights + center_unembed."""
    processed = HookedTransformer(spec.config())
    # Seeded fill first, so any parameter the loader skipped is deterministic, not torch.empty.
    randomise_(processed, spec.weight_seed + 1)
    processed.load_and_process_state_dict(
        raw.state_dict(), fold_ln=True, center_writing_weights=True, center_unembed=True
    )
    return processed.eval()


def assert_no_hooks(model: HookedTransformer) -> None:
    leaked = [name for name, hp in model.hook_dict.items() if hp.has_hooks()]
    assert not leaked, f"hooks left on model: {leaked}"


def run_cached(
    model: HookedTransformer,
    tokens: Tensor,
    names: list[str] | None = None,
    attention_mask: Tensor | None = None,
) -> tuple[Tensor, ActivationCache]:
    """run_with_cache (which removes its hooks in a ``finally``) plus a check that none leaked."""
    try:
        with torch.no_grad():
            logits, cache = model.run_with_cache(
                tokens, names_filter=names, attention_mask=attention_mask
            )
    finally:
        assert_no_hooks(model)
    return logits, cache  # logits: (batch, pos, d_vocab)


def all_hook_names(model: HookedTransformer) -> list[str]:
    return [n for layer in range(model.cfg.n_layers) for n in hm.hook_names_for_layer(model, layer)]


def random_tokens(seed: int, batch: int, pos: int, d_vocab: int = D_VOCAB) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, d_vocab, (batch, pos), generator=gen)  # (batch, pos)


def assert_close(actual: Tensor, expected: Tensor, what: str, atol: float) -> None:
    errs = hm.max_errors(actual, expected)
    assert errs["max_abs_error"] <= atol, f"{what}: {errs}"  # False for NaN, so NaN fails


# --- H1, H4 and the residual bookkeeping, on raw and processed models -------------------------


@settings(max_examples=40, deadline=None)
@given(spec=tiny_specs(), fold=st.booleans(), token_seed=st.integers(0, 2**31 - 1))
def test_mlp_hooks_match_independent_formulas(spec: TinySpec, fold: bool, token_seed: int) -> None:
    """H1 (pre, pre_linear), H4 (post), mlp_out and resid_mid/resid_post, every layer/pos/neuron."""
    model = build_raw(spec)
    if fold and not fold_refused(spec):  # a refused fold leaves the raw model under test
        model = build_processed(model, spec)
    tokens = random_tokens(token_seed, batch=2, pos=7)  # (batch, pos)
    _, cache = run_cached(model, tokens, all_hook_names(model))
    for layer in range(spec.n_layers):
        mlp = f"blocks.{layer}.mlp"
        checks = {
            f"{mlp}.hook_pre": hm.expected_pre(model, cache, layer),
            f"{mlp}.hook_post": hm.expected_post(model, cache, layer),
            f"blocks.{layer}.hook_mlp_out": hm.expected_mlp_out(model, cache, layer),
            f"blocks.{layer}.hook_resid_mid": hm.expected_resid_mid(cache, layer),
            f"blocks.{layer}.hook_resid_post": hm.expected_resid_post(cache, layer),
        }
        if spec.gated_mlp:
            checks[f"{mlp}.hook_pre_linear"] = hm.expected_pre_linear(model, cache, layer)
        for name, expected in checks.items():
            assert_close(cache[name], expected, name, SAME_MODEL_ATOL)


# --- processing invariance -------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(spec=tiny_specs(), token_seed=st.integers(0, 2**31 - 1))
def test_fold_and_centring_preserve_log_probs_and_hook_pre(spec: TinySpec, token_seed: int) -> None:
    """fold_ln + center_writing_weights + center_unembed: same log-probs and same hook_pre.

    center_unembed shifts each position's logits by a constant, so log_softmax is compared.
    hook_pre is invariant too: centring only removes a direction LN2 discards anyway.
    """
    assume(not fold_refused(spec) and not fold_is_buggy(spec))  # see module docstring
    raw = build_raw(spec)
    processed = build_processed(raw, spec)
    tokens = random_tokens(token_seed, batch=2, pos=9)  # (batch, pos)
    names = [f"blocks.{layer}.mlp.hook_pre" for layer in range(spec.n_layers)]
    raw_logits, raw_cache = run_cached(raw, tokens, names)
    new_logits, new_cache = run_cached(processed, tokens, names)
    pairs = {"log_softmax(logits)": (new_logits.log_softmax(-1), raw_logits.log_softmax(-1))}
    pairs |= {name: (new_cache[name], raw_cache[name]) for name in names}
    for what, (actual, expected) in pairs.items():
        errs = hm.max_errors(actual, expected)
        assert errs["max_rel_error"] <= PROCESSED_RTOL, f"{what}: {errs}"


# --- padding invariance ----------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(
    spec=tiny_specs(),
    short_len=st.integers(1, 8),
    extra=st.integers(1, N_CTX - 8),
    pad_id=st.integers(0, D_VOCAB - 1),
    with_mask=st.booleans(),
    token_seed=st.integers(0, 2**31 - 1),
)
def test_right_padding_does_not_leak_between_rows(
    spec: TinySpec, short_len: int, extra: int, pad_id: int, with_mask: bool, token_seed: int
) -> None:
    """A short row's real positions are the same alone or right-padded beside a longer row."""
    model = build_raw(spec)
    long_len = short_len + extra
    tokens = random_tokens(token_seed, batch=2, pos=long_len)  # (2, long_len)
    tokens[0, short_len:] = pad_id
    mask = None
    if with_mask:
        mask = torch.ones_like(tokens)  # (2, long_len)
        mask[0, short_len:] = 0
    names = [f"blocks.{layer}.mlp.hook_pre" for layer in range(spec.n_layers)]
    alone_logits, alone = run_cached(model, tokens[:1, :short_len], names)
    batch_logits, batched = run_cached(model, tokens, names, attention_mask=mask)
    assert_close(batch_logits[:1, :short_len], alone_logits, "logits", SAME_MODEL_ATOL)
    for name in names:
        assert_close(batched[name][:1, :short_len], alone[name], name, SAME_MODEL_ATOL)


# --- negative controls: the identity checks can fail ----------------------------------------


@settings(max_examples=15, deadline=None)
@given(spec=tiny_specs(norms=("LN", "RMS")), token_seed=st.integers(0, 2**31 - 1))
def test_wrong_mlp_inputs_are_detected(spec: TinySpec, token_seed: int) -> None:
    """Two of the family-H mistakes give a visibly wrong hook_pre (unfolded LN/RMS models).

    1. ln2.hook_normalized as the MLP input: it fires before w (and b) are applied.
    2. hook_resid_pre instead of hook_resid_mid (skipping attention's contribution).
    """
    model = build_raw(spec)
    tokens = random_tokens(token_seed, batch=1, pos=6)  # (1, pos)
    names = all_hook_names(model)
    names += [f"blocks.{layer}.ln2.hook_normalized" for layer in range(spec.n_layers)]
    _, cache = run_cached(model, tokens, names)
    for layer in range(spec.n_layers):
        mlp = model.blocks[layer].mlp
        w_proj = mlp.W_gate if spec.gated_mlp else mlp.W_in
        bias = 0.0 if spec.gated_mlp else mlp.b_in
        actual = cache[f"blocks.{layer}.mlp.hook_pre"]  # (1, pos, d_mlp)
        assert_close(actual, hm.expected_pre(model, cache, layer), "control", SAME_MODEL_ATOL)
        normalized = cache[f"blocks.{layer}.ln2.hook_normalized"]  # (1, pos, d_model)
        without_w = normalized @ w_proj + bias  # (1, pos, d_mlp)
        resid_pre = cache[f"blocks.{layer}.hook_resid_pre"]  # (1, pos, d_model)
        from_resid_pre = hm.norm_input(model, resid_pre, layer) @ w_proj + bias  # (1, pos, d_mlp)
        for what, wrong in (("hook_normalized", without_w), ("resid_pre", from_resid_pre)):
            err = hm.max_errors(actual, wrong)["max_abs_error"]
            assert err > NEGATIVE_CONTROL_MIN_ERROR, f"{what} input not detected: {err}"


def test_gated_solu_ln_is_refused() -> None:
    """TL builds gated + solu_ln, but its GatedMLP then never uses W_in or b_in.

    hook_pre_linear never fires, so hookmath has no formula to match and refuses.
    """
    model = build_raw(TinySpec(4, 2, 1, 8, "LN", "solu_ln", True, "standard", 0))
    _, cache = run_cached(model, random_tokens(0, 1, 3))
    assert "blocks.0.mlp.hook_pre_linear" not in cache
    with pytest.raises(NotImplementedError, match="gated"):
        hm.expected_post(model, cache, 0)


# --- max_errors: known answers and properties -------------------------------------------------


def test_max_errors_known_answer() -> None:
    actual = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    expected = torch.tensor([[1.0, 2.5], [3.0, 4.0]])
    # |diff| = [0, 0.5, 0, 1] -> max 1; max |expected| = 4 -> rel 0.25.
    assert hm.max_errors(actual, expected) == {"max_abs_error": 1.0, "max_rel_error": 0.25}


def test_max_errors_edge_cases() -> None:
    zeros = torch.zeros(3)
    assert hm.max_errors(zeros, zeros) == {"max_abs_error": 0.0, "max_rel_error": 0.0}
    assert hm.max_errors(torch.ones(3), zeros)["max_rel_error"] == math.inf
    with pytest.raises(ValueError, match="shape"):
        hm.max_errors(torch.zeros(3), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="empty"):
        hm.max_errors(torch.zeros(0), torch.zeros(0))


@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(1, 20),
    index=st.integers(0, 19),
    nan_side=st.sampled_from(("actual", "expected")),
    seed=st.integers(0, 2**31 - 1),
)
def test_max_errors_propagates_nan(n: int, index: int, nan_side: str, seed: int) -> None:
    """One NaN anywhere, in either input, makes both errors NaN (never silently dropped)."""
    gen = torch.Generator().manual_seed(seed)
    actual = torch.randn(n, generator=gen, dtype=DTYPE)  # (n,)
    expected = actual.clone()  # (n,)
    (actual if nan_side == "actual" else expected)[index % n] = math.nan
    errs = hm.max_errors(actual, expected)
    assert math.isnan(errs["max_abs_error"]) and math.isnan(errs["max_rel_error"])


# --- activation formulas: known answers -----------------------------------------------------


def test_gelu_new_known_answers() -> None:
    """gelu_new(1) = 0.5 (1 + tanh(sqrt(2/pi) * 1.044715)) = 0.8411919906082768 (hand, float64)."""
    x = torch.tensor([0.0, 1.0, -1.0], dtype=DTYPE)
    got = hm.apply_activation("gelu_new", x)
    want = torch.tensor([0.0, 0.8411919906082768, 0.8411919906082768 - 1.0], dtype=DTYPE)
    assert_close(got, want, "gelu_new", 1e-15)


# --- TL bugs, kept visible: strict xfail flips to a failure once TL fixes them -----------------


FOLD_BUGS = {
    # fold_ln adds ln2.b @ W_in to b_in, but GatedMLP adds b_in after act(gate) * linear, and
    # ln2.b @ W_gate goes to a "b_gate" key the model lacks (load_state_dict(strict=False) drops it).
    "ln-gated-bias": TinySpec(4, 2, 1, 12, "LN", "silu", True, "standard", 0),
    # _fold_mlp_layer_norm guesses the W_in layout from its shape, testing the HF layout
    # (d_mlp, d_model) first: with d_mlp == d_model it scales TL's W_in along the wrong axis.
    "square-W_in": TinySpec(4, 2, 1, 8, "RMS", "gelu", False, "standard", 0),
    # _fold_unembed_layer_norm makes the same guess for W_U when d_vocab == d_model.
    "square-W_U": TinySpec(4, 2, 1, 12, "LN", "gelu", False, "standard", 0, d_vocab=8),
}


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="TL 3.9 fold_ln bugs (see FOLD_BUGS): the folded model computes a different function. "
    "Un-xfail per case when TL folds it correctly.",
)
@pytest.mark.parametrize("spec", FOLD_BUGS.values(), ids=FOLD_BUGS.keys())
def test_tl_fold_ln_bugs(spec: TinySpec) -> None:
    assert fold_is_buggy(spec)
    raw = build_raw(spec)
    processed = build_processed(raw, spec)
    tokens = random_tokens(0, 1, 5, spec.d_vocab)  # (1, pos)
    raw_logits, _ = run_cached(raw, tokens, [])
    new_logits, _ = run_cached(processed, tokens, [])
    errs = hm.max_errors(new_logits.log_softmax(-1), raw_logits.log_softmax(-1))
    assert errs["max_rel_error"] <= PROCESSED_RTOL, errs


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="TL 3.9 precision bug: ProcessWeights.process_weights upcasts every non-float32 "
    "tensor to float32 'for reduced precision', which rounds float64 weights. Un-xfail when "
    "float64 passes through unchanged.",
)
def test_tl_process_weights_keeps_float64() -> None:
    spec = TinySpec(4, 2, 1, 8, "LN", "gelu", False, "standard", 0)
    raw = build_raw(spec)
    copy = HookedTransformer(spec.config())
    copy.load_and_process_state_dict(
        raw.state_dict(),
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
    )
    assert torch.equal(copy.blocks[0].mlp.W_in, raw.blocks[0].mlp.W_in)
