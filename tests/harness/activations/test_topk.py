"""Streaming top-k and activation statistics (harness/activations/topk.py) against plain references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.activations.topk import (
    ActivationStats,
    ContextTopK,
    QuantileBins,
    StreamingTopK,
    TopKResult,
    TopKSpec,
    brute_force_topk,
)

# Few distinct values (including -0.0 and +0.0) so ties are everywhere.
TIE_VALUES = [-2.0, -0.5, -0.0, 0.0, 0.5, 1.0, 3.0]


def _stream(
    acts: torch.Tensor,
    ctx: torch.Tensor,
    pos: torch.Tensor,
    k: int,
    cuts: list[int],
    mask: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> TopKResult:
    """Feed rows [cuts[i], cuts[i+1]) as successive chunks."""
    topk = StreamingTopK(TopKSpec(k, acts.shape[1]), dtype=dtype)
    bounds = [0, *cuts, acts.shape[0]]
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        topk.update(acts[lo:hi], ctx[lo:hi], pos[lo:hi], None if mask is None else mask[lo:hi])
    return topk.result()


def _assert_same(a: TopKResult, b: TopKResult) -> None:
    assert a.n_seen == b.n_seen
    assert a.values.dtype == b.values.dtype
    # Bitwise: -0.0 and 0.0 may differ in sign bit between equal-ranked values, so compare values
    # with ==, and identity via (context, position).
    assert torch.equal(a.values, b.values)
    assert torch.equal(a.context, b.context)
    assert torch.equal(a.position, b.position)


def _python_topk(acts: torch.Tensor, ctx: torch.Tensor, pos: torch.Tensor, k: int, u: int):
    """The tie rule spelled out with sorted(): (value desc, context asc, position asc)."""
    rows = sorted(
        range(acts.shape[0]), key=lambda t: (-float(acts[t, u]), int(ctx[t]), int(pos[t]))
    )
    return [(float(acts[t, u]), int(ctx[t]), int(pos[t])) for t in rows[:k]]


# --- spec and validation ----------------------------------------------------------------


@pytest.mark.parametrize(("k", "n_units"), [(0, 3), (3, 0), (-1, 1)])
def test_spec_rejects_non_positive_sizes(k: int, n_units: int) -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        TopKSpec(k, n_units)


def test_update_rejects_bad_shapes_and_ids() -> None:
    topk = StreamingTopK(TopKSpec(2, 3))
    ids = torch.arange(4)
    with pytest.raises(ValueError, match=r"acts must be \(n_tokens, 3\)"):
        topk.update(torch.zeros(4, 2), ids, ids)
    with pytest.raises(ValueError, match="positions must be"):
        topk.update(torch.zeros(4, 3), ids, ids[:3])
    with pytest.raises(ValueError, match="mask must be a bool"):
        topk.update(torch.zeros(4, 3), ids, ids, mask=torch.ones(4))
    with pytest.raises(ValueError, match=r"in \[0, 2\*\*31\)"):
        topk.update(torch.zeros(4, 3), ids - 1, ids)
    with pytest.raises(ValueError, match=r"in \[0, 2\*\*32\)"):
        topk.update(torch.zeros(4, 3), ids, ids + 2**32 - 2)


def test_extreme_context_and_position_ids_keep_the_tie_rule() -> None:
    # (context, position) is packed as context * 2**32 + position: check it at the limits.
    ctx = torch.tensor([2**31 - 1, 2**31 - 1, 0, 1, 2**31 - 2])
    pos = torch.tensor([0, 2**32 - 1, 2**32 - 1, 0, 2**32 - 1])
    acts = torch.zeros(5, 2)
    r = _stream(acts, ctx, pos, k=5, cuts=[2, 3])
    _assert_same(r, brute_force_topk(acts, ctx, pos, k=5))
    assert r.context[:, 0].tolist() == [0, 1, 2**31 - 2, 2**31 - 1, 2**31 - 1]


def test_nan_raises_but_nan_in_padding_is_ignored() -> None:
    acts = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    acts[4, 1] = math.nan
    ids = torch.arange(6)
    with pytest.raises(ValueError, match="NaN"):
        StreamingTopK(TopKSpec(2, 3)).update(acts, ids, ids)
    with pytest.raises(ValueError, match="NaN"):
        brute_force_topk(acts, ids, ids, k=2)
    with pytest.raises(ValueError, match="NaN"):
        ActivationStats(3).update(acts)
    mask = ids != 4
    topk = StreamingTopK(TopKSpec(2, 3))
    topk.update(acts, ids, ids, mask)
    _assert_same(topk.result(), brute_force_topk(acts[mask], ids[mask], ids[mask], k=2))


def test_neg_inf_is_reserved_for_empty_slots() -> None:
    with pytest.raises(ValueError, match="-inf"):
        StreamingTopK(TopKSpec(1, 1)).update(torch.tensor([[-math.inf]]), *[torch.zeros(1)] * 2)


# --- known answers ------------------------------------------------------------------------


def test_hand_computed_case() -> None:
    # unit 0: 5 > 3 = 3 (tie -> smaller (context, position) first); unit 1: all equal.
    acts = torch.tensor([[3.0, 1.0], [5.0, 1.0], [3.0, 1.0], [1.0, 1.0]])
    ctx = torch.tensor([1, 0, 0, 0])
    pos = torch.tensor([0, 2, 7, 1])
    for cuts in ([], [1], [1, 2, 3]):
        r = _stream(acts, ctx, pos, k=3, cuts=cuts)
        assert r.values[:, 0].tolist() == [5.0, 3.0, 3.0]
        assert list(zip(r.context[:, 0].tolist(), r.position[:, 0].tolist(), strict=True)) == [
            (0, 2),
            (0, 7),
            (1, 0),
        ]
        assert list(zip(r.context[:, 1].tolist(), r.position[:, 1].tolist(), strict=True)) == [
            (0, 1),
            (0, 2),
            (0, 7),
        ]


def test_all_equal_data_keeps_the_first_tokens_in_context_position_order() -> None:
    n, k = 50, 7
    gen = torch.Generator().manual_seed(1)
    ctx, pos = torch.randint(0, 5, (n,), generator=gen), torch.randperm(n, generator=gen)
    acts = torch.full((n, 4), 0.25)
    first = sorted(zip(ctx.tolist(), pos.tolist(), strict=True))[:k]
    for cuts in ([], [3, 10, 11, 40], list(range(1, n))):
        r = _stream(acts, ctx, pos, k, cuts)
        for u in range(4):
            got = list(zip(r.context[:, u].tolist(), r.position[:, u].tolist(), strict=True))
            assert got == first
    _assert_same(r, brute_force_topk(acts, ctx, pos, k))


def test_k_larger_than_tokens_seen_marks_empty_slots() -> None:
    acts = torch.tensor([[1.0, -1.0], [2.0, -3.0], [0.0, 4.0]])
    ids = torch.arange(3)
    topk = StreamingTopK(TopKSpec(5, 2))
    assert topk.result().n_valid.tolist() == [0, 0]
    topk.update(acts[:2], ids[:2], ids[:2])
    topk.update(acts[2:], ids[2:], ids[2:])
    r = topk.result()
    assert r.n_seen == 3 and r.n_valid.tolist() == [3, 3]
    assert r.values[:, 0].tolist() == [2.0, 1.0, 0.0, -math.inf, -math.inf]
    assert r.context[3:].eq(-1).all() and r.position[3:].eq(-1).all()
    _assert_same(r, brute_force_topk(acts, ids, ids, k=5))
    with pytest.raises(ValueError, match="strict top-5 needs >= 5 tokens, saw 3"):
        topk.result(strict=True)
    assert topk.result(strict=False).n_seen == 3


def test_brute_force_matches_the_rule_spelled_out_in_python() -> None:
    gen = torch.Generator().manual_seed(2)
    acts = torch.randint(-2, 3, (40, 3), generator=gen).float()
    ctx, pos = torch.randint(0, 4, (40,), generator=gen), torch.randint(0, 6, (40,), generator=gen)
    r = brute_force_topk(acts, ctx, pos, k=6)
    for u in range(3):
        got = [
            (float(r.values[i, u]), int(r.context[i, u]), int(r.position[i, u])) for i in range(6)
        ]
        assert got == _python_topk(acts, ctx, pos, 6, u)


# --- equivalence with brute force ---------------------------------------------------------


@st.composite
def chunked_streams(draw: st.DrawFn):
    n = draw(st.integers(0, 40))
    n_units = draw(st.integers(1, 5))
    k = draw(st.integers(1, 8))
    values = draw(st.lists(st.sampled_from(TIE_VALUES), min_size=n * n_units, max_size=n * n_units))
    acts = torch.tensor(values, dtype=torch.float32).reshape(n, n_units)
    # Small ranges: duplicate contexts, positions and even (context, position) pairs.
    ctx = torch.tensor(draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)), dtype=torch.long)
    pos = torch.tensor(draw(st.lists(st.integers(0, 5), min_size=n, max_size=n)), dtype=torch.long)
    mask = draw(st.none() | st.lists(st.booleans(), min_size=n, max_size=n))
    mask = None if mask is None else torch.tensor(mask, dtype=torch.bool)
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=6)))
    return acts, ctx, pos, k, cuts, mask


@settings(max_examples=150, deadline=None)
@given(chunked_streams())
def test_any_chunking_equals_brute_force_on_tied_data(case) -> None:
    acts, ctx, pos, k, cuts, mask = case
    _assert_same(_stream(acts, ctx, pos, k, cuts, mask), brute_force_topk(acts, ctx, pos, k, mask))


@settings(max_examples=40, deadline=None)
@given(chunked_streams(), st.randoms(use_true_random=False))
def test_stream_order_does_not_matter(case, rnd) -> None:
    acts, ctx, pos, k, cuts, mask = case
    perm = list(range(acts.shape[0]))
    rnd.shuffle(perm)
    p = torch.tensor(perm, dtype=torch.long)
    shuffled = _stream(acts[p], ctx[p], pos[p], k, cuts, None if mask is None else mask[p])
    _assert_same(shuffled, _stream(acts, ctx, pos, k, [], mask))


@pytest.mark.parametrize("chunk", [1, 7, 64, 333, 1000])
def test_random_float_data_any_chunk_size_equals_brute_force(chunk: int) -> None:
    gen = torch.Generator().manual_seed(3)
    n = 1000
    acts = torch.randn(n, 48, generator=gen)  # (n, 48)
    acts[::5] = acts[::5].round()  # some exact ties across tokens
    ctx = torch.arange(n) // 100
    pos = torch.arange(n) % 100
    mask = torch.rand(n, generator=gen) > 0.1
    cuts = list(range(chunk, n, chunk))
    _assert_same(
        _stream(acts, ctx, pos, 10, cuts, mask), brute_force_topk(acts, ctx, pos, 10, mask)
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_other_dtypes_equal_brute_force(dtype: torch.dtype) -> None:
    # float64 takes the full-sort fallback; half types the packed-key path.
    gen = torch.Generator().manual_seed(4)
    acts = torch.randn(300, 16, generator=gen, dtype=torch.float64).to(dtype)
    ctx, pos = (
        torch.randint(0, 9, (300,), generator=gen),
        torch.randint(0, 40, (300,), generator=gen),
    )
    got = _stream(acts, ctx, pos, 12, [17, 100, 101, 250], dtype=dtype)
    _assert_same(got, brute_force_topk(acts, ctx, pos, 12))


def test_state_size_is_independent_of_the_number_of_updates() -> None:
    gen = torch.Generator().manual_seed(5)
    topk = StreamingTopK(TopKSpec(8, 32))
    sizes = []
    for step in range(100):
        ids = torch.arange(64) + 64 * step
        topk.update(torch.randn(64, 32, generator=gen), ids, ids)
        if step in (0, 99):
            r = topk.result()
            sizes.append((topk.nbytes, r.values.shape, r.context.shape, r.position.shape))
    assert sizes[0] == sizes[1] == (8 * 32 * (4 + 8 + 8), (8, 32), (8, 32), (8, 32))
    assert topk.n_seen == 6400


# --- ActivationStats ----------------------------------------------------------------------


def test_stats_match_numpy_over_chunks_and_mask() -> None:
    gen = torch.Generator().manual_seed(6)
    acts = torch.randn(700, 12, generator=gen) * torch.linspace(0.1, 5, 12) + 0.3  # (700, 12)
    acts[:, 3] = 0.0  # a dead unit
    mask = torch.rand(700, generator=gen) > 0.2
    stats = ActivationStats(12, threshold=0.5)
    for lo in range(0, 700, 128):
        stats.update(acts[lo : lo + 128], mask[lo : lo + 128])
    a = acts[mask].double().numpy()
    assert stats.n_seen == a.shape[0]
    np.testing.assert_array_equal(stats.frequency().numpy(), (a > 0.5).sum(0) / a.shape[0])
    np.testing.assert_array_equal(stats.max().numpy(), a.max(0))
    np.testing.assert_array_equal(stats.min().numpy(), a.min(0))
    np.testing.assert_allclose(stats.mean().numpy(), a.mean(0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(stats.var().numpy(), a.var(0), rtol=1e-10, atol=1e-15)


def test_stats_need_data_and_valid_bins() -> None:
    with pytest.raises(ValueError, match="no tokens"):
        ActivationStats(2).frequency()
    with pytest.raises(ValueError, match="growth"):
        QuantileBins(growth=1.0)
    with pytest.raises(ValueError, match="min_abs"):
        QuantileBins(min_abs=1.0, max_abs=0.5)


def test_quantile_known_answer_on_bin_representatives() -> None:
    bins = QuantileBins(growth=1.1, min_abs=0.01, max_abs=100.0)
    reps = bins.representatives()  # (n_bins,): every bin holds exactly its representative
    stats = ActivationStats(1, bins=bins)
    stats.update(reps[:, None])
    qs = torch.tensor([0.0, 0.3, 0.5, 1.0], dtype=torch.float64)
    exact = torch.quantile(reps, qs, interpolation="lower")
    assert torch.equal(stats.quantile(qs)[:, 0], exact)


@pytest.mark.parametrize("growth", [1.02, 1.05, 1.2])
def test_quantile_error_is_within_the_documented_bound(growth: float) -> None:
    bins = QuantileBins(growth=growth, min_abs=1e-3, max_abs=1e3)
    gen = torch.Generator().manual_seed(7)
    n, u = 5000, 6
    # Signed log-normal magnitudes, ~1e-3 .. 5e2 (inside [min_abs, max_abs] but for a few tiny
    # ones, covered by the absolute part of the bound), plus exact zeros (a ReLU-like unit).
    sign = torch.randn(n, u, generator=gen).sign()
    acts = sign * torch.exp(1.5 * torch.randn(n, u, generator=gen))
    acts[:, 0] = acts[:, 0].clamp(min=0)
    acts = acts.double()
    stats = ActivationStats(u, bins=bins)
    for lo in range(0, n, 999):
        stats.update(acts[lo : lo + 999])
    qs = torch.tensor([0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999, 1.0], dtype=torch.float64)
    exact = torch.quantile(acts, qs, dim=0, interpolation="lower")  # (n_q, u)
    got = stats.quantile(qs)  # (n_q, u)
    bound = torch.where(exact.abs() < bins.min_abs, bins.min_abs, bins.rel_error * exact.abs())
    assert ((got - exact).abs() <= bound * (1 + 1e-9)).all()
    assert exact.abs().max() < bins.max_abs  # the bound's premise
    assert stats.quantile(0.5).shape == (u,)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        stats.quantile(1.5)
    assert stats.counts.shape == (u, bins.n_bins)  # memory: fixed by the bins, not by n


# --- ContextTopK: the same merge over one candidate per context -------------------------------


def test_context_topk_hand_computed() -> None:
    # 3 contexts x 3 positions, 1 unit; position 0 (BOS) may not win.
    acts = torch.tensor([[9.0, 1.0, 2.0], [9.0, 2.0, 2.0], [0.0, 5.0, 1.0]]).unsqueeze(-1)  # (3, 3, 1)
    top = ContextTopK(TopKSpec(2, 1))
    top.update(acts, torch.arange(3), torch.tensor([False, True, True]))
    r = top.result()
    # maxima over positions 1..2: ctx0 2.0@2, ctx1 2.0@1 (first argmax), ctx2 5.0@1
    assert r.values[:, 0].tolist() == [5.0, 2.0]
    assert r.context[:, 0].tolist() == [2, 0]  # tie 2.0: the smaller context id
    assert r.position[:, 0].tolist() == [1, 2]
    assert r.n_seen == 3


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 6), st.integers(1, 5))
def test_context_topk_equals_brute_force_over_context_maxima_in_any_order(seed: int, k: int, batch: int) -> None:
    g = torch.Generator().manual_seed(seed)
    vals = torch.tensor(TIE_VALUES)
    acts = vals[torch.randint(len(vals), (9, 4, 3), generator=g)]  # (n_ctx, L, n_units), ties everywhere
    mask = torch.tensor([False, True, True, True])
    best, arg = acts[:, 1:].max(dim=1)  # (n_ctx, n_units)
    expect = brute_force_topk(best, torch.arange(9), torch.zeros(9, dtype=torch.long), k)
    for order in (torch.arange(9), torch.randperm(9, generator=g)):
        top = ContextTopK(TopKSpec(k, 3))
        for lo in range(0, 9, batch):
            ids = order[lo:lo + batch]
            top.update(acts[ids], ids, mask)
        r = top.result()
        assert torch.equal(r.values, expect.values) and torch.equal(r.context, expect.context)
        filled = r.context >= 0
        want_pos = arg.gather(0, r.context.clamp(min=0)) + 1
        assert torch.equal(r.position[filled], want_pos[filled])
        assert r.n_seen == 9


def test_context_topk_refuses_nan_and_bad_shapes() -> None:
    top = ContextTopK(TopKSpec(2, 1))
    with pytest.raises(ValueError, match="NaN"):
        top.update(torch.tensor([[[0.0], [math.nan]]]), torch.arange(1), torch.tensor([False, True]))
    with pytest.raises(ValueError, match="need acts"):
        top.update(torch.zeros(1, 2, 3), torch.arange(1), torch.tensor([False, True]))
