"""Generation under a clamp and the rerun: batching, determinism, seeds, clamp placement, EOS,
hook hygiene, the cache and input errors, on tiny in-process HookedTransformers (an absolute-
position GPT-2-like one and a rotary GQA Llama-like one, so left padding is checked for both
position schemes)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from harness.activations import generation as gen
from harness.activations import rerun as rerun_module
from harness.activations.cache import ContentCache
from harness.activations.capture import capture
from harness.activations.generation import (
    Clamp,
    GenerationResult,
    GenerationSpec,
    Sampling,
    first_divergence,
    run_generation,
    run_generations,
)
from tests.standins import train_tokenizer

PROMPTS = ("When Mary and John went to the", "def add(x, y):",
           "The war lasted from the year 1632 to", "Alice")
POST, RESID = "blocks.1.mlp.hook_post", "blocks.1.hook_resid_post"
N_NEW = 12
ROUNDING = {"atol": 1e-4, "rtol": 1e-4}
"""KV-cached decoding vs a full rerun of the sequence: the same sums in another order (float32
activations of size ~1-10 in these stand-ins differ by up to ~3e-5)."""


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=300, model_max_length=64)


def _model(tokenizer, arch: str):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = dict(n_layers=2, d_model=64, d_head=16, n_heads=4, d_mlp=256, n_ctx=64, d_vocab=300,
               act_fn="gelu", normalization_type="LN", seed=0,
               initializer_range=0.3)  # wider than GPT-2's 0.02: varied greedy continuations
    if arch == "rotary":
        cfg.update(positional_embedding_type="rotary", rotary_dim=16, n_key_value_heads=2,
                   normalization_type="RMS", act_fn="silu", gated_mlp=True)
    model = HookedTransformer(HookedTransformerConfig(**cfg), tokenizer=tokenizer)
    return model.eval()


@pytest.fixture(scope="module", params=["standard", "rotary"])
def model(request, tokenizer):
    """Read-only use only: shared by the module's tests."""
    return _model(tokenizer, request.param)


@pytest.fixture(scope="module")
def gpt(tokenizer):
    """The absolute-position model alone (tests that need one model). Read-only."""
    return _model(tokenizer, "standard")


def _leaked(model) -> list[str]:
    return [n for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]


def _spec(**kw) -> GenerationSpec:
    return GenerationSpec(PROMPTS, **{"max_new_tokens": N_NEW, **kw})


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


# --- batching, determinism, seeds ------------------------------------------------------


def test_batched_equals_each_prompt_alone(model):
    spec = _spec(hooks=(POST, RESID), logprobs=True, batch_size=len(PROMPTS))
    batched = run_generation(model, spec)
    assert batched.new_tokens.unique().numel() > 4  # a non-degenerate continuation
    for i, p in enumerate(PROMPTS):
        alone = run_generation(model, GenerationSpec([p], N_NEW, hooks=(POST, RESID),
                                                     logprobs=True))
        assert torch.equal(alone.new_tokens[0], batched.new_tokens[i])
        assert alone.new_lengths[0] == batched.new_lengths[i]
        for h in (POST, RESID):
            torch.testing.assert_close(alone.means[h][0], batched.means[h][i])
        torch.testing.assert_close(alone.logprobs[0], batched.logprobs[i], equal_nan=True)


def test_prompts_are_tokenized_without_bos_unless_asked(gpt):
    r = run_generation(gpt, _spec(max_new_tokens=1))
    for i, p in enumerate(PROMPTS):
        assert torch.equal(r.prompt_tokens[i, : r.prompt_lengths[i]],
                           gpt.to_tokens(p, prepend_bos=False)[0].cpu())
    with_bos = run_generation(gpt, _spec(max_new_tokens=1, prepend_bos=True))
    assert torch.equal(with_bos.prompt_lengths, r.prompt_lengths + 1)


def test_greedy_is_deterministic_and_agrees_with_the_rerun(model):
    a, b = (run_generation(model, _spec(hooks=(POST,), logprobs=True)) for _ in range(2))
    for x, y in ((a.new_tokens, b.new_tokens), (a.means[POST], b.means[POST]),
                 (a.logprobs, b.logprobs)):
        _same(x, y)
    # the KV-cached generation chose what the full rerun ranks first
    assert torch.equal(a.logprobs.argmax(-1)[a.new_mask], a.new_tokens[a.new_mask])
    lse = a.logprobs.logsumexp(-1)[a.new_mask]
    torch.testing.assert_close(lse, torch.zeros_like(lse), atol=1e-5, rtol=0)


def test_seeded_sampling_reproducible_batch_invariant_and_seed_dependent(model):
    s0 = _spec(sampling=Sampling(seed=0, top_k=50, temperature=1.0))
    first, again = run_generation(model, s0), run_generation(model, s0)
    assert torch.equal(first.new_tokens, again.new_tokens)
    one_by_one = run_generation(model, _spec(sampling=s0.sampling, batch_size=1))
    assert torch.equal(first.new_tokens, one_by_one.new_tokens)
    other = run_generation(model, _spec(sampling=Sampling(seed=1, top_k=50)))
    assert not torch.equal(first.new_tokens, other.new_tokens)
    greedy = run_generation(model, _spec())
    assert not torch.equal(first.new_tokens, greedy.new_tokens)


def test_top_1_sampling_is_greedy(gpt):
    top1 = run_generation(gpt, _spec(sampling=Sampling(seed=5, top_k=1, temperature=2.0)))
    assert torch.equal(top1.new_tokens, run_generation(gpt, _spec()).new_tokens)


# --- the clamp ----------------------------------------------------------------------------


def _reference_reading(model, r: GenerationResult, hook: str) -> list[torch.Tensor]:
    """hook at the generated positions of each sequence, by capture() on it alone, unhooked."""
    out = []
    for i in range(len(r.spec.prompts)):
        seq = r.sequence(i)[None].to(model.cfg.device)
        act = capture(model, seq, [hook])[hook][0].float().cpu()  # (pos, d)
        out.append(act[int(r.prompt_lengths[i]):])
    return out


def test_baseline_reading_equals_capture_on_the_sequence(model):
    r = run_generation(model, _spec(hooks=(POST, RESID), per_token=True))
    for h in (POST, RESID):
        for i, ref in enumerate(_reference_reading(model, r, h)):
            n = int(r.new_lengths[i])
            torch.testing.assert_close(r.per_token[h][i, :n], ref)
            torch.testing.assert_close(r.means[h][i], ref.mean(0))
            assert r.per_token[h][i, n:].isnan().all()


@pytest.mark.parametrize("where", ["both", "rerun-only", "generation-only"])
def test_clamp_placement(model, where):
    clamp = Clamp(POST, neuron=7, value=20.0, where=where)
    r = run_generation(model, _spec(clamp=clamp, hooks=(RESID,), per_token=True, logprobs=True))
    both = run_generation(model, _spec(clamp=Clamp(POST, 7, 20.0), per_token=True))
    base = run_generation(model, _spec())
    read = r.per_token[POST][..., 7][r.new_mask]  # (n_generated,)
    if where == "generation-only":
        assert not (read == 20.0).any()  # the rerun is unhooked: the model's own values
        for i, ref in enumerate(_reference_reading(model, r, POST)):
            torch.testing.assert_close(r.per_token[POST][i, : r.new_lengths[i]], ref)
    else:
        assert (read == 20.0).all()
    made_by = {"both": both, "rerun-only": base, "generation-only": both}[where]
    assert torch.equal(r.new_tokens, made_by.new_tokens)
    assert not torch.equal(both.new_tokens, base.new_tokens)  # v = 20 changes the text here
    if where == "both":  # the cached generation was clamped at the prompt positions too
        assert torch.equal(r.logprobs.argmax(-1)[r.new_mask], r.new_tokens[r.new_mask])
    assert not _leaked(model)


def test_baseline_is_not_v_zero(gpt):
    hook = "blocks.0.mlp.hook_post"  # layer 0: the clamp has downstream effects in layer 1
    base = run_generation(gpt, _spec(hooks=(hook, RESID), per_token=True))
    zero = run_generation(gpt, _spec(clamp=Clamp(hook, 3, 0.0), hooks=(RESID,), per_token=True))
    assert (base.per_token[hook][..., 3][base.new_mask] != 0).any()
    assert (zero.per_token[hook][..., 3][zero.new_mask] == 0).all()
    assert not torch.allclose(base.means[RESID], zero.means[RESID])
    # only the clamped unit is written: the others' readings move through attention alone
    assert zero.spec.capture_hooks == (hook, RESID)


def test_first_divergence_known_answers():
    def res(tokens: list[list[int]], lengths: list[int]) -> GenerationResult:
        t = torch.tensor(tokens)
        return GenerationResult(GenerationSpec(["a"] * len(tokens), t.shape[1]),
                                torch.zeros(len(tokens), 1, dtype=torch.long),
                                torch.ones(len(tokens), dtype=torch.long), t,
                                torch.tensor(lengths), torch.zeros(len(tokens), dtype=torch.bool))

    a = res([[1, 2, 3], [1, 2, 3], [1, 2, 0], [5, 5, 5]], [3, 3, 2, 3])
    b = res([[1, 2, 3], [1, 9, 3], [1, 2, 7], [6, 5, 5]], [3, 3, 3, 3])
    assert first_divergence(a, b).tolist() == [-1, 1, 2, 0]


# --- EOS, hooks, stage, cache -------------------------------------------------------------


def test_stops_each_row_at_eos_then_pads(gpt):
    free = run_generation(gpt, _spec(stop_at_eos=False, hooks=(POST,), per_token=True))
    eos = int(free.new_tokens[0, 3])  # a token that row 0 emits at step 3 (or earlier)
    stop = run_generation(gpt, _spec(eos_token_id=eos, hooks=(POST,), per_token=True))
    pad = gpt.tokenizer.pad_token_id
    for i in range(len(PROMPTS)):
        hits = (free.new_tokens[i] == eos).nonzero().flatten().tolist()
        n = hits[0] + 1 if hits else N_NEW
        assert int(stop.new_lengths[i]) == n and bool(stop.stopped[i]) == bool(hits)
        assert torch.equal(stop.new_tokens[i, :n], free.new_tokens[i, :n])
        assert (stop.new_tokens[i, n:] == pad).all()
        torch.testing.assert_close(stop.per_token[POST][i, :n], free.per_token[POST][i, :n])
        torch.testing.assert_close(stop.means[POST][i], free.per_token[POST][i, :n].mean(0))
    assert int(stop.new_lengths[0]) <= 4


@pytest.mark.parametrize("where", ["generation", "rerun"])
def test_no_hook_left_after_an_exception(gpt, monkeypatch, where):
    def boom(*args, **kwargs):
        raise RuntimeError("inside the hooked run")

    monkeypatch.setattr(gen if where == "generation" else rerun_module,
                        "_choose" if where == "generation" else "last_layer_needed", boom)
    spec = _spec(clamp=Clamp(POST, 1, 5.0), hooks=(RESID,))
    with pytest.raises(RuntimeError, match="inside the hooked run"):
        run_generation(gpt, spec)
    assert not _leaked(gpt)


def test_generation_is_charged_to_its_stage(gpt):
    from harness.evidence.stages import recorder

    before = recorder().totals()
    run_generation(gpt, _spec(max_new_tokens=2))
    assert recorder().since(before).get("generation", 0.0) > 0


def test_cache_hit_returns_identical_tensors_without_running(gpt, tmp_path, monkeypatch):
    cache = ContentCache(tmp_path)
    spec = _spec(clamp=Clamp(POST, 2, -3.0), hooks=(RESID,), per_token=True, logprobs=True,
                 sampling=Sampling(seed=4, top_k=20))
    fresh = run_generation(gpt, spec)
    first = run_generation(gpt, spec, cache=cache, subject="standin-a")

    def no_run(*args, **kwargs):
        raise AssertionError("a cache hit must not run the model")

    monkeypatch.setattr(gen, "_compute", no_run)
    hit = run_generation(gpt, spec, cache=cache, subject="standin-a")
    for r in (first, hit):
        for name in ("prompt_tokens", "prompt_lengths", "new_tokens", "new_lengths", "stopped",
                     "logprobs"):
            _same(getattr(r, name), getattr(fresh, name))
        for h in spec.capture_hooks:
            _same(r.means[h], fresh.means[h])
            _same(r.per_token[h], fresh.per_token[h])
    with pytest.raises(AssertionError, match="must not run"):  # another subject: another key
        run_generation(gpt, spec, cache=cache, subject="standin-b")
    with pytest.raises(AssertionError, match="must not run"):  # another value: another key
        run_generation(gpt, _spec(clamp=Clamp(POST, 2, -3.5), hooks=(RESID,), per_token=True,
                                  logprobs=True, sampling=Sampling(seed=4, top_k=20)),
                       cache=cache, subject="standin-a")
    with pytest.raises(ValueError, match="identity"):
        run_generation(gpt, spec, cache=cache)


def test_model_dtype_is_used_and_results_are_float32(tokenizer):
    model = _model(tokenizer, "standard").to(torch.bfloat16)
    r = run_generation(model, _spec(max_new_tokens=3, clamp=Clamp(POST, 0, 3.0), per_token=True))
    assert r.means[POST].dtype == torch.float32
    assert (r.per_token[POST][..., 0][r.new_mask] == 3.0).all()


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"prompts": ()}, "no prompts"),
    ({"prompts": ("ok", "  ")}, "prompt 1 is empty"),
    ({"prompts": "one string"}, "not one string"),
    ({"hooks": POST}, "hooks must be a sequence"),
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ({"batch_size": 0}, "batch_size"),
])
def test_spec_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GenerationSpec(**{"prompts": PROMPTS, **kwargs})


@pytest.mark.parametrize(("make", "message"), [
    (lambda: Clamp(POST, -1, 1.0), "neuron must be"),
    (lambda: Clamp(POST, 1, float("nan")), "finite"),
    (lambda: Clamp(POST, 1, 1.0, where="everywhere"), "where"),
    (lambda: Sampling(seed=0, top_k=0), "top_k"),
    (lambda: Sampling(seed=0, temperature=0.0), "temperature"),
    (lambda: Sampling(seed=-1), "seed"),
])
def test_part_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"clamp": Clamp(POST, 256, 1.0)}, "out of range: blocks.1.mlp.hook_post has 256"),
    ({"clamp": Clamp("blocks.1.mlp.hook_pots", 0, 1.0)}, "did you mean blocks.1.mlp.hook_post"),
    ({"hooks": ("blocks.9.hook_resid_post",)}, "no hook"),
    ({"sampling": Sampling(seed=0, top_k=301)}, "exceeds d_vocab"),
    ({"max_new_tokens": 60}, "exceeds the context length 64"),
    ({"eos_token_id": 300}, "EOS id"),
    ({"hooks": ("blocks.0.attn.hook_pattern",)}, "attention patterns"),
])
def test_model_errors(gpt, kwargs, message):
    with pytest.raises(ValueError, match=message):
        run_generation(gpt, _spec(**kwargs))
    assert not _leaked(gpt)


# --- runs decoded together, reading while decoding -------------------------------------------


def _group_specs(**kw) -> list[GenerationSpec]:
    """A small grid: baseline, two doses, another neuron, a sampled run, a rerun-only clamp."""
    runs = [{}, {"clamp": Clamp(POST, 7, 20.0)}, {"clamp": Clamp(POST, 7, -20.0)},
            {"clamp": Clamp(POST, 3, 5.0)}, {"sampling": Sampling(seed=2, top_k=50)},
            {"clamp": Clamp(POST, 7, 20.0, where="rerun-only")}]
    return [_spec(**{**kw, **r}) for r in runs]


def test_runs_decoded_together_equal_each_run_alone(model):
    specs = _group_specs(hooks=(POST, RESID), logprobs=True, batch_size=2 * len(PROMPTS))
    together = run_generations(model, specs)
    assert [r.spec for r in together] == specs
    for spec, got in zip(specs, together, strict=True):
        alone = run_generation(model, dataclasses.replace(spec, batch_size=len(PROMPTS)))
        assert torch.equal(got.new_tokens, alone.new_tokens)
        assert torch.equal(got.new_lengths, alone.new_lengths)
        for h in spec.capture_hooks:
            torch.testing.assert_close(got.means[h], alone.means[h])
        torch.testing.assert_close(got.logprobs, alone.logprobs, equal_nan=True)
    assert not torch.equal(together[0].new_tokens, together[1].new_tokens)  # the doses act


def test_reading_while_decoding_equals_the_rerun(model):
    specs = _group_specs(hooks=(POST, RESID), per_token=True, logprobs=True)[:5]
    by_rerun = run_generations(model, specs)
    by_decoding = run_generations(model, specs, read="generation")
    for a, b in zip(by_rerun, by_decoding, strict=True):
        assert torch.equal(a.new_tokens, b.new_tokens)
        for h in a.spec.capture_hooks:
            torch.testing.assert_close(b.per_token[h], a.per_token[h], equal_nan=True, **ROUNDING)
            torch.testing.assert_close(b.means[h], a.means[h], **ROUNDING)
        torch.testing.assert_close(b.logprobs, a.logprobs, equal_nan=True, **ROUNDING)
        assert torch.equal(b.per_token[POST].isnan(), a.per_token[POST].isnan())
    assert not _leaked(model)


def test_reading_while_decoding_stops_each_row_at_eos(gpt):
    free = run_generation(gpt, _spec(stop_at_eos=False))
    eos = int(free.new_tokens[0, 2])
    spec = _spec(eos_token_id=eos, hooks=(POST,), per_token=True)
    a, b = run_generations(gpt, [spec]), run_generations(gpt, [spec], read="generation")
    assert torch.equal(a[0].new_lengths, b[0].new_lengths) and int(a[0].new_lengths.min()) <= 3
    torch.testing.assert_close(b[0].per_token[POST], a[0].per_token[POST], equal_nan=True,
                               **ROUNDING)


def test_runs_decoded_together_are_cached_as_one_entry(gpt, tmp_path, monkeypatch):
    cache = ContentCache(tmp_path)
    specs = _group_specs(hooks=(RESID,))[:3]
    first = run_generations(gpt, specs, cache=cache, subject="standin-a")
    single = run_generation(gpt, specs[0], cache=cache, subject="standin-a")

    def no_run(*args, **kwargs):
        raise AssertionError("a cache hit must not run the model")

    monkeypatch.setattr(gen, "_compute", no_run)
    for a, b in zip(run_generations(gpt, specs, cache=cache, subject="standin-a"), first, strict=True):
        _same(a.new_tokens, b.new_tokens)
        _same(a.means[RESID], b.means[RESID])
    # one run read by rerun keeps run_generation's key; reading while decoding is another key
    _same(run_generations(gpt, specs[:1], cache=cache, subject="standin-a")[0].new_tokens,
          single.new_tokens)
    with pytest.raises(AssertionError, match="must not run"):
        run_generations(gpt, specs, read="generation", cache=cache, subject="standin-a")


@pytest.mark.parametrize(("runs", "kwargs", "message"), [
    ([], {}, "no runs"),
    ([_spec(), _spec(max_new_tokens=3)], {}, "differs from run 0"),
    ([_spec(), _spec(hooks=(POST,))], {}, "differs from run 0"),
    ([_spec(clamp=Clamp(POST, 1, 2.0, where="rerun-only"))], {"read": "generation"}, "both phases"),
    ([_spec()], {"read": "decode"}, "read must be one of"),
    ([_spec(), _spec(clamp=Clamp(POST, 999, 1.0))], {}, "out of range"),
])
def test_group_errors(gpt, runs, kwargs, message):
    with pytest.raises(ValueError, match=message):
        run_generations(gpt, runs, **kwargs)
    assert not _leaked(gpt)
