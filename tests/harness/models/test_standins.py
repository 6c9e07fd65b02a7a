"""The stand-in checkpoints load through transformer-lens' real ``from_pretrained`` path.

huggingface_hub reads ``HF_HOME``/``HF_HUB_OFFLINE`` when it is imported, so every load
runs in a child interpreter whose environment is set before any import. One child loads
everything from the stand-in cache and writes a JSON report; a second one, started first
so the two overlap, tries the same loads against an empty ``HF_HOME``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.standins import (
    EOT,
    SOLU_REPOS,
    SOLU_STATE_DICT_FILE,
    SOLU_TOKENIZER_REPO,
    hub_repo_dir,
    install_in_hub_cache,
    make_gpt2_checkpoint,
    make_llama_checkpoint,
    make_solu_hub_standin,
    solu_state_dict_keys,
    train_tokenizer,
)

ROOT = Path(__file__).resolve().parents[3]
LLAMA_REPO = "HuggingFaceTB/SmolLM2-135M"  # the stand-in poses as this repo id
CHILD_TIMEOUT_S = 240
TEXT = "When Mary and John went to the store, John gave a drink to Mary. 1732 to 17"

# Runs in the child. Prints TL's chatter to its own stdout; the report goes to argv[1].
_PRELUDE = r"""
import contextlib, inspect, io, json, sys, time, traceback, warnings
sys.path.insert(0, ROOT)
report = {"events": []}

def describe(exc):
    chain, e = [], exc
    while e is not None:
        chain.append(f"{type(e).__module__}.{type(e).__qualname__}")
        e = e.__cause__ or e.__context__
    return {"type": chain[0], "message": str(exc), "chain": chain,
            "is_oserror": isinstance(exc, OSError),
            "tail": traceback.format_exception(exc)[-1].strip()}

def attempt(name, fn):
    out, t = io.StringIO(), time.perf_counter()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out):
        warnings.simplefilter("always")
        try:
            value, error = fn(), None
        except Exception as exc:
            value, error = None, describe(exc)
    report[name] = {
        "seconds": round(time.perf_counter() - t, 3),
        "error": error,
        "stdout": out.getvalue(),
        "warnings": sorted({f"{w.category.__name__}: {str(w.message)[:100]}" for w in caught}),
    }
    return value

t0 = time.perf_counter()
import torch
import transformers
import huggingface_hub
import transformer_lens
from transformer_lens import HookedTransformer
from transformer_lens.loading_from_pretrained import get_official_model_name
import transformer_lens.utilities.hf_utils as tl_hf_utils
import transformers.utils.hub as tf_hub
report["import_seconds"] = round(time.perf_counter() - t0, 3)
report["hf_hub_cache"] = huggingface_hub.constants.HF_HUB_CACHE
report["offline"] = huggingface_hub.constants.is_offline_mode()
report["official"] = {n: get_official_model_name(n) for n in ["gpt2-small", "solu-1l", "solu-2l"]}

# Record every file request: transformers funnels its Hub reads through cached_files, TL's
# Neel loader through its module-level hf_hub_download (signature kept: TL filters kwargs
# by it), and the NeelNanda file listing through HfApi.list_repo_files.
def _record(kind, repo, files, outcome):
    report["events"].append([kind, repo, files, outcome])

_orig_cached_files = tf_hub.cached_files
def _cached_files(path_or_repo_id, filenames, *args, **kwargs):
    try:
        out = _orig_cached_files(path_or_repo_id, filenames, *args, **kwargs)
    except Exception as exc:
        _record("transformers", path_or_repo_id, list(filenames), type(exc).__name__)
        raise
    _record("transformers", path_or_repo_id, list(filenames), "ok" if out else "absent")
    return out
tf_hub.cached_files = _cached_files

_orig_hub_download = tl_hf_utils.hf_hub_download
def _hub_download(*args, **kwargs):
    repo = kwargs.get("repo_id", args[0] if args else None)
    name = kwargs.get("filename", args[1] if len(args) > 1 else None)
    try:
        out = _orig_hub_download(*args, **kwargs)
    except Exception as exc:
        _record("tl.hf_hub_download", repo, [name], type(exc).__name__)
        raise
    _record("tl.hf_hub_download", repo, [name], "ok")
    return out
_hub_download.__signature__ = inspect.signature(_orig_hub_download)
tl_hf_utils.hf_hub_download = _hub_download

_orig_list = huggingface_hub.HfApi.list_repo_files
def _list_repo_files(self, repo_id, *args, **kwargs):
    try:
        out = _orig_list(self, repo_id, *args, **kwargs)
    except Exception as exc:
        _record("HfApi.list_repo_files", repo_id, [], type(exc).__name__)
        raise
    _record("HfApi.list_repo_files", repo_id, out, "ok")
    return out
huggingface_hub.HfApi.list_repo_files = _list_repo_files
"""

_MAIN = r"""
def gpt2():
    tokens = torch.tensor([TOKENS])
    m = HookedTransformer.from_pretrained(
        "gpt2-small", fold_ln=False, center_writing_weights=False, center_unembed=False)
    hf = transformers.GPT2LMHeadModel.from_pretrained("gpt2")
    hf_tok = transformers.AutoTokenizer.from_pretrained("gpt2")
    with torch.no_grad():
        ref = hf(tokens).logits
        tl = m(tokens)
        tl_default = HookedTransformer.from_pretrained("gpt2-small")(tokens)
        tl_noproc = HookedTransformer.from_pretrained_no_processing("gpt2-small")(tokens)
    ls = lambda x: x.log_softmax(-1)
    return {
        "class": type(m).__qualname__,
        "cfg": {k: getattr(m.cfg, k) for k in [
            "n_layers", "d_model", "n_heads", "d_head", "d_mlp", "n_ctx", "d_vocab",
            "act_fn", "normalization_type", "original_architecture", "tokenizer_name",
            "model_name", "default_prepend_bos"]},
        "logits_shape": list(tl.shape),
        "max_abs_diff": (tl - ref).abs().max().item(),
        "max_abs_diff_no_processing": (tl_noproc - ref).abs().max().item(),
        "max_abs_diff_logprobs_default_processing": (ls(tl_default) - ls(ref)).abs().max().item(),
        "tokenizer_class": type(m.tokenizer).__qualname__,
        "tl_to_tokens": m.to_tokens(TEXT)[0].tolist(),
        "hf_tokens": hf_tok(TEXT)["input_ids"],
        "hf_bos": hf_tok.bos_token_id,
    }

report["gpt2_value"] = attempt("gpt2", gpt2)
n_events = len(report["events"])
report["solu_unpatched_value"] = attempt(
    "solu_unpatched", lambda: type(HookedTransformer.from_pretrained("solu-1l")).__name__)

from tests.standins import install_offline_list_repo_files_fallback
install_offline_list_repo_files_fallback()

def solu(name):
    def run():
        state_dict = torch.load(SOLU_PATHS[name], map_location="cpu")
        m = HookedTransformer.from_pretrained_no_processing(name)
        loaded = {k: v for k, v in m.state_dict().items() if k in dict(m.named_parameters())}
        tokens = m.to_tokens(TEXT)[:, :24]
        with torch.no_grad():
            logits = m(tokens)
            processed = HookedTransformer.from_pretrained(name)(tokens)
        return {
            "class": type(m).__qualname__,
            "cfg": {k: getattr(m.cfg, k) for k in [
                "n_layers", "d_model", "n_heads", "d_head", "d_mlp", "n_ctx", "d_vocab",
                "act_fn", "normalization_type", "original_architecture", "tokenizer_name",
                "positional_embedding_type", "model_name", "eps", "attn_only"]},
            "param_keys": sorted(loaded),
            "written_keys": sorted(state_dict),
            "mismatched": sorted(k for k in state_dict
                                 if k not in loaded or not torch.equal(loaded[k], state_dict[k])),
            "tokenizer_class": type(m.tokenizer).__qualname__,
            "tokens": tokens.tolist(),
            "digits": m.tokenizer.tokenize("1732"),
            "logits": logits.tolist(),
            "logits_processed": processed.tolist(),
        }
    return run

for name in SOLU_PATHS:
    report[name + "_value"] = attempt(name, solu(name))

def llama():
    tokens = torch.tensor([TOKENS])
    m = transformers.AutoModelForCausalLM.from_pretrained(LLAMA_REPO)
    direct = transformers.LlamaForCausalLM.from_pretrained(LLAMA_DIR)
    tok = transformers.AutoTokenizer.from_pretrained(LLAMA_REPO)
    with torch.no_grad():
        diff = (m(tokens).logits - direct(tokens).logits).abs().max().item()
    return {
        "class": type(m).__qualname__,
        "num_attention_heads": m.config.num_attention_heads,
        "num_key_value_heads": m.config.num_key_value_heads,
        "tie_word_embeddings": m.config.tie_word_embeddings,
        "tied": m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr(),
        "max_abs_diff_vs_local_dir": diff,
        "bos": [tok.bos_token, tok.bos_token_id],
    }

report["llama_value"] = attempt("llama", llama)
"""

_EMPTY = r"""
report["gpt2_value"] = attempt("gpt2", lambda: HookedTransformer.from_pretrained("gpt2-small"))
report["solu_value"] = attempt("solu", lambda: HookedTransformer.from_pretrained("solu-1l"))
report["hf_value"] = attempt(
    "hf", lambda: transformers.AutoModelForCausalLM.from_pretrained("gpt2"))
"""

_WRITE = r"""
for k in [k for k in report if k.endswith("_value") and not isinstance(report[k], (dict, str, type(None)))]:
    report[k] = repr(report[k])
report["total_seconds"] = round(time.perf_counter() - t0, 3)
with open(sys.argv[1], "w") as fh:
    json.dump(report, fh)
"""


def _child_code(body: str, **consts: object) -> str:
    header = "".join(f"{k} = {v!r}\n" for k, v in {"ROOT": str(ROOT), **consts}.items())
    return header + textwrap.dedent(_PRELUDE) + textwrap.dedent(body) + textwrap.dedent(_WRITE)


def _start_child(code: str, hf_home: Path, out: Path) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_ENDPOINT"):
        env.pop(var, None)
    return subprocess.Popen(
        [sys.executable, "-c", code, str(out)],
        env=env,
        cwd=str(ROOT),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish_child(proc: subprocess.Popen[str], out: Path) -> dict:
    try:
        stdout, stderr = proc.communicate(timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f"child timed out\nstdout:\n{stdout}\nstderr:\n{stderr[-4000:]}")
    if proc.returncode != 0 or not out.exists():
        pytest.fail(
            f"child failed ({proc.returncode})\nstdout:\n{stdout}\nstderr:\n{stderr[-4000:]}"
        )
    report = json.loads(out.read_text())
    report["_stdout"], report["_stderr"] = stdout, stderr
    return report


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    import torch

    base = tmp_path_factory.mktemp("standins")
    timings: dict[str, float] = {}

    empty_home = base / "empty_hf_home"
    empty_home.mkdir()
    t = time.perf_counter()
    empty_proc = _start_child(_child_code(_EMPTY), empty_home, base / "empty.json")

    try:
        hf_home = base / "hf_home"
        rng_before = torch.random.get_rng_state()
        t_build = time.perf_counter()
        gpt2_dir = make_gpt2_checkpoint(base / "build" / "gpt2", seed=0)
        llama_dir = make_llama_checkpoint(base / "build" / "llama", seed=0)
        solu = {
            name: make_solu_hub_standin(hf_home, name, seed=i) for i, name in enumerate(SOLU_REPOS)
        }
        rng_after = torch.random.get_rng_state()
        gpt2_snapshot = install_in_hub_cache(hf_home, "gpt2", gpt2_dir)
        install_in_hub_cache(hf_home, LLAMA_REPO, llama_dir)
        timings["build"] = time.perf_counter() - t_build

        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(gpt2_dir))
        tokens = [tok.bos_token_id, *tok(TEXT)["input_ids"]][:16]

        t_main = time.perf_counter()
        main_code = _child_code(
            _MAIN,
            TEXT=TEXT,
            TOKENS=tokens,
            LLAMA_REPO=LLAMA_REPO,
            LLAMA_DIR=str(llama_dir),
            SOLU_PATHS={name: str(info["state_dict_path"]) for name, info in solu.items()},
        )
        main = _finish_child(
            _start_child(main_code, hf_home, base / "main.json"), base / "main.json"
        )
        timings["main_child"] = time.perf_counter() - t_main
    except BaseException:
        empty_proc.kill()
        empty_proc.communicate()
        raise
    empty = _finish_child(empty_proc, base / "empty.json")
    timings["total"] = time.perf_counter() - t
    return {
        "main": main,
        "empty": empty,
        "solu": solu,
        "hf_home": hf_home,
        "gpt2_snapshot": gpt2_snapshot,
        "rng_unchanged": torch.equal(rng_before, rng_after),
        "timings": timings,
    }


def _solu_reference_logits(state_dict: dict, cfg: dict, tokens: list[list[int]]):
    """An independent float64 forward pass of a "neel" SoLU model (pre-LN, solu_ln MLP)."""
    import torch
    import torch.nn.functional as F

    sd = {k: v.double() for k, v in state_dict.items()}
    toks = torch.tensor(tokens)
    n_pos, eps = toks.shape[1], 1e-5

    def ln(x, prefix):
        return F.layer_norm(x, x.shape[-1:], sd[prefix + ".w"], sd[prefix + ".b"], eps)

    x = sd["embed.W_E"][toks] + sd["pos_embed.W_pos"][:n_pos]
    causal = torch.ones(n_pos, n_pos, dtype=torch.bool).tril()
    for layer in range(cfg["n_layers"]):
        p = f"blocks.{layer}."
        h = ln(x, p + "ln1")
        q, k, v = (
            torch.einsum("bpd,hde->bphe", h, sd[p + f"attn.W_{c}"]) + sd[p + f"attn.b_{c}"]
            for c in "QKV"
        )
        scores = torch.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(cfg["d_head"])
        pattern = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        z = torch.einsum("bhqk,bkhe->bqhe", pattern, v)
        x = x + torch.einsum("bqhe,hed->bqd", z, sd[p + "attn.W_O"]) + sd[p + "attn.b_O"]
        pre = ln(x, p + "ln2") @ sd[p + "mlp.W_in"] + sd[p + "mlp.b_in"]
        post = ln(pre * pre.softmax(-1), p + "mlp.ln")
        x = x + post @ sd[p + "mlp.W_out"] + sd[p + "mlp.b_out"]
    return ln(x, "ln_final") @ sd["unembed.W_U"] + sd["unembed.b_U"]


# ----------------------------------------------------------------------------- builders


def test_tokenizer_is_deterministic_and_gpt2_style(tmp_path: Path) -> None:
    a = train_tokenizer(tmp_path / "a", vocab_size=300, seed=0)
    train_tokenizer(tmp_path / "b", vocab_size=300, seed=0)
    digest = {
        d: hashlib.sha256((tmp_path / d / "tokenizer.json").read_bytes()).hexdigest() for d in "ab"
    }
    assert digest["a"] == digest["b"]
    files = {p.name for p in (tmp_path / "a").iterdir()}
    assert {"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"} <= files
    assert len(a) == 300
    assert a.bos_token == a.eos_token == a.unk_token == EOT
    assert a.convert_tokens_to_ids(EOT) == 299  # last id, as GPT-2's 50256
    vocab = json.loads((tmp_path / "a" / "vocab.json").read_text())
    assert vocab[EOT] == 299 and len(vocab) == 300
    assert (
        json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())["tokenizer_class"]
        == "GPT2Tokenizer"
    )
    ids = a("Mary gave 1732 drinks")["input_ids"]
    assert a.decode(ids) == "Mary gave 1732 drinks"
    from transformers import GPT2TokenizerFast

    assert (
        GPT2TokenizerFast.from_pretrained(str(tmp_path / "a"))("Mary")["input_ids"]
        == a("Mary")["input_ids"]
    )


def test_builders_leave_global_rng_alone(runs: dict) -> None:
    assert runs["rng_unchanged"]


def test_hub_cache_layout(runs: dict) -> None:
    repo = hub_repo_dir(runs["hf_home"], "gpt2")
    assert repo.name == "models--gpt2"
    commit = (repo / "refs" / "main").read_text()
    assert len(commit) == 40 and int(commit, 16) >= 0
    snap = runs["gpt2_snapshot"]
    assert snap == repo / "snapshots" / commit
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.json"} <= {
        p.name for p in snap.iterdir()
    }
    assert all((snap / n).resolve().parent == repo / "blobs" for n in ("config.json",))
    assert json.loads((snap / "config.json").read_text())["n_ctx"] == 64
    neel = hub_repo_dir(runs["hf_home"], SOLU_TOKENIZER_REPO)
    assert neel.name == "models--NeelNanda--gpt-neox-tokenizer-digits"


def test_child_ran_offline_on_the_standin_cache(runs: dict) -> None:
    main = runs["main"]
    assert main["offline"] is True
    assert main["hf_hub_cache"] == str(runs["hf_home"] / "hub")
    assert main["official"] == {
        "gpt2-small": "gpt2",
        "solu-1l": SOLU_REPOS["solu-1l"][0],
        "solu-2l": SOLU_REPOS["solu-2l"][0],
    }


# ----------------------------------------------------------------------------- gpt2-small


def test_gpt2_small_loads_and_matches_hf(runs: dict) -> None:
    main = runs["main"]
    assert main["gpt2"]["error"] is None, main["gpt2"]["error"]
    g = main["gpt2_value"]
    assert g["class"] == "HookedTransformer"
    assert g["cfg"]["original_architecture"] == "GPT2LMHeadModel"
    assert g["cfg"]["tokenizer_name"] == "gpt2"
    assert (g["cfg"]["n_layers"], g["cfg"]["d_model"], g["cfg"]["n_heads"]) == (2, 64, 4)
    assert (g["cfg"]["n_ctx"], g["cfg"]["d_vocab"], g["cfg"]["d_mlp"]) == (64, 300, 256)
    assert g["max_abs_diff"] < 1e-4
    assert g["max_abs_diff_no_processing"] < 1e-4
    # Default processing (fold_ln, centring) changes logits only by a per-position constant.
    assert g["max_abs_diff_logprobs_default_processing"] < 1e-4
    # TL prepends BOS (<|endoftext|>) itself; the HF tokenizer does not.
    assert g["tl_to_tokens"] == [g["hf_bos"], *g["hf_tokens"]]
    assert "Loaded pretrained model gpt2-small into HookedTransformer" in main["gpt2"]["stdout"]


def test_gpt2_small_files_requested(runs: dict) -> None:
    events = runs["main"]["events"]
    gpt2 = {
        (kind, f, outcome) for kind, repo, files, outcome in events if repo == "gpt2" for f in files
    }
    found = {f for _, f, outcome in gpt2 if outcome == "ok"}
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= found, gpt2


# ----------------------------------------------------------------------------- solu


def test_solu_offline_needs_the_list_repo_files_fallback(runs: dict) -> None:
    err = runs["main"]["solu_unpatched"]["error"]
    assert err is not None
    assert err["type"] == "huggingface_hub.errors.OfflineModeIsEnabled"
    assert err["is_oserror"]


@pytest.mark.parametrize("name", list(SOLU_REPOS))
def test_solu_loads_exactly_what_was_written(runs: dict, name: str) -> None:
    import torch

    main = runs["main"]
    assert main[name]["error"] is None, main[name]["error"]
    s = main[name + "_value"]
    info = runs["solu"][name]
    cfg = info["config"]
    assert s["class"] == "HookedTransformer"
    assert s["cfg"]["original_architecture"] == "neel"
    assert s["cfg"]["tokenizer_name"] == SOLU_TOKENIZER_REPO
    assert s["cfg"]["act_fn"] == "solu_ln"
    assert s["cfg"]["positional_embedding_type"] == "standard"
    assert s["cfg"]["model_name"] == info["repo_id"].split("/")[1]
    for key in ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "n_ctx", "d_vocab"):
        assert s["cfg"][key] == cfg[key], key
    assert s["tokenizer_class"] == "GPTNeoXTokenizer"
    assert s["digits"] == ["1", "7", "3", "2"]
    # strict=False loading would silently drop misnamed keys: check names and values.
    assert s["written_keys"] == s["param_keys"] == sorted(solu_state_dict_keys(cfg["n_layers"]))
    assert s["mismatched"] == []

    state_dict = torch.load(info["state_dict_path"], map_location="cpu")
    ref = _solu_reference_logits(state_dict, cfg, s["tokens"])
    logits = torch.tensor(s["logits"], dtype=torch.float64)
    assert logits.shape == (1, len(s["tokens"][0]), cfg["d_vocab"])
    assert (logits - ref).abs().max().item() < 1e-4
    processed = torch.tensor(s["logits_processed"], dtype=torch.float64)
    diff = (processed.log_softmax(-1) - ref.log_softmax(-1)).abs().max().item()
    assert diff < 1e-4


def test_solu_files_requested(runs: dict) -> None:
    events = runs["main"]["events"]
    repo = SOLU_REPOS["solu-1l"][0]
    mine = [(kind, files, outcome) for kind, r, files, outcome in events if r == repo]
    assert ("tl.hf_hub_download", ["config.json"], "ok") in mine
    assert ("tl.hf_hub_download", [SOLU_STATE_DICT_FILE], "ok") in mine
    assert any(k == "HfApi.list_repo_files" and o == "OfflineModeIsEnabled" for k, _, o in mine)


# ----------------------------------------------------------------------------- llama


def test_llama_standin_resolves_from_the_cache(runs: dict) -> None:
    main = runs["main"]
    assert main["llama"]["error"] is None, main["llama"]["error"]
    m = main["llama_value"]
    assert m["class"] == "LlamaForCausalLM"
    assert m["num_key_value_heads"] < m["num_attention_heads"]
    assert m["tie_word_embeddings"] and m["tied"]
    assert m["max_abs_diff_vs_local_dir"] == 0.0
    assert m["bos"] == [EOT, 0]


# ----------------------------------------------------------------------------- nothing cached


def test_empty_cache_offline_raises_oserror(runs: dict) -> None:
    empty = runs["empty"]
    for name in ("gpt2", "solu", "hf"):
        err = empty[name]["error"]
        assert err is not None, name
        assert err["is_oserror"], err
    assert empty["gpt2"]["error"]["type"] == "builtins.OSError"
    assert "huggingface_hub.errors.LocalEntryNotFoundError" in empty["gpt2"]["error"]["chain"]
    assert empty["solu"]["error"]["type"] == "huggingface_hub.errors.LocalEntryNotFoundError"


def test_report(runs: dict) -> None:
    """Not a check: prints what the suite needs to know (visible with -s or -rA)."""
    main, empty = runs["main"], runs["empty"]
    timings = {k: round(v, 1) for k, v in runs["timings"].items()}
    lines = [f"timings: {timings}"]
    lines.append(f"child import {main['import_seconds']}s, total {main['total_seconds']}s")
    for name in ("gpt2", "solu_unpatched", "solu-1l", "solu-2l", "llama"):
        r = main[name]
        lines.append(f"{name}: {r['seconds']}s err={r['error'] and r['error']['tail']}")
        lines.append(f"  stdout={r['stdout']!r} warnings={r['warnings']}")
    for name in ("gpt2", "solu", "hf"):
        lines.append(f"empty {name}: {empty[name]['error']}")
    seen = sorted({(k, r, tuple(f), o) for k, r, f, o in main["events"]})
    lines += [f"  request {e}" for e in seen]
    print("\n".join(lines))
