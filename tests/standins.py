"""Locally built stand-ins for the sources' models, laid out where the Hub loaders look.

The suite loads ``gpt2-small``, ``solu-1l`` and ``solu-2l`` through transformer-lens'
real pretrained loading (``HookedTransformer.from_pretrained``). Offline that fails, so
this module builds tiny random-weight models with the same *format* as the real ones and
installs them in a huggingface_hub cache, so the unmodified loading path can be run with
``HF_HOME=<dir> HF_HUB_OFFLINE=1``.

What transformer-lens 3.9 requests (read from ``transformer_lens/loading_from_pretrained.py``):

* ``gpt2-small`` -> official name ``gpt2`` (Hub repo ``gpt2``, cache folder ``models--gpt2``).
  ``AutoConfig.from_pretrained("gpt2")`` (``config.json``; TL reads ``hf_config.n_ctx``, which
  transformers 5's ``GPT2Config`` no longer defines by default, so ``config.json`` must carry
  it, as the real one does), ``AutoModelForCausalLM.from_pretrained("gpt2")``
  (``model.safetensors``, ``generation_config.json``) and
  ``AutoTokenizer.from_pretrained("gpt2", add_bos_token=True)``.
* ``solu-1l`` / ``solu-2l`` -> ``NeelNanda/SoLU_1L512W_C4_Code`` /
  ``NeelNanda/SoLU_2L512W_C4_Code`` (architecture ``"neel"``; the ``*_old`` repos are the
  ``solu-*-old`` aliases). TL downloads ``./config.json`` (Neel's own format, via
  ``hf_hub_download(..., subfolder=".")``), calls ``HfApi().list_repo_files(repo)`` and
  downloads the first file ending in ``final.pth``: a HookedTransformer-format state dict,
  loaded with ``strict=False`` (misnamed keys are silently ignored). The tokenizer is
  ``AutoTokenizer.from_pretrained(cfg["tokenizer_name"])``, i.e.
  ``NeelNanda/gpt-neox-tokenizer-digits``.

``HfApi.list_repo_files`` is an API call that has no cache fallback: with
``HF_HUB_OFFLINE=1`` it raises ``OfflineModeIsEnabled`` even when every file is cached, so
the SoLU path cannot load offline as is. :func:`install_offline_list_repo_files_fallback`
is the one, opt-in, shim for that (it lists the cached snapshot instead).

Importing this module has no side effects and imports nothing heavy: huggingface_hub
reads ``HF_HOME``/``HF_HUB_OFFLINE`` once, at its own import, so nothing here imports it
at module level.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerFast

EOT = "<|endoftext|>"

#: TL alias -> (official Hub repo, n_layers). Checked against TL's own alias table by the tests.
SOLU_REPOS: dict[str, tuple[str, int]] = {
    "solu-1l": ("NeelNanda/SoLU_1L512W_C4_Code", 1),
    "solu-2l": ("NeelNanda/SoLU_2L512W_C4_Code", 2),
}
SOLU_TOKENIZER_REPO = "NeelNanda/gpt-neox-tokenizer-digits"
#: TL picks the first repo file ending in "final.pth"; the name before that is ours.
SOLU_STATE_DICT_FILE = "model_final.pth"

__all__ = [
    "EOT",
    "SOLU_REPOS",
    "SOLU_STATE_DICT_FILE",
    "SOLU_TOKENIZER_REPO",
    "corpus",
    "hub_repo_dir",
    "install_in_hub_cache",
    "install_offline_list_repo_files_fallback",
    "make_gpt2_checkpoint",
    "make_llama_checkpoint",
    "make_solu_hub_standin",
    "solu_state_dict_keys",
    "train_tokenizer",
]


# --------------------------------------------------------------------------- corpus


_NAMES = ["Mary", "John", "Alice", "Bob", "Tom", "James", "Sarah", "Anna", "David", "Laura"]
_PLACES = ["store", "garden", "school", "park", "office", "station", "market", "library"]
_OBJECTS = ["drink", "book", "ring", "letter", "basketball", "computer", "snack", "kiss"]
_NOUNS = ["war", "expedition", "drought", "dynasty", "strike", "siege", "pilgrimage"]
_WORDS = (  # noqa: SIM905
    "the of and to in is was for on that with as by at from it an be this which or are have "
    "not but had they his her one all were there when more some can would what time could "
    "about into other than then only also after first two new years people state very"
).split()
_OPS = ["+", "-", "*", "//", "%", "**"]


def corpus(seed: int = 0, n_lines: int = 400) -> list[str]:
    """A deterministic text corpus (prose, IOI-like, year-span, arithmetic and code lines).

    Built from fixed templates with ``random.Random(seed)`` only, so it does not depend on
    the Python version's docstrings or on any global state.
    """
    rng = random.Random(seed)
    lines: list[str] = []
    for i in range(n_lines):
        kind = i % 6
        if kind == 0:
            a, b = rng.sample(_NAMES, 2)
            lines.append(
                f"When {a} and {b} went to the {rng.choice(_PLACES)}, "
                f"{b} gave a {rng.choice(_OBJECTS)} to {a}."
            )
        elif kind == 1:
            century = rng.randrange(11, 20)
            year = rng.randrange(2, 98)
            lines.append(
                f"The {rng.choice(_NOUNS)} lasted from the year {century}{year:02d} "
                f"to the year {century}{rng.randrange(year + 1, 100):02d}."
            )
        elif kind == 2:
            x, y = rng.randrange(1000), rng.randrange(1000)
            lines.append(f"{x} + {y} = {x + y}, and {x} * {y % 10} = {x * (y % 10)}.")
        elif kind == 3:
            fn = "_".join(rng.sample(_WORDS, 2))
            op = rng.choice(_OPS)
            lines.append(f"def {fn}(x, y):\n    return x {op} y  # {rng.choice(_WORDS)}")
        elif kind == 4:
            words = [rng.choice(_WORDS) for _ in range(rng.randrange(6, 14))]
            lines.append(" ".join(words).capitalize() + ".")
        else:
            seq = [rng.choice(_WORDS + _NAMES) for _ in range(5)]
            lines.append(" ".join(seq + seq) + " " + EOT)
    return lines


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(
    out_dir: str | os.PathLike[str],
    vocab_size: int = 300,
    seed: int = 0,
    *,
    specials_first: bool = False,
    extra_special_tokens: Iterable[str] = (),
    split_digits: bool = False,
    tokenizer_class: str = "GPT2Tokenizer",
    model_max_length: int = 1024,
) -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE on :func:`corpus` and save it GPT-2 style in ``out_dir``.

    Writes ``tokenizer.json``, ``tokenizer_config.json`` (``tokenizer_class``,
    ``<|endoftext|>`` as bos/eos/unk), ``special_tokens_map.json``, ``vocab.json`` and
    ``merges.txt``. The total vocabulary (specials included) is exactly ``vocab_size``.

    By default ``<|endoftext|>`` is the *last* id, as in GPT-2 (50256); with
    ``specials_first=True`` the special tokens take ids 0.. instead (GPT-NeoX, SmolLM2).
    ``split_digits`` adds a per-digit pre-tokenizer (as in ``gpt-neox-tokenizer-digits``).
    Returns the tokenizer reloaded from ``out_dir`` with ``AutoTokenizer``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specials = [EOT, *[t for t in extra_special_tokens if t != EOT]]

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if split_digits
        else byte_level
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials) + 1:
        raise ValueError(f"vocab_size must exceed {len(alphabet) + len(specials)}")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - (0 if specials_first else len(specials)),
        special_tokens=specials if specials_first else [],
        initial_alphabet=alphabet,
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(corpus(seed), trainer=trainer)
    if not specials_first:
        tok.add_special_tokens(specials)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(
            f"corpus too small for vocab_size={vocab_size}: got {tok.get_vocab_size()}"
        )

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=EOT,
        unk_token=EOT,
        additional_special_tokens=specials[1:] or None,
        model_max_length=model_max_length,
    )
    fast.save_pretrained(str(out))

    # Pin the class the real repos name (gpt2: GPT2Tokenizer, neox digits: GPTNeoXTokenizer).
    cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg.update(
        tokenizer_class=tokenizer_class,
        bos_token=EOT,
        eos_token=EOT,
        unk_token=EOT,
        add_prefix_space=False,
        model_max_length=model_max_length,
    )
    tok_cfg.pop("pad_token", None)
    cfg_path.write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n")
    special_map: dict[str, Any] = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    if specials[1:]:
        special_map["additional_special_tokens"] = specials[1:]
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")

    # Slow-tokenizer files, as in the GPT-2 repo: vocab.json (specials included) + merges.txt.
    model_json = json.loads(tok.to_str())["model"]
    vocab = tok.get_vocab(with_added_tokens=True)
    (out / "vocab.json").write_text(
        json.dumps(dict(sorted(vocab.items(), key=lambda kv: kv[1])), ensure_ascii=False) + "\n"
    )
    merges = [m if isinstance(m, str) else " ".join(m) for m in model_json["merges"]]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")

    return AutoTokenizer.from_pretrained(str(out))


# --------------------------------------------------------------------------- checkpoints


def _save_quietly(model: Any, out: Path) -> None:
    """``save_pretrained`` (safetensors) without transformers' shard-writing progress bar."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(str(out), safe_serialization=True)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _perturb_constant_params(model: Any, generator: Any, scale: float = 0.05) -> None:
    """Give norm weights/biases (initialised to constant 1 or 0) random values.

    A random-init model with unit LayerNorm gains and zero biases would let a loader that
    drops or swaps those tensors pass a logits comparison; random values make it fail.
    """
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1 and torch.all(p == p.reshape(-1)[0]):
                noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
                p.add_(noise * scale)


def make_gpt2_checkpoint(
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_positions: int = 64,
    vocab_size: int = 300,
) -> Path:
    """Save a random-init ``GPT2LMHeadModel`` (safetensors) plus a GPT-2-style tokenizer.

    The global torch RNG is left as it was (``torch.random.fork_rng``). ``config.json``
    carries ``n_ctx`` (= ``n_positions``), like the real ``gpt2`` config, because
    transformer-lens reads ``hf_config.n_ctx``.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(out, vocab_size=vocab_size, seed=seed, model_max_length=n_positions)
    eot_id = tokenizer.convert_tokens_to_ids(EOT)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_ctx=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
        architectures=["GPT2LMHeadModel"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    generator = torch.Generator().manual_seed(seed + 1)
    _perturb_constant_params(model, generator)
    model.eval()
    _save_quietly(model, out)
    return out


def make_llama_checkpoint(
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    num_hidden_layers: int = 2,
    hidden_size: int = 64,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 64,
    vocab_size: int = 300,
    rope_theta: float = 10000.0,
) -> Path:
    """Save a tiny random-init ``LlamaForCausalLM`` shaped like SmolLM2 plus its tokenizer.

    GQA (``num_key_value_heads < num_attention_heads``), tied embeddings, SiLU MLP,
    RMSNorm eps 1e-5; the tokenizer has ``<|endoftext|>`` (id 0) as bos/eos and
    ``<|im_start|>``/``<|im_end|>`` at ids 1/2, as in SmolLM2.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if num_key_value_heads >= num_attention_heads:
        raise ValueError(
            "stand-in is meant to exercise GQA: num_key_value_heads < num_attention_heads"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(
        out,
        vocab_size=vocab_size,
        seed=seed,
        specials_first=True,
        extra_special_tokens=("<|im_start|>", "<|im_end|>"),
        model_max_length=max_position_embeddings,
    )
    bos_id = tokenizer.convert_tokens_to_ids(EOT)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        tie_word_embeddings=True,
        bos_token_id=bos_id,
        eos_token_id=bos_id,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        architectures=["LlamaForCausalLM"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(seed + 1)
    _perturb_constant_params(model, generator)
    model.eval()
    _save_quietly(model, out)
    return out


# --------------------------------------------------------------------------- hub cache


def hub_repo_dir(hf_home: str | os.PathLike[str], repo_id: str) -> Path:
    """``hf_home/hub/models--{org}--{name}`` (``models--gpt2`` for an org-less id)."""
    return Path(hf_home) / "hub" / ("models--" + repo_id.replace("/", "--"))


def install_in_hub_cache(
    hf_home: str | os.PathLike[str],
    repo_id: str,
    checkpoint_dir: str | os.PathLike[str],
    *,
    revision: str = "main",
    missing: Iterable[str] = (),
) -> Path:
    """Lay ``checkpoint_dir``'s files out as a huggingface_hub cache entry; return the snapshot.

    ``hf_home/hub/models--{org}--{name}/{blobs/<sha256>, snapshots/<commit>/<file> ->
    ../../blobs/<sha256>, refs/<revision>}``, the commit being a deterministic 40-hex digest
    of the repo id and the files. With ``HF_HOME=hf_home HF_HUB_OFFLINE=1``,
    ``from_pretrained(repo_id)`` and ``hf_hub_download(repo_id, f)`` resolve it.
    Symlinks fall back to copies where unsupported. Re-installing replaces the snapshot.

    ``missing`` names files the repo is known *not* to have: they get the empty
    ``.no_exist/<commit>/<name>`` markers the hub client writes after a 404. Offline this
    matters: transformers 5's ``AutoTokenizer`` always asks for ``config.json``, and for a
    tokenizer-only repo it raises ``OSError`` unless that absence is recorded.
    """
    src = Path(checkpoint_dir)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no files under {src}")
    repo_dir = hub_repo_dir(hf_home, repo_id)
    blobs = repo_dir / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)

    commit = hashlib.sha1(repo_id.encode())
    entries: list[tuple[str, str, Path]] = []
    for f in files:
        rel = f.relative_to(src).as_posix()
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        commit.update(f"{rel}\0{digest}\n".encode())
        entries.append((rel, digest, f))
    commit_hash = commit.hexdigest()

    snapshot = repo_dir / "snapshots" / commit_hash
    if snapshot.exists():
        shutil.rmtree(snapshot)
    for rel, digest, f in entries:
        blob = blobs / digest
        if not blob.exists():
            shutil.copyfile(f, blob)
        dest = snapshot / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            dest.symlink_to(os.path.relpath(blob, dest.parent))
        except OSError:
            shutil.copyfile(blob, dest)
    for name in missing:
        marker = repo_dir / ".no_exist" / commit_hash / name
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    refs = repo_dir / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    (refs / revision).write_text(commit_hash)
    return snapshot


def install_offline_list_repo_files_fallback() -> Callable[[], None]:
    """Make ``HfApi.list_repo_files`` fall back to the cached snapshot when the Hub is unreachable.

    transformer-lens lists a NeelNanda repo's files (to find ``*final.pth``) with
    ``HfApi().list_repo_files``, which has no cache fallback and raises
    ``OfflineModeIsEnabled`` under ``HF_HUB_OFFLINE=1``. After this call it instead
    returns the files of ``refs/<revision or main>``'s cached snapshot (and re-raises if
    nothing is cached). Import-time side effect: imports huggingface_hub, so call it only
    once ``HF_HOME`` is final. Returns a function that undoes the patch.
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import OfflineModeIsEnabled

    original = HfApi.list_repo_files

    def list_repo_files(self: Any, repo_id: str, *args: Any, **kwargs: Any) -> list[str]:
        try:
            return original(self, repo_id, *args, **kwargs)
        except OfflineModeIsEnabled:
            revision = kwargs.get("revision") or "main"
            repo_type = kwargs.get("repo_type") or "model"
            folder = f"{repo_type}s--" + repo_id.replace("/", "--")
            repo_dir = Path(constants.HF_HUB_CACHE) / folder
            ref = repo_dir / "refs" / revision
            commit = ref.read_text().strip() if ref.is_file() else revision
            snapshot = repo_dir / "snapshots" / commit
            if not snapshot.is_dir():
                raise
            return sorted(
                p.relative_to(snapshot).as_posix()
                for p in snapshot.rglob("*")
                if p.is_file() or p.is_symlink()
            )

    HfApi.list_repo_files = list_repo_files  # type: ignore[method-assign]

    def undo() -> None:
        HfApi.list_repo_files = original  # type: ignore[method-assign]

    return undo


# --------------------------------------------------------------------------- SoLU


def solu_state_dict_keys(n_layers: int) -> list[str]:
    """HookedTransformer parameter names of a ``"neel"`` SoLU model (``act_fn="solu_ln"``)."""
    keys = ["embed.W_E", "pos_embed.W_pos"]
    for layer in range(n_layers):
        p = f"blocks.{layer}."
        keys += [p + k for k in ("ln1.w", "ln1.b", "ln2.w", "ln2.b")]
        keys += [p + "attn." + k for k in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O")]
        keys += [p + "mlp." + k for k in ("W_in", "b_in", "W_out", "b_out", "ln.w", "ln.b")]
    return keys + ["ln_final.w", "ln_final.b", "unembed.W_U", "unembed.b_U"]


def make_solu_hub_standin(
    hf_home: str | os.PathLike[str],
    which: str = "solu-1l",
    seed: int = 0,
    *,
    d_model: int = 64,
    n_heads: int = 4,
    d_head: int = 16,
    d_mlp: int = 256,
    n_ctx: int = 64,
    vocab_size: int = 300,
    build_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Install a tiny stand-in for what ``HookedTransformer.from_pretrained(which)`` downloads.

    Writes, in the hub cache under ``hf_home``: the model repo (``config.json`` in Neel's
    format, naming ``tokenizer_name=NeelNanda/gpt-neox-tokenizer-digits``, and
    ``model_final.pth``, a random HookedTransformer-format state dict, float32) and the
    tokenizer repo (byte-level BPE with per-digit splitting, ``GPTNeoXTokenizer``,
    ``<|endoftext|>`` at id 0). Returns ``repo_id``, ``tokenizer_repo_id``, ``snapshot``,
    ``tokenizer_snapshot``, ``state_dict_file``, ``state_dict_path`` and ``config``.
    Loading it offline also needs :func:`install_offline_list_repo_files_fallback`.
    """
    import torch

    if which not in SOLU_REPOS:
        raise ValueError(f"which must be one of {sorted(SOLU_REPOS)}, got {which!r}")
    repo_id, n_layers = SOLU_REPOS[which]
    build = Path(build_dir) if build_dir is not None else Path(hf_home) / "_standin_build"
    model_dir = build / repo_id.replace("/", "--")
    tok_dir = build / SOLU_TOKENIZER_REPO.replace("/", "--")
    for d in (model_dir, tok_dir):
        if d.exists():
            shutil.rmtree(d)

    train_tokenizer(
        tok_dir,
        vocab_size=vocab_size,
        seed=seed,
        specials_first=True,
        split_digits=True,
        tokenizer_class="GPTNeoXTokenizer",
        model_max_length=n_ctx,
    )

    # The keys convert_neel_model_config reads, plus training fields of the kind Neel's
    # configs carry (ignored by TL). "architecture" is absent, as in the real C4_Code
    # configs: TL then infers "neel" from the repo name (no "_old").
    config = {
        "n_layers": n_layers,
        "d_model": d_model,
        "d_mlp": d_mlp,
        "d_head": d_head,
        "n_heads": n_heads,
        "n_ctx": n_ctx,
        "d_vocab": vocab_size,
        "tokenizer_name": SOLU_TOKENIZER_REPO,
        "act_fn": "solu_ln",
        "attn_only": False,
        "normalization": "LN",
        "shortformer_pos": False,
        "ln_eps": 1e-5,
        "seed": seed,
        "dataset_name": "c4+code",
        "weight_init_scheme": "gpt2",
        "standin": True,
    }
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    shapes = {
        "embed.W_E": (vocab_size, d_model),
        "pos_embed.W_pos": (n_ctx, d_model),
        "ln_final.w": (d_model,),
        "ln_final.b": (d_model,),
        "unembed.W_U": (d_model, vocab_size),
        "unembed.b_U": (vocab_size,),
    }
    per_layer = {
        "ln1.w": (d_model,),
        "ln1.b": (d_model,),
        "ln2.w": (d_model,),
        "ln2.b": (d_model,),
        "attn.W_Q": (n_heads, d_model, d_head),
        "attn.W_K": (n_heads, d_model, d_head),
        "attn.W_V": (n_heads, d_model, d_head),
        "attn.W_O": (n_heads, d_head, d_model),
        "attn.b_Q": (n_heads, d_head),
        "attn.b_K": (n_heads, d_head),
        "attn.b_V": (n_heads, d_head),
        "attn.b_O": (d_model,),
        "mlp.W_in": (d_model, d_mlp),
        "mlp.b_in": (d_mlp,),
        "mlp.W_out": (d_mlp, d_model),
        "mlp.b_out": (d_model,),
        "mlp.ln.w": (d_mlp,),
        "mlp.ln.b": (d_mlp,),
    }
    for layer in range(n_layers):
        for k, shape in per_layer.items():
            shapes[f"blocks.{layer}.{k}"] = shape
    assert sorted(shapes) == sorted(solu_state_dict_keys(n_layers))

    generator = torch.Generator().manual_seed(seed)
    state_dict: dict[str, torch.Tensor] = {}
    for key in solu_state_dict_keys(n_layers):
        shape = shapes[key]
        noise = torch.randn(shape, generator=generator)
        if key.endswith(".w"):  # norm gains around 1
            state_dict[key] = 1.0 + 0.1 * noise
        elif key.split(".")[-1].startswith("b"):  # biases
            state_dict[key] = 0.02 * noise
        else:
            fan_in = shape[-2] if len(shape) >= 2 and not key.endswith(("W_E", "W_pos")) else 1
            state_dict[key] = noise * (0.1 if fan_in == 1 else fan_in**-0.5)
    torch.save(state_dict, model_dir / SOLU_STATE_DICT_FILE)

    snapshot = install_in_hub_cache(hf_home, repo_id, model_dir)
    # A tokenizer-only repo: record config.json as absent (see install_in_hub_cache).
    tok_snapshot = install_in_hub_cache(
        hf_home, SOLU_TOKENIZER_REPO, tok_dir, missing=("config.json",)
    )
    return {
        "repo_id": repo_id,
        "tokenizer_repo_id": SOLU_TOKENIZER_REPO,
        "snapshot": snapshot,
        "tokenizer_snapshot": tok_snapshot,
        "state_dict_file": SOLU_STATE_DICT_FILE,
        "state_dict_path": snapshot / SOLU_STATE_DICT_FILE,
        "config": config,
    }


H1_REGISTRY = """\
schema_version: 1
claims:
  H1:
    family: H
    title: a large statistic
    source: a test source
    statement: The statistic r is large.
    definition: r as the test records it
    decision: {statistic: r, direction: above, threshold: 0.5, against: {none: a test claim}}
"""
"""A one-claim registry for plugin tests run through pytester (others append claims)."""

W1_NEAR_ZERO = """\
  W1:
    family: W
    title: near zero
    source: a test source
    statement: The mean is near zero.
    definition: mean
    decision: {statistic: m, direction: between, bounds: [-0.1, 0.1], against: {none: a test claim}}
"""
"""A W1 claim to append to H1_REGISTRY (add an ``expected:`` line after it where wanted)."""
