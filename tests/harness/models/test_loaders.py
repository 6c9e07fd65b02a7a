"""The suite's own loaders (harness.models.loaders) on stand-in checkpoints and on the real default.

Hub subjects are exercised in a child interpreter: huggingface_hub reads HF_HOME and
HF_HUB_OFFLINE at import time, so they must be set before anything imports it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import time
from importlib.metadata import PackageNotFoundError
from pathlib import Path

import pytest
import torch

from harness.activations.capture import HookNameError, capture, tokenize
from harness.activations.layouts import decode_layouts
from harness.models import loaders
from harness.models.subjects import (
    RAW,
    SMOLLM2_INSTALL,
    SubjectError,
    SubjectUnavailable,
    check_device_dtype,
    parse_subject,
)
from tests.standins import (
    SOLU_STATE_DICT_FILE,
    install_in_hub_cache,
    make_gpt2_checkpoint,
    make_llama_checkpoint,
    make_solu_hub_standin,
)

ROOT = Path(__file__).resolve().parents[3]
TOKENS = torch.tensor([[1, 5, 17, 42, 99, 7, 250, 3]])
# float32 through a 2-layer model: differences come from op order only.
STANDIN_ATOL = 1e-4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "gpt2": make_gpt2_checkpoint(root / "gpt2", seed=1),
        "llama": make_llama_checkpoint(root / "llama", seed=2),
    }


def _hf_logits(path: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(TOKENS).logits


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_path_subject_matches_hf(checkpoints, arch):
    spec = dataclasses.replace(parse_subject(str(checkpoints[arch])), processing=RAW)
    loaded = loaders.load_subject(spec)
    with torch.no_grad():
        ours = loaded.model(TOKENS)
    ref = _hf_logits(checkpoints[arch])
    assert (ours - ref).abs().max().item() < STANDIN_ATOL
    assert loaded.spec.kind == "path" and len(loaded.weight_hash) == 64


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_default_processing_preserves_log_probs(checkpoints, arch):
    """fold_ln / centring change logits by a per-position constant at most."""
    loaded = loaders.load_subject(parse_subject(str(checkpoints[arch])))
    with torch.no_grad():
        ours = loaded.model(TOKENS).log_softmax(-1)
    ref = _hf_logits(checkpoints[arch]).log_softmax(-1)
    assert (ours - ref).abs().max().item() < STANDIN_ATOL


def test_random_twin_is_seeded_and_differs(checkpoints):
    path = str(checkpoints["llama"])
    a = loaders.load_subject(parse_subject(path + ":random", seed=3))
    b = loaders.load_subject(parse_subject(path + ":random", seed=3))
    c = loaders.load_subject(parse_subject(path + ":random", seed=4))
    trained = loaders.load_subject(parse_subject(path))
    assert a.weight_hash == b.weight_hash
    assert all(torch.isfinite(p).all() and p.std() > 0 for n, p in a.model.named_parameters() if n.endswith("W_in"))
    assert len({a.weight_hash, c.weight_hash, trained.weight_hash}) == 3
    assert a.model.cfg.to_dict()["d_mlp"] == trained.model.cfg.d_mlp
    assert a.spec.id.endswith(":random")


def test_cache_identity_does_not_depend_on_the_processed_bits(checkpoints, monkeypatch):
    """TL's processing is not bit-stable across loads (MKL GEMMs): simulate that, and the
    identity of converted and random-init subjects must not move (the twin's fell back to the
    processed-weights hash before)."""
    import uuid

    monkeypatch.setattr(loaders, "weights_hash", lambda model: uuid.uuid4().hex)
    for name in (str(checkpoints["llama"]), str(checkpoints["llama"]) + ":random"):
        a = loaders.load_subject(parse_subject(name, seed=3))
        b = loaders.load_subject(parse_subject(name, seed=3))
        assert a.processed_weight_hash != b.processed_weight_hash  # the simulated instability
        assert a.weight_hash == b.weight_hash, name


def test_random_twin_leaves_global_rng_alone(checkpoints):
    state = torch.random.get_rng_state()
    loaders.load_subject(parse_subject(str(checkpoints["gpt2"]) + ":random", seed=5))
    assert torch.equal(state, torch.random.get_rng_state())


def test_weights_hash_sees_processing(checkpoints):
    spec = parse_subject(str(checkpoints["gpt2"]))
    raw = loaders.load_subject(dataclasses.replace(spec, processing=RAW))
    folded = loaders.load_subject(spec)
    assert raw.weight_hash != folded.weight_hash


def test_unknown_hook_name_is_one_clear_error(checkpoints):
    model = loaders.load_subject(parse_subject(str(checkpoints["gpt2"]))).model
    batch = tokenize(model, ["hello there"])
    with pytest.raises(HookNameError, match=r"no hook 'blocks\.0\.mlp\.hook_pree'.*did you mean"):
        capture(model, batch.tokens, ["blocks.0.mlp.hook_pree"])
    assert not any(hp._forward_hooks for hp in model.hook_dict.values())


@pytest.mark.parametrize("hook", ["blocks.0.mlp.hook_post", "blocks.1.hook_resid_post"])
def test_capture_stops_early_and_matches_full_run(checkpoints, hook):
    model = loaders.load_subject(parse_subject(str(checkpoints["gpt2"]))).model
    batch = tokenize(model, ["hello there", "a longer text than the first one"])
    early = capture(model, batch.tokens, [hook])[hook]
    _, cache = model.run_with_cache(batch.tokens)
    assert torch.equal(early, cache[hook])
    assert batch.mask.sum().item() == batch.lengths.sum().item()


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(SubjectError, match="not a Hugging Face checkpoint directory"):
        parse_subject(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(SubjectError):
        loaders.load_subject(parse_subject(str(tmp_path)))


def test_unknown_subject_lists_known():
    with pytest.raises(SubjectError, match="known subjects are gpt2-small, smollm2-135m"):
        parse_subject("smollm3")


@pytest.mark.parametrize(("device", "dtype", "match"), [
    ("cuda", "float32", "no CUDA device"),
    ("cpu", "float8", "unknown dtype"),
    ("warp-drive", "float32", "unknown device"),
])
def test_impossible_device_or_dtype(device, dtype, match):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SubjectError, match=match):
        check_device_dtype(device, dtype)


def test_missing_wheel_names_the_install_command(monkeypatch):
    def missing(name):
        raise PackageNotFoundError(name)

    monkeypatch.setattr(loaders, "distribution", missing)
    with pytest.raises(SubjectError) as err:
        loaders.load_subject(parse_subject("smollm2-135m"))
    assert SMOLLM2_INSTALL in str(err.value)
    assert "\n" not in str(err.value)


def _child(code: str, hf_home: Path, timeout: int = 300) -> dict:
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_hub_subject_loads_through_transformer_lens_on_a_standin(tmp_path):
    """`--subject gpt2-small` goes through TL's own from_pretrained('gpt2'); here 'gpt2' is a
    small random GPT-2 laid out in a private HF cache."""
    ckpt = make_gpt2_checkpoint(tmp_path / "gpt2", seed=7)
    install_in_hub_cache(tmp_path / "hf", "gpt2", ckpt)
    out = _child(f"""
        import dataclasses, json, torch
        from transformers import GPT2LMHeadModel
        from harness.models.subjects import parse_subject, RAW
        from harness.models.loaders import load_subject, hub_identity
        tokens = torch.tensor({TOKENS.tolist()})
        spec = dataclasses.replace(parse_subject("gpt2-small"), processing=RAW)
        loaded = load_subject(spec)
        with torch.no_grad():
            ours = loaded.model(tokens)
            ref = GPT2LMHeadModel.from_pretrained("gpt2").eval()(tokens).logits
        print(json.dumps({{"diff": (ours - ref).abs().max().item(), "id": loaded.spec.id,
                          "layers": loaded.model.cfg.n_layers, "hash": loaded.weight_hash,
                          "hub_identity": hub_identity(spec),
                          "folded_identity": hub_identity(parse_subject("gpt2-small"))}}))
    """, tmp_path / "hf")
    assert out["id"] == "gpt2-small" and out["layers"] == 2
    assert out["diff"] < STANDIN_ATOL
    # A deterministic identity (repo, snapshot revision, processing), not the processed weights.
    assert out["hash"] == out["hub_identity"] != out["folded_identity"]


def test_hub_subject_offline_is_unavailable_quickly(tmp_path):
    """A named hub subject and a ``tl:NAME`` one, offline with an empty HF cache: unavailable
    with the reason (the repo named), and ``python -m harness.models.availability`` says so
    without loading anything (exit 3), as ``nox -s sweep`` asks it."""
    out = _child("""
        import contextlib, io, json, time
        from harness.models import availability
        from harness.models.subjects import parse_subject, SubjectUnavailable
        from harness.models.loaders import load_subject
        report = {}
        for name in ("gpt2-small", "tl:pythia-70m"):
            t = time.perf_counter()
            try:
                load_subject(parse_subject(name))
                report[name] = {"raised": None}
            except SubjectUnavailable as exc:
                report[name] = {"raised": "SubjectUnavailable", "msg": str(exc),
                                "seconds": time.perf_counter() - t}
        lines = io.StringIO()
        with contextlib.redirect_stdout(lines):
            report["cli"] = availability.main(["tl:pythia-70m", "ladder:solu-1l"])
        report["cli_lines"] = lines.getvalue().splitlines()
        print(json.dumps(report))
    """, tmp_path / "empty-hf")
    for name, repo in (("gpt2-small", "repo gpt2)"), ("tl:pythia-70m", "repo EleutherAI/pythia-70m")):
        assert out[name]["raised"] == "SubjectUnavailable", name
        msg = out[name]["msg"]
        assert "hub" in msg and repo in msg and "--subject PATH" in msg and "\n" not in msg
    assert out["cli"] == 3
    assert out["cli_lines"][0].startswith("tl:pythia-70m: unavailable: tl:pythia-70m: weights come")
    assert out["cli_lines"][1] == "ladder:solu-1l: available"


def test_tl_names_resolve_through_transformer_lens():
    """``tl:NAME`` accepts what TL's own alias table accepts, in any case, names the subject by
    TL's default alias, is the named subject where there is one, and names close matches."""
    for text in ("tl:pythia-70m", "tl:Pythia-70M", "tl:EleutherAI/pythia-70m"):
        spec = parse_subject(text)
        assert (spec.name, spec.kind, spec.source) == ("tl:pythia-70m", "hub", "EleutherAI/pythia-70m")
    assert parse_subject("tl:gpt2").name == "gpt2-small"  # TL's alias gpt2-small -> repo gpt2
    assert parse_subject("tl:solu-1l") == parse_subject("solu-1l")
    twin = parse_subject("tl:gelu-2l:random", seed=4)
    assert twin.random_init and twin.id == "tl:gelu-2l:random" and twin.init_seed == 4
    assert parse_subject("tl:Qwen/Qwen2.5-0.5B").id == "tl:qwen2.5-0.5b"
    with pytest.raises(SubjectError, match=r"unknown subject tl:gpt2-smal: .*closest: tl:gpt2-small"):
        parse_subject("tl:gpt2-smal")
    with pytest.raises(SubjectError, match="not hosted on the hub"):
        parse_subject("tl:llama-7b-hf")


def test_tl_subjects_load_through_from_pretrained_on_standins(tmp_path):
    """``tl:gpt2-medium`` (a GPT-2 stand-in in a private HF cache) and ``tl:solu-1l`` (Neel's
    format) load offline through TL's own from_pretrained. SoLU loads offline because the
    hub path lists the cached snapshot when TL's repo listing cannot reach the hub (TL alone
    fails there: test_standins); the listing is TL's own again afterwards."""
    hf_home = tmp_path / "hf"
    install_in_hub_cache(hf_home, "gpt2-medium", make_gpt2_checkpoint(tmp_path / "gpt2m", seed=8))
    solu = make_solu_hub_standin(hf_home, "solu-1l", seed=9)
    out = _child(f"""
        import dataclasses, json, torch, huggingface_hub
        from transformers import GPT2LMHeadModel
        from transformer_lens import loading_from_pretrained as loading
        from harness.models import availability
        from harness.models.subjects import parse_subject, RAW
        from harness.models.loaders import load_subject, hub_identity
        tokens = torch.tensor({TOKENS.tolist()})
        spec = dataclasses.replace(parse_subject("tl:gpt2-medium"), processing=RAW)
        loaded = load_subject(spec)
        with torch.no_grad():
            ours = loaded.model(tokens)
            ref = GPT2LMHeadModel.from_pretrained("gpt2-medium").eval()(tokens).logits
        solu = load_subject(dataclasses.replace(parse_subject("tl:solu-1l"), processing=RAW))
        written = torch.load({str(solu["state_dict_path"])!r}, map_location="cpu")
        got = solu.model.state_dict()
        twin = load_subject(parse_subject("tl:gpt2-medium:random", seed=1))
        print(json.dumps({{
            "diff": (ours - ref).abs().max().item(), "id": loaded.spec.id,
            "layers": loaded.model.cfg.n_layers, "hash": loaded.weight_hash,
            "identity": hub_identity(spec),
            "solu_id": solu.spec.id, "solu_act": solu.model.cfg.act_fn,
            "solu_mismatched": sorted(k for k in written if not torch.equal(got[k], written[k])),
            "twin_layers": twin.model.cfg.n_layers, "twin_differs": twin.weight_hash != loaded.weight_hash,
            "listing_restored": loading.HfApi is huggingface_hub.HfApi,
            "status": [availability.status(n) for n in ("tl:gpt2-medium", "tl:solu-1l", "tl:gelu-1l")],
        }}))
    """, hf_home)
    assert out["id"] == "tl:gpt2-medium" and out["layers"] == 2 and out["diff"] < STANDIN_ATOL
    assert out["hash"] == out["identity"]
    assert out["solu_id"] == "solu-1l" and out["solu_act"] == "solu_ln" and out["solu_mismatched"] == []
    assert out["twin_layers"] == 2 and out["twin_differs"]
    assert out["listing_restored"]
    assert [code for code, _ in out["status"]] == [0, 0, 3]
    assert SOLU_STATE_DICT_FILE in str(solu["state_dict_path"])


@pytest.mark.slow
def test_smollm2_logits_match_hf(run_state):
    """The default subject: TL conversion of the dequantized GGUF vs transformers' own model.

    Tolerance 5e-4 absolute on logits of magnitude ~30 (about 1e-5 relative): float32 op-order
    differences accumulated over 30 layers; measured 4.7e-5 when this was written.
    """
    spec = dataclasses.replace(parse_subject("smollm2-135m"), processing=RAW)
    start = time.perf_counter()
    hf, tok = run_state.store.hf_model(spec)  # shared with the claims' subject in this process
    model, _ = loaders.hooked_from_hf(hf, tok, spec)
    tokens = model.to_tokens("The quick brown fox jumps over the lazy dog. 3 + 4 = 7")
    with torch.no_grad():
        logits = model(tokens)
        diff = (logits - hf(tokens).logits).abs().max().item()
        with decode_layouts(model):  # generation's weight layout: the same bits on this model
            assert torch.equal(model(tokens), logits)
    assert diff < 5e-4, f"max |logit diff| {diff} (load {time.perf_counter() - start:.0f}s)"
    assert model.cfg.n_layers == 30 and model.cfg.d_model == 576 and model.cfg.d_mlp == 1536
    assert model.cfg.gated_mlp and model.cfg.normalization_type == "RMS"


@pytest.mark.slow
def test_gguf_subject_loads_from_its_cached_hf_copy(run_state, monkeypatch):
    """The session loaded the default subject through the content cache (a cold run wrote the
    entry, checked against the GGUF's own conversion): a second load reads it without parsing
    the GGUF, and a copy that no longer loads as the GGUF's conversion is an error."""
    spec = parse_subject("smollm2-135m")
    run_state.store.hf_model(spec)  # the session's load: writes the entry on a cold cache
    monkeypatch.setattr(loaders, "_load_hf_direct", lambda s: pytest.fail("parsed the GGUF again"))
    hf, tok = loaders.load_hf(spec, run_state.cache_dir)
    assert hf.config.num_hidden_layers == 30 and tok("Hello")["input_ids"]
    monkeypatch.setattr(loaders, "_probe_ids", lambda tokenizer: [[0]])
    with pytest.raises(loaders.SubjectError, match="does not load as the GGUF's own conversion"):
        loaders.load_hf(spec, run_state.cache_dir)


@pytest.mark.parametrize(
    ("exc", "unavailable"),
    [
        (OSError("no route to host"), True),
        (ConnectionError("offline"), True),
        (FileNotFoundError("config.json"), True),
        (ImportError("no module named x"), True),
        (RuntimeError("Error(s) in loading state_dict for HookedTransformer"), False),
        (ValueError("a TransformerLens bug"), False),
        (KeyError("blocks.0.attn.W_Q"), False),
    ],
    ids=lambda x: type(x).__name__ if isinstance(x, BaseException) else str(x),
)
def test_only_a_missing_network_file_or_package_is_unavailable(exc, unavailable):
    """A state-dict mismatch or a library bug in a hub load is an error, not 'unavailable'
    (the loaders caught RuntimeError and ValueError as unavailable before)."""
    spec = parse_subject("gpt2-small")

    def boom(*args, **kwargs):
        raise exc

    if unavailable:
        with pytest.raises(SubjectUnavailable, match=type(exc).__name__):
            loaders._hub_call(spec, boom)
    else:
        with pytest.raises(type(exc)):
            loaders._hub_call(spec, boom)


@pytest.mark.parametrize("gated", [False, True], ids=["ln-gelu", "rms-gated"])
@pytest.mark.parametrize("processing", ["default", "raw"])
def test_loading_at_once_equals_transformer_lens_key_by_key(gated, processing):
    """harness.models.loaders.load_and_process_at_once leaves the same bits in every parameter
    and buffer as TransformerLens' own load_and_process_state_dict (one key at a time)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from harness.models.subjects import DEFAULT_PROCESSING

    cfg = HookedTransformerConfig(n_layers=2, d_model=16, n_ctx=8, d_head=4, n_heads=4, d_mlp=24,
                                  d_vocab=40, act_fn="silu" if gated else "gelu", gated_mlp=gated,
                                  normalization_type="RMS" if gated else "LN", seed=3)
    source = HookedTransformer(cfg)
    kwargs = (DEFAULT_PROCESSING if processing == "default" else RAW).as_kwargs()
    ours, theirs = HookedTransformer(cfg.to_dict() | {"seed": 4}), HookedTransformer(cfg.to_dict() | {"seed": 5})
    loaders.load_and_process_at_once(ours, {k: v.clone() for k, v in source.state_dict().items()}, **kwargs)
    theirs.load_and_process_state_dict({k: v.clone() for k, v in source.state_dict().items()}, **kwargs)
    assert "load_state_dict" not in vars(ours)  # the shadowing attribute is gone
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and ours.cfg.normalization_type == theirs.cfg.normalization_type
    for k in a:
        assert torch.equal(a[k], b[k]), k
