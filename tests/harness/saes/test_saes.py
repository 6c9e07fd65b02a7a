"""SAEs: known-answer metrics, the real sae-lens training runners on a tiny model, the cached
build (equal to fresh, never retrained), and the hub path (offline and on a stand-in)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.activations.cache import ContentCache
from harness.data.corpus import Corpus, CorpusRecipe
from harness.models.loaders import LoadedSubject, weights_hash
from harness.models.subjects import SubjectSpec
from harness.saes import train as sae_train
from harness.saes.sources import (
    SAESpec,
    default_sae_specs,
    identity_sae,
    random_decoder_sae,
    sae_depths,
    sae_from_state,
    sae_quality,
    sae_quality_many,
)

ROOT = Path(__file__).resolve().parents[3]
N_CTX, CTX_LEN, BOS = 160, 16, 0


def tiny_spec(hook: str, **kw) -> SAESpec:
    base = dict(hook_name=hook, d_sae=64, k=4, training_tokens=1536, lr=1e-2,
                train_batch_size_tokens=32, context_size=CTX_LEN, n_batches_for_norm_estimate=1,
                dead_feature_window=4, holdout_contexts=8, seed=1)
    return SAESpec(**{**base, **kw})


@pytest.fixture(scope="module")
def subject() -> LoadedSubject:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_ctx=CTX_LEN, d_head=8, n_heads=4,
                                  d_mlp=64, d_vocab=300, act_fn="gelu", normalization_type="LN",
                                  seed=0)
    model = HookedTransformer(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    spec = SubjectSpec(name="tiny", kind="path", source="built in test_saes")
    return LoadedSubject(spec=spec, model=model, weight_hash=weights_hash(model), load_seconds=0.0)


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 300, (N_CTX, CTX_LEN), generator=g)  # (n_ctx, ctx_len)
    tokens[:, 0] = BOS
    return Corpus(tokens=tokens, source_of=torch.zeros(N_CTX, dtype=torch.long),
                  recipe=CorpusRecipe(n_contexts=N_CTX, context_len=CTX_LEN),
                  sha256=hashlib.sha256(tokens.numpy().tobytes()).hexdigest(),
                  tokenizer_sha256="none")


def test_depth_rule_and_default_specs(subject):
    assert sae_depths(12) == (6, 8, 10, 11)
    assert sae_depths(30) == (15, 20, 25, 28)
    assert sae_depths(2) == (1,)
    specs = default_sae_specs(subject.model)
    assert [s.hook_name for s in specs] == ["blocks.1.hook_resid_pre", "blocks.1.mlp.hook_post"]
    assert [(s.d_sae, s.k) for s in specs] == [(4 * 32, 32), (2 * 64, 64)]
    assert {s.seed for s in default_sae_specs(subject.model, seed=5)} == {5}
    with pytest.raises(ValueError, match="k <= d_sae"):
        SAESpec(hook_name="x", d_sae=4, k=8)


def test_identity_sae_reconstructs_exactly(subject, corpus):
    loaded = identity_sae(32, "blocks.1.hook_resid_pre")
    q = sae_quality(loaded.sae, subject, corpus.tokens[:8])
    assert q["fve"] == pytest.approx(1.0, abs=1e-5)
    assert q["fve_uncentered"] == pytest.approx(1.0, abs=1e-5)
    assert q["l0"] == 32  # relu(x) or relu(-x) is nonzero for every coordinate
    assert q["ce_spliced"] == pytest.approx(q["ce_clean"], abs=1e-6)
    assert q["ce_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert q["n_tokens"] == 8 * (CTX_LEN - 1)
    assert loaded.provenance()["origin"] == "diagnostic"


def test_reconstruction_sums_fve_known_answers():
    """S7's FVE from per-text sums: the identity SAE gives 1, an SAE whose reconstruction is the
    mean of the kept activations gives 0, and the per-row sums combine over any rows."""
    from harness.saes.sources import fve_from_sums, reconstruction_sums

    g = torch.Generator().manual_seed(0)
    acts = torch.randn(3, 5, 4, generator=g)  # (texts, pos, d_in)
    keep = torch.ones(3, 5, dtype=torch.bool)
    keep[:, 0] = False
    keep[2, 3:] = False  # padding
    sums = reconstruction_sums(identity_sae(4).sae, acts, keep)
    assert fve_from_sums(sums) == pytest.approx(1.0, abs=1e-6)
    assert sums["n"].tolist() == [4, 4, 2]
    mean = acts[keep].double().mean(0)  # (d_in,)
    x = acts[keep].double()
    n, sse = len(x), ((x - mean) ** 2).sum().item()  # x_hat = mean x for every kept token
    mean_sums = {"sse": np.array([sse]), "q": np.array([(x**2).sum().item()]),
                 "s": x.sum(0).numpy()[None], "n": np.array([float(n)])}
    assert fve_from_sums(mean_sums) == pytest.approx(0.0, abs=1e-12)
    # rows combine: text 0 twice equals sums doubled
    doubled = {k: v[[0]] * 2 for k, v in sums.items()}
    assert fve_from_sums(sums, np.array([0, 0])) == pytest.approx(fve_from_sums(doubled))


def test_random_decoder_sae_scores_badly(subject, corpus):
    loaded = random_decoder_sae(32, 128, seed=3, hook_name="blocks.1.hook_resid_pre")
    q = sae_quality(loaded.sae, subject, corpus.tokens[:8])
    assert q["fve"] < 0.0 and q["cosine"] < 0.5
    assert q["ce_recovered"] < 0.5
    again = random_decoder_sae(32, 128, seed=3, hook_name="blocks.1.hook_resid_pre")
    assert torch.equal(loaded.sae.W_dec, again.sae.W_dec)


def test_quality_matches_sae_lens_recons_loss(subject, corpus):
    """Without BOS skipping, our CE trio equals sae-lens' own ``get_recons_loss``."""
    from sae_lens.evals import get_recons_loss
    from sae_lens.training.activation_scaler import ActivationScaler

    sae = random_decoder_sae(32, 64, seed=5, hook_name="blocks.0.hook_resid_pre").sae
    tokens = corpus.tokens[:8]
    ours = sae_quality(sae, subject, tokens, skip_bos=False)
    theirs = get_recons_loss(sae, subject.model, ActivationScaler(), tokens,
                             compute_kl=False, compute_ce_loss=True)
    for mine, key in (("ce_clean", "ce_loss_without_sae"), ("ce_spliced", "ce_loss_with_sae"),
                      ("ce_zero_ablation", "ce_loss_with_ablation")):
        assert ours[mine] == pytest.approx(theirs[key].double().mean().item(), rel=1e-6)


def test_joint_quality_equals_one_at_a_time(subject, corpus):
    saes = [identity_sae(32, "blocks.1.hook_resid_pre").sae,
            random_decoder_sae(32, 48, seed=1, hook_name="blocks.1.hook_resid_pre").sae,
            random_decoder_sae(64, 48, seed=2, hook_name="blocks.0.mlp.hook_post").sae]
    joint = sae_quality_many(saes, subject, corpus.tokens[:6], batch_size=4)
    for sae, got in zip(saes, joint, strict=True):
        assert got == pytest.approx(sae_quality(sae, subject, corpus.tokens[:6], batch_size=4))


def test_shared_prefix_runs_equal_full_runs(subject, corpus):
    """The spliced / ablated runs started at the SAE's block from the clean run's residual give
    the numbers of runs from the tokens (every SAE here, at blocks 0 and 1)."""
    from harness.saes.sources import sae_quality_rows

    saes = [random_decoder_sae(32, 48, seed=1, hook_name="blocks.1.hook_resid_pre").sae,
            random_decoder_sae(64, 48, seed=2, hook_name="blocks.0.mlp.hook_post").sae,
            random_decoder_sae(64, 48, seed=3, hook_name="blocks.1.mlp.hook_post").sae]
    tokens = corpus.tokens[:6]
    shared = sae_quality_rows(saes, subject, tokens, batch_size=4)
    full = sae_quality_rows(saes, subject, tokens, batch_size=4, share_prefix=False)
    for a, b in zip(shared, full, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-6, atol=1e-9, err_msg=key)


def test_midway_start_only_where_nothing_is_rebuilt():
    from types import SimpleNamespace

    from harness.saes.sources import _can_start_midway

    def model(side, pos):
        return SimpleNamespace(tokenizer=SimpleNamespace(padding_side=side),
                               cfg=SimpleNamespace(positional_embedding_type=pos))

    assert _can_start_midway(model("right", "rotary"))
    assert not _can_start_midway(model("left", "rotary"))
    assert not _can_start_midway(model("right", "shortformer"))


@pytest.mark.parametrize("architecture", ["topk", "standard"])
def test_runner_trains_and_restores_global_state(subject, corpus, architecture):
    import signal

    spec = tiny_spec("blocks.1.hook_resid_pre", architecture=architecture, l1_coefficient=0.1)
    rng, handler = torch.random.get_rng_state(), signal.getsignal(signal.SIGINT)
    sae, q = sae_train.train_sae(subject, corpus, spec)
    assert torch.equal(rng, torch.random.get_rng_state())
    assert signal.getsignal(signal.SIGINT) is handler
    assert sae.cfg.architecture() == architecture and sae.cfg.d_sae == 64
    assert sae.cfg.metadata.hook_name == spec.hook_name
    assert q["fve"] > 0.3  # 48 steps on a random model: better than nothing, far from converged
    if architecture == "topk":
        assert q["l0"] <= spec.k


def test_pass_level_fields_must_agree_for_a_joint_pass():
    specs = [tiny_spec("blocks.0.hook_resid_pre"), tiny_spec("blocks.1.mlp.hook_post", holdout_contexts=4)]
    with pytest.raises(ValueError, match="must agree on holdout_contexts"):
        sae_train.check_compatible(specs)
    with pytest.raises(ValueError, match="the same spec twice"):
        sae_train.check_compatible([specs[0], specs[0]])


@pytest.mark.parametrize("harvest_contexts", [40, 150])  # fewer / more than the SAEs' 103
def test_a_harvest_of_a_prefix_shares_the_pass(subject, corpus, harvest_contexts):
    """A harvest of the corpus's first n contexts rides on the SAE pass whichever needs more:
    its tables equal that prefix harvested alone, the SAE activations equal a pass without it,
    and the pass runs max(n, the SAEs' contexts) contexts, no more."""
    import dataclasses

    from harness.activations import corpus_pass
    from harness.activations.harvest import Harvester, HarvestSpec, harvest

    w = HarvestSpec(hooks=("blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"), k=3,
                    per_context=True, stats=False, n_contexts=harvest_contexts)
    spec = tiny_spec("blocks.1.mlp.hook_post")
    request = corpus_pass.union_request([spec], sae_train.training_contexts_of(corpus, spec))
    assert request.n_contexts == 103  # ceil(1536 / 15)
    prefix = dataclasses.replace(corpus, tokens=corpus.tokens[:harvest_contexts])
    alone = harvest(subject, prefix, dataclasses.replace(w, n_contexts=None), None)
    seen = []
    real = subject.model.run_with_cache

    def counting(tokens, *a, **k):
        if tokens.shape[1] == CTX_LEN:  # not run_pass's 2-token width probe
            seen.append(tokens.shape[0])
        return real(tokens, *a, **k)

    harvester = Harvester.for_model(subject.model, corpus, w)
    subject.model.run_with_cache = counting
    try:
        joint = corpus_pass.run_pass(subject.model, corpus.tokens, harvester=harvester,
                                     request=request)
    finally:
        del subject.model.run_with_cache
    assert sum(seen) == max(harvest_contexts, 103)
    only = corpus_pass.run_pass(subject.model, corpus.tokens[:103], request=request)
    assert all(torch.equal(joint[h], only[h]) for h in only)
    got = harvester.result()
    for h in w.hooks:
        assert torch.equal(got[h].topk.values, alone[h].topk.values)
        assert torch.equal(got[h].topk.context, alone[h].topk.context)
        assert int(got[h].topk.context.max()) < harvest_contexts
    assert harvest(subject, corpus, w, None)[w.hooks[0]].topk.context.max() < harvest_contexts
    with pytest.raises(ValueError, match="n_contexts"):
        HarvestSpec(hooks=w.hooks, n_contexts=0)


def test_cached_equals_fresh_and_is_not_retrained(subject, corpus, tmp_path, monkeypatch):
    """The cached build trains both SAEs from ONE corpus pass (forward to block 1) that also
    computes a harvest; the shallow SAE equals, bit for bit, a fresh one trained alone (forward
    to block 0 only), so the cache key need not name the co-trained SAEs; the harvest equals
    the harvest's own pass."""
    from harness.activations import corpus_pass
    from harness.activations.harvest import HarvestSpec, harvest

    specs = [tiny_spec("blocks.1.mlp.hook_post", d_sae=96), tiny_spec("blocks.0.hook_resid_pre")]
    w = HarvestSpec(hooks=("blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"), k=3,
                    per_context=True, stats=False)
    fresh, fresh_q = sae_train.train_sae(subject, corpus, specs[1])
    fresh_harvest = harvest(subject, corpus, w, None)
    calls = {"pass": 0}
    real = corpus_pass.run_pass

    def counting(*a, **k):
        calls["pass"] += 1
        return real(*a, **k)

    monkeypatch.setattr(corpus_pass, "run_pass", counting)
    cache = ContentCache(tmp_path)
    first = sae_train.get_or_train_saes(cache, subject, corpus, specs, harvest_specs=[w])
    assert calls == {"pass": 1}
    second = sae_train.get_or_train_saes(cache, subject, corpus, specs, harvest_specs=[w])
    single = sae_train.get_or_train_sae(cache, subject, corpus, specs[1])
    cached_harvest = harvest(subject, corpus, w, cache)
    assert calls == {"pass": 1}  # nothing recomputed: SAEs and harvest come from the cache
    for h in w.hooks:
        assert torch.equal(cached_harvest[h].topk.values, fresh_harvest[h].topk.values)
        assert torch.equal(cached_harvest[h].topk.context, fresh_harvest[h].topk.context)
    for loaded in (first[1], second[1], single):
        got = loaded.sae.state_dict()
        assert all(torch.equal(got[k], v) for k, v in fresh.state_dict().items())
        assert loaded.quality == pytest.approx(fresh_q)
    prov = single.provenance()
    assert prov["origin"] == "trained-locally" and prov["spec"]["hook_name"] == specs[1].hook_name
    assert prov["trained_with"] == [s.hook_name for s in specs]
    assert prov["weights_sha256"] == weights_hash(fresh)
    assert prov["made_on"]["torch"]  # the platform the bits were made on
    # The build kept each SAE's per-context quality rows (family R bootstraps them): reading
    # them runs no quality pass, and they equal the same SAE's rows measured alone.
    from harness.saes import sources

    heldout = sae_train.heldout_tokens_of(corpus, specs[1])
    monkeypatch.setattr(sources, "sae_quality_rows", lambda *a, **k: pytest.fail("recomputed"))
    rows = [sources.cached_quality_rows(cache, subject, s.sae, heldout) for s in first]
    monkeypatch.undo()
    for loaded, got in zip(first, rows, strict=True):
        alone = sources.sae_quality_rows([loaded.sae], subject, heldout)[0]
        assert got.keys() == alone.keys()
        for key in got:
            np.testing.assert_allclose(got[key], alone[key], rtol=1e-6, atol=1e-9, err_msg=key)
        assert sources.quality_from_rows(got) == pytest.approx(
            {k: v for k, v in loaded.quality.items() if k != "dead_share"})
    assert sources.cached_quality_rows(None, subject, first[0].sae, heldout).keys() == rows[0].keys()


def test_activation_batches_are_seeded_epochs():
    acts = torch.arange(10.0)[:, None]
    a = sae_train.activation_batches(acts, 4, seed=3, device="cpu")
    b = sae_train.activation_batches(acts, 4, seed=3, device="cpu")
    first = [next(a) for _ in range(4)]
    assert all(torch.equal(x, next(b)) for x in first)
    epoch = torch.cat(first[:2]).flatten()  # 2 batches of 4 per epoch, the remainder dropped
    assert len(set(epoch.tolist())) == 8
    with pytest.raises(ValueError, match="cannot fill one batch"):
        next(sae_train.activation_batches(acts[:3], 4, seed=0, device="cpu"))


def test_disk_format_round_trip(tmp_path):
    """The stand-in for a hub SAE: sae-lens' own disk format, loaded by sae-lens."""
    from sae_lens import SAE

    original = random_decoder_sae(16, 40, seed=2, hook_name="blocks.8.hook_resid_pre").sae
    original.save_model(tmp_path / "sae")
    loaded = SAE.load_from_disk(tmp_path / "sae")
    assert type(loaded) is type(original)
    assert loaded.cfg.metadata.hook_name == "blocks.8.hook_resid_pre"
    for k, v in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    rng = torch.random.get_rng_state()
    rebuilt = sae_from_state(cfg, original.state_dict())  # built on the meta device: no init
    assert torch.equal(rng, torch.random.get_rng_state())
    assert torch.equal(rebuilt.W_enc, original.W_enc)


HUB_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from harness.saes.sources import load_hub_sae
    from harness.models.subjects import SubjectUnavailable
    out = {}
    for sae_id in ("blocks.8.hook_resid_pre", "blocks.6.hook_resid_pre"):
        start = time.perf_counter()
        try:
            sae = load_hub_sae("gpt2-small-res-jb", sae_id)
            out[sae_id] = {"ok": True, "w_enc": sae.sae.W_enc.tolist(), "origin": sae.origin,
                           "hook": sae.hook_name}
        except SubjectUnavailable as exc:
            out[sae_id] = {"ok": False, "msg": str(exc)}
        out[sae_id]["seconds"] = time.perf_counter() - start
    print(json.dumps(out))
""")


def test_hub_sae_offline_and_from_hf_cache(tmp_path):
    """In a fresh process with HF_HUB_OFFLINE=1 (huggingface_hub reads env at import): an SAE in
    the HF cache loads through the real ``SAE.from_pretrained``; one absent raises
    SubjectUnavailable at once."""
    from tests.standins import install_in_hub_cache

    sae = random_decoder_sae(12, 24, seed=7, hook_name="blocks.8.hook_resid_pre").sae
    sae.save_model(tmp_path / "repo" / "blocks.8.hook_resid_pre")
    folder = "blocks.8.hook_resid_pre"
    install_in_hub_cache(tmp_path / "hf", "jbloom/GPT2-Small-SAEs-Reformatted", tmp_path / "repo",
                         missing=[f"{folder}/sparsity.safetensors"])
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", HUB_SCRIPT], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    hit, miss = out["blocks.8.hook_resid_pre"], out["blocks.6.hook_resid_pre"]
    assert hit["ok"] and hit["origin"] == "hub" and hit["hook"] == folder
    assert torch.equal(torch.tensor(hit["w_enc"]), sae.W_enc)
    assert not miss["ok"] and "unreachable" in miss["msg"] and miss["seconds"] < 5


def test_subject_saes_takes_the_sources_hub_saes_and_trains_only_the_rest(subject, corpus, tmp_path,
                                                                          monkeypatch):
    import harness.saes.sources as saes_mod
    from harness.models.subjects import SubjectUnavailable

    hub_ids = ("blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre")
    monkeypatch.setattr(sae_train, "HUB_SAES", {"tiny": ("a-release", hub_ids)})
    asked, trained = [], []

    def fake_hub(release, sae_id, *, device="cpu", dtype="float32"):
        asked.append((release, sae_id))
        return identity_sae(32, hook_name=sae_id)

    def fake_train(cache, loaded, corpus, specs, harvest_specs=()):
        assert [h.hooks[-1] for h in harvest_specs] == ["blocks.1.mlp.hook_post"]  # W's harvest rides along
        trained.extend(specs)
        return ("trained",) * len(specs)

    monkeypatch.setattr(saes_mod, "load_hub_sae", fake_hub)
    monkeypatch.setattr(sae_train, "get_or_train_saes", fake_train)
    out = sae_train.subject_saes(ContentCache(tmp_path), subject, corpus)
    assert asked == [("a-release", h) for h in hub_ids]
    assert [s.hook_name for s in trained] == ["blocks.1.mlp.hook_post"]  # the MLP SAE only
    assert [s.hook_name for s in out[:2]] == list(hub_ids) and out[2:] == ("trained",)

    def offline(*a, **k):
        raise SubjectUnavailable("hub unreachable")

    monkeypatch.setattr(saes_mod, "load_hub_sae", offline)
    with pytest.raises(SubjectUnavailable, match="unreachable"):
        sae_train.subject_saes(ContentCache(tmp_path), subject, corpus)


@pytest.mark.parametrize(("n_layers", "applies"), [(1, False), (2, False), (4, False), (6, True),
                                                   (12, True), (30, True)])
def test_depth_trends_need_three_depths(n_layers: int, applies: bool) -> None:
    """S2-S4 on a shallow subject end inconclusive/not-applicable with this reason (they used
    to come out inconclusive with estimate NaN [nan, nan] on a 2-layer checkpoint)."""
    from harness.saes.sources import depth_trend_problem, sae_depths

    problem = depth_trend_problem(sae_depths(n_layers))
    assert (problem is None) == applies, (n_layers, sae_depths(n_layers), problem)
    if not applies:
        assert "a depth trend needs at least 3 distinct depths" in problem
        assert str(tuple(sorted(set(sae_depths(n_layers))))) in problem
