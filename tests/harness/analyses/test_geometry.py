"""Method-2 weight geometry (harness/analyses/geometry.py): streaming top-k against a full-sort reference,
known answers, invariances, the zero-norm policy, and the TransformerLens definitions."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.activations.topk import StreamingTopK, TopKResult, TopKSpec
from harness.analyses.geometry import (
    GeometryDefinition,
    definitions_for,
    method2_topk,
    score_topk,
    score_topk_reference,
)


def _ints(draw, shape: tuple[int, ...], lo: int = -3, hi: int = 3) -> torch.Tensor:
    """Small-integer float32 tensor: every dot product is exact and ties are everywhere."""
    n = math.prod(shape)
    vals = draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n))
    return torch.tensor(vals, dtype=torch.float32).reshape(shape)


@st.composite
def problems(draw):
    """(W_E, W, scale, k, chunk) with d_vocab up to 40 and chunk not dividing it."""
    d_vocab, d_model, n_units = (
        draw(st.integers(1, 40)),
        draw(st.integers(1, 5)),
        draw(st.integers(1, 5)),
    )
    W_E = _ints(draw, (d_vocab, d_model))
    W = _ints(draw, (d_model, n_units))
    scale = _ints(draw, (d_model,), -2, 2) if draw(st.booleans()) else None
    return W_E, W, scale, draw(st.integers(1, 8)), draw(st.integers(1, d_vocab + 3))


def _assert_same(a: TopKResult, b: TopKResult) -> None:
    assert a.n_seen == b.n_seen
    assert torch.equal(a.context, b.context)
    assert torch.equal(a.position, b.position)
    assert torch.equal(a.values, b.values)  # exact here: == treats -0.0 as 0.0


def _full_scores(W_E, W, scale, cosine: bool) -> torch.Tensor:
    """Scores (d_vocab, n_units) spelled out as in the module docstring."""
    x = W_E if scale is None else W_E * scale
    s = x @ W
    return s / x.norm(dim=1, keepdim=True) / W.norm(dim=0) if cosine else s


@settings(max_examples=100, deadline=None)
@given(problems(), st.booleans())
def test_streaming_equals_reference_exactly(problem, cosine: bool) -> None:
    W_E, W, scale, k, chunk = problem
    got = score_topk(W_E, W, k, cosine=cosine, scale=scale, chunk=chunk)
    _assert_same(got, score_topk_reference(W_E, W, k, cosine=cosine, scale=scale))
    assert not torch.isnan(got.values).any()
    assert got.values.shape == got.context.shape == (k, W.shape[1])


@settings(max_examples=40, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.integers(100, 600),
    st.integers(64, 600),
    st.integers(1, 8),
    st.sampled_from(["random", "ascending", "descending"]),
    st.booleans(),
)
def test_streaming_equals_reference_multi_block_chunks(
    seed: int, d_vocab: int, chunk: int, k: int, order: str, cosine: bool
) -> None:
    """Chunks of several 64-token blocks (each chunk sets its own threshold from block maxima),
    values in -2..2 so that ties straddle every threshold, tokens optionally sorted by score."""
    gen = torch.Generator().manual_seed(seed)
    W_E = torch.randint(-2, 3, (d_vocab, 4), generator=gen).float()  # (d_vocab, d_model)
    W = torch.randint(-2, 3, (4, 6), generator=gen).float()  # (d_model, n_units)
    if order != "random":
        W_E = W_E[torch.argsort(W_E @ W[:, 0], descending=order == "descending", stable=True)]
    got = score_topk(W_E, W, k, cosine=cosine, chunk=chunk)
    _assert_same(got, score_topk_reference(W_E, W, k, cosine=cosine))


@settings(max_examples=60, deadline=None)
@given(problems(), st.booleans())
def test_streaming_equals_streaming_topk(problem, cosine: bool) -> None:
    """Same answer as harness.activations.topk.StreamingTopK fed the whole score matrix (context = token id,
    position = 0, zero-norm tokens masked out); dead neurons have no StreamingTopK analogue."""
    W_E, W, scale, k, chunk = problem
    x = W_E if scale is None else W_E * scale
    if cosine and bool((W.norm(dim=0) == 0).any()):
        return
    keep = x.norm(dim=1) > 0 if cosine else torch.ones(W_E.shape[0], dtype=torch.bool)
    s = torch.where(keep[:, None], _full_scores(W_E, W, scale, cosine), 0.0)
    topk = StreamingTopK(TopKSpec(k, W.shape[1]))
    ids = torch.arange(W_E.shape[0])
    topk.update(s, ids, torch.zeros_like(ids), mask=keep)
    _assert_same(score_topk(W_E, W, k, cosine=cosine, scale=scale, chunk=chunk), topk.result())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cosine", [True, False], ids=["cosine", "dot"])
def test_random_floats_match_reference(dtype: torch.dtype, cosine: bool) -> None:
    """Gaussian weights: ids equal, values close; half inputs are scored in float32. Chunks of
    1500 hold >= k blocks of _BLOCK = 64 tokens, so each chunk sets its own threshold."""
    gen = torch.Generator().manual_seed(3)
    W_E = torch.randn(4999, 24, generator=gen).to(dtype)  # (d_vocab, d_model), 4999 prime
    W = torch.randn(24, 31, generator=gen).to(dtype)
    scale = torch.rand(24, generator=gen).to(dtype) + 0.5
    got = score_topk(W_E, W, 20, cosine=cosine, scale=scale, chunk=1500)
    ref = score_topk_reference(W_E.float(), W.float(), 20, cosine=cosine, scale=scale.float())
    assert got.values.dtype == torch.float32
    assert torch.equal(got.context, ref.context)
    torch.testing.assert_close(got.values, ref.values, rtol=1e-5, atol=1e-5)
    want = _full_scores(W_E.double(), W.double(), scale.double(), cosine)  # float64 spelled out
    torch.testing.assert_close(
        got.values.double(), want.gather(0, got.context), rtol=1e-5, atol=1e-5
    )


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 50), st.integers(1, 8))
def test_cosine_is_in_unit_interval(seed: int, d_vocab: int, d_model: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    W_E = torch.randn(d_vocab, d_model, generator=gen) * 10.0 ** torch.randint(
        -3, 4, (d_vocab, 1), generator=gen
    )
    W = torch.randn(d_model, 7, generator=gen)
    got = score_topk(W_E, W, 5, cosine=True, scale=torch.randn(d_model, generator=gen), chunk=7)
    filled = got.context >= 0
    assert bool((got.values[filled].abs() <= 1 + 1e-6).all())


@settings(max_examples=60, deadline=None)
@given(problems(), st.sampled_from([0.25, 2.0, 8.0]))
def test_cosine_ranking_ignores_positive_column_scale(problem, factor: float) -> None:
    """cos(x, c w) = cos(x, w) for c > 0; powers of two keep the arithmetic exact."""
    W_E, W, scale, k, chunk = problem
    base = score_topk(W_E, W, k, cosine=True, scale=scale, chunk=chunk)
    W2 = W.clone()
    W2[:, 0] *= factor
    _assert_same(score_topk(W_E, W2, k, cosine=True, scale=scale, chunk=chunk), base)
    # and the whole scaled row: x -> c x for every token leaves every cosine unchanged
    _assert_same(score_topk(W_E * factor, W, k, cosine=True, scale=scale, chunk=chunk), base)


def test_cosine_ranking_ignores_any_positive_column_scale() -> None:
    """Gaussian weights, factors that are not powers of two: same tokens, values to rounding."""
    gen = torch.Generator().manual_seed(5)
    W_E, W = torch.randn(3001, 16, generator=gen), torch.randn(16, 9, generator=gen)
    base = score_topk(W_E, W, 10, cosine=True, chunk=1000)
    factors = torch.tensor([3.7, 0.013, 1.0, 250.0, 0.5, 1.1, 9.9, 0.2, 7.0])
    got = score_topk(W_E, W * factors, 10, cosine=True, chunk=1000)
    assert torch.equal(got.context, base.context)
    torch.testing.assert_close(got.values, base.values, rtol=1e-6, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(problems(), st.sampled_from([0.25, 2.0, 8.0]))
def test_dot_product_scales_linearly(problem, factor: float) -> None:
    """score(c w) = c score(w) and score with c s = c score with s, same ranking (c > 0)."""
    W_E, W, scale, k, chunk = problem
    base = score_topk(W_E, W, k, cosine=False, scale=scale, chunk=chunk)
    for got in (
        score_topk(W_E, W * factor, k, cosine=False, scale=scale, chunk=chunk),
        score_topk(
            W_E,
            W,
            k,
            cosine=False,
            scale=(1 if scale is None else scale) * torch.full((W.shape[0],), factor),
            chunk=chunk,
        ),
    ):
        assert torch.equal(got.context, base.context)
        assert torch.equal(got.values, base.values * factor)


def test_known_answer_dot_with_scale() -> None:
    """Hand-computed: rows (1,0), (0,1), (1,1), (0,0); w = (1,2); s = (3,1) -> 3, 2, 5, 0."""
    W_E = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    got = score_topk(
        W_E, torch.tensor([[1.0], [2.0]]), 4, cosine=False, scale=torch.tensor([3.0, 1.0])
    )
    assert got.context[:, 0].tolist() == [2, 0, 1, 3]
    assert got.values[:, 0].tolist() == [5.0, 3.0, 2.0, 0.0]
    assert got.n_seen == 4


def test_known_answer_planted_columns() -> None:
    """W[:, n] = W_E[t_n] (times a positive factor): top-1 is t_n with cosine 1."""
    gen = torch.Generator().manual_seed(0)
    W_E = torch.randn(60, 16, generator=gen)  # (d_vocab, d_model)
    planted = torch.tensor([5, 59, 0, 31, 5])
    W = W_E[planted].T * torch.tensor([1.0, 0.5, 3.0, 7.0, 2.0])  # (d_model, n_units)
    got = score_topk(W_E, W, 3, cosine=True, chunk=7)
    assert torch.equal(got.context[0], planted)
    torch.testing.assert_close(got.values[0], torch.ones(5), rtol=0, atol=1e-6)


def test_known_answer_ties_go_to_smaller_token_id() -> None:
    """Tokens 1, 3, 4 have equal rows: they rank 1, 3, 4 whatever the chunking."""
    W_E = torch.tensor([[0.0, 1.0], [2.0, 0.0], [1.0, 0.0], [2.0, 0.0], [2.0, 0.0]])
    W = torch.tensor([[1.0], [0.0]])
    for chunk in (1, 2, 3, 5):
        got = score_topk(W_E, W, 4, cosine=False, chunk=chunk)
        assert got.context[:, 0].tolist() == [1, 3, 4, 2]


def test_zero_norm_policy() -> None:
    """Cosine: zero rows are never ranked, a zero column gets no tokens; dot ranks everything."""
    W_E = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, -1.0]])
    W = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # unit 1 is dead
    got = score_topk(W_E, W, 3, cosine=True, chunk=3)
    assert got.n_seen == 2
    assert got.context[:, 0].tolist() == [1, 3, -1]
    assert got.values[:, 0].tolist() == [1.0, 0.0, -math.inf]
    assert got.context[:, 1].tolist() == [-1, -1, -1]
    assert got.position[:, 1].tolist() == [-1, -1, -1]
    assert not torch.isnan(got.values).any()
    dot = score_topk(W_E, W, 4, cosine=False)
    assert dot.n_seen == 4 and dot.context[:, 1].tolist() == [0, 1, 2, 3]  # all score 0: by id
    none = score_topk(torch.zeros(5, 2), W, 2, cosine=True, chunk=2)
    assert none.n_seen == 0 and bool((none.context == -1).all())


def test_k_larger_than_vocabulary_pads_unfilled_slots() -> None:
    got = score_topk(torch.eye(3), torch.ones(3, 2), 5, cosine=True, chunk=2)
    assert got.context[:, 0].tolist() == [0, 1, 2, -1, -1]
    assert got.values[3:].eq(-math.inf).all()


@pytest.mark.parametrize(
    "W_E, W, scale, chunk, match",
    [
        (torch.ones(3, 2), torch.ones(3, 2), None, 4, "W_E"),
        (torch.ones(3, 2), torch.ones(2, 2), torch.ones(3), 4, "scale"),
        (torch.ones(3, 2), torch.ones(2, 2), None, 0, "chunk"),
        (torch.tensor([[1.0, math.nan]]), torch.ones(2, 2), None, 4, "NaN"),
        (torch.ones(3, 2), torch.tensor([[math.inf], [1.0]]), None, 4, "infinite"),
    ],
)
def test_bad_inputs_raise(W_E, W, scale, chunk, match) -> None:
    with pytest.raises(ValueError, match=match):
        score_topk(W_E, W, 2, cosine=True, scale=scale, chunk=chunk)


# ---- TransformerLens models ---------------------------------------------------------------


def _tiny(gated: bool, norm: str | None, seed: int = 0):
    """A 2-layer random HookedTransformer (d_vocab 60), ln2.w perturbed away from 1. The global
    RNG is forked so construction leaves no trace."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=16,
        n_ctx=8,
        d_head=4,
        n_heads=4,
        d_mlp=12,
        d_vocab=60,
        act_fn="silu" if gated else "gelu",
        normalization_type=norm,
        gated_mlp=gated,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = HookedTransformer(cfg).eval()
        if norm in ("LN", "RMS"):
            with torch.no_grad():
                for block in model.blocks:
                    block.ln2.w.copy_(torch.rand(16) + 0.5)
    return model


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("norm", ["LN", "RMS"])
def test_definitions_for(gated: bool, norm: str) -> None:
    labels = [d.label for d in definitions_for(_tiny(gated, norm))]
    branches = ["gate", "linear"] if gated else ["in"]
    assert labels == [f"{n}/{b}" for n in ("tl_cosine", "viewer") for b in branches]


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("norm", ["LN", "RMS"])
def test_viewer_is_raw_dot_with_ln2_weight(gated: bool, norm: str) -> None:
    model = _tiny(gated, norm)
    for definition in (d for d in definitions_for(model) if d.name == "viewer"):
        mlp = model.blocks[1].mlp
        W = mlp.W_gate if definition.branch == "gate" else mlp.W_in
        got = method2_topk(model, 1, definition, k=7, chunk=16)
        want = score_topk_reference(
            model.W_E.detach(), W.detach(), 7, cosine=False, scale=model.blocks[1].ln2.w.detach()
        )
        assert torch.equal(got.context, want.context)
        torch.testing.assert_close(got.values, want.values)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("norm", ["LN", "RMS"])
def test_tl_cosine_on_processed_model(gated: bool, norm: str) -> None:
    """tl_cosine on the processed model = cosine of the raw weights after what processing does:
    W -> diag(ln2.w) W; for LN also W_E and W_in (not W_gate: TL 3.9 leaves it uncentred, which
    changes gate cosines but not their ranking, as centred W_E rows are orthogonal to the mean)
    centred over d_model."""
    raw = _tiny(gated, norm)
    processed = copy.deepcopy(raw)
    processed.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
    assert processed.cfg.normalization_type == norm + "Pre"
    W_E = raw.W_E.detach()
    for definition in (d for d in definitions_for(processed) if d.cosine):
        mlp = raw.blocks[0].mlp
        W = (mlp.W_gate if definition.branch == "gate" else mlp.W_in).detach()
        W = raw.blocks[0].ln2.w.detach()[:, None] * W  # (d_model, d_mlp)
        E = W_E
        if norm == "LN":
            E = W_E - W_E.mean(1, keepdim=True)
            W = W if definition.branch == "gate" else W - W.mean(0)
        got = method2_topk(processed, 0, definition, k=5, chunk=13)
        want = score_topk_reference(E, W, 5, cosine=True)
        assert torch.equal(got.context, want.context)
        torch.testing.assert_close(got.values, want.values, rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match="processed"):
            method2_topk(raw, 0, definition)


@pytest.mark.parametrize("norm", ["LNPre", "RMSPre"])
def test_viewer_refuses_folded_model(norm: str) -> None:
    model = _tiny(False, norm)
    with pytest.raises(ValueError, match="UNPROCESSED"):
        method2_topk(model, 0, GeometryDefinition("viewer", "in"))


def test_no_normalisation_model_uses_plain_dot_and_cosine() -> None:
    model = _tiny(False, None)
    W_E, W = model.W_E.detach(), model.blocks[0].mlp.W_in.detach()
    for definition in definitions_for(model):
        got = method2_topk(model, 0, definition, k=4)
        assert torch.equal(
            got.context, score_topk_reference(W_E, W, 4, cosine=definition.cosine).context
        )


def test_method2_validates_layer_and_branch() -> None:
    model = _tiny(False, "LNPre")
    for layer in (-1, 2):
        with pytest.raises(ValueError, match=r"layer .* out of range: the model has layers 0\.\.1"):
            method2_topk(model, layer, GeometryDefinition("tl_cosine", "in"))
    with pytest.raises(ValueError, match="does not apply"):
        method2_topk(model, 0, GeometryDefinition("tl_cosine", "gate"))
    with pytest.raises(ValueError, match="unknown geometry"):
        GeometryDefinition("cosine", "in")  # type: ignore[arg-type]


@pytest.mark.parametrize("chunk", [64, 320])
@pytest.mark.parametrize("order", ["random", "ascending", "descending"])
def test_larger_problem_every_path(order: str, chunk: int) -> None:
    """3000 tokens: chunks of one block (threshold from earlier chunks only) or of 5 blocks (a
    threshold per chunk), buffer compaction, and tokens sorted by score so that every chunk
    beats the running threshold ("ascending"). Integer weights keep ties exact."""
    gen = torch.Generator().manual_seed(7)
    W_E = torch.randint(-4, 5, (3000, 6), generator=gen).float()  # (d_vocab, d_model)
    W = torch.randint(-4, 5, (6, 50), generator=gen).float()  # (d_model, n_units)
    if order != "random":  # one direction for all units, then tokens sorted along it
        W = W[:, :1] * torch.arange(1, 51).float()  # positive multiples of one column
        W_E = W_E[torch.argsort(W_E @ W[:, 0], descending=order == "descending", stable=True)]
    for cosine in (True, False):
        got = score_topk(W_E, W, 5, cosine=cosine, chunk=chunk)
        _assert_same(got, score_topk_reference(W_E, W, 5, cosine=cosine))


def test_cached_method2_equals_fresh_and_is_not_recomputed(tmp_path, monkeypatch) -> None:
    from types import SimpleNamespace

    from harness.activations.cache import ContentCache
    from harness.analyses import geometry

    model = _tiny(True, "RMS")
    loaded = SimpleNamespace(model=model, weight_hash="tiny-gated-rms")
    definition = next(d for d in definitions_for(model) if d.name == "viewer")
    cache = ContentCache(tmp_path)
    first = geometry.cached_method2_topk(cache, loaded, 1, definition, k=5)
    _assert_same(first, method2_topk(model, 1, definition, k=5))
    monkeypatch.setattr(geometry, "method2_topk", lambda *a, **k: pytest.fail("recomputed"))
    _assert_same(geometry.cached_method2_topk(cache, loaded, 1, definition, k=5), first)
    other = SimpleNamespace(model=model, weight_hash="another identity")
    with pytest.raises(pytest.fail.Exception, match="recomputed"):  # the key names the weights
        geometry.cached_method2_topk(cache, other, 1, definition, k=5)
