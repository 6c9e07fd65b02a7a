"""The size ladder (harness.models.ladder, bpe, ladder_build): tokenizer, seeded builds, the
bigram gate, model cards, the cache, and the subjects' plumbing.

Builds here are tiny (1 layer, d_model 64, 32-token contexts, a few seconds on one thread).
Their data is synthetic where a build must pass the gate: every token repeats the one two
places before it (a known answer: a 1-layer transformer learns to copy it within a few dozen
steps, a bigram cannot, since the pairs are drawn afresh per context). The real ladder's
recipe is measured by ``python -m harness.build ladder``, not here.
"""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
import torch

from harness.activations.cache import ContentCache
from harness.data.corpus import Corpus, tokenizer_hash
from harness.models import ladder_build
from harness.models.bpe import EOT, BPESpec, cached_tokenizer, train_bpe
from harness.models.ladder import LADDER, LadderSpec
from harness.models.ladder_build import (
    LadderBuildError,
    LadderData,
    build_ladder_model,
    lr_factor,
)
from harness.models.loaders import _state_hash, load_subject
from harness.models.ngram import baseline_losses
from harness.models.subjects import KNOWN_SUBJECTS, parse_subject

SMALL_BPE = BPESpec(vocab_size=300, sources=("pydoc_topics",))
TINY = LadderSpec(family="solu", n_layers=1, d_model=64, d_mlp=256, d_head=16, n_ctx=32,
                  tokenizer=SMALL_BPE, corpus_sources=("pydoc_topics",), corpus_weights=(1.0,),
                  train_contexts=256, heldout_contexts=32, epochs=2, batch_size=8, lr=1e-2)
CARD_FIELDS = {"subject", "trained", "architecture", "n_params", "n_params_non_embedding",
               "tokens_seen", "unique_train_tokens", "epochs", "steps", "heldout_tokens",
               "heldout_loss", "unigram_loss", "bigram_loss", "bigram_margin", "beats_bigram",
               "heldout_predictions", "baseline_method", "recipe", "tokenizer_sha256", "corpus"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> ContentCache:
    return ContentCache(tmp_path_factory.mktemp("ladder-cache"))


@pytest.fixture(scope="module")
def tokenizer(cache):
    return cached_tokenizer(cache, SMALL_BPE)


def copy_two_back(spec: LadderSpec, tokenizer, seed: int = 0) -> LadderData:
    """Contexts BOS a b a b ...: the pair (a, b) drawn per context from 16 token ids."""
    n = spec.train_contexts + spec.heldout_contexts
    g = torch.Generator().manual_seed(seed)
    pairs = torch.randint(1, 17, (n, 2), generator=g)  # (n, 2)
    body = pairs.repeat(1, spec.n_ctx // 2 + 1)[:, : spec.n_ctx - 1]  # (n, n_ctx - 1)
    tokens = torch.cat([torch.zeros(n, 1, dtype=torch.long), body], dim=1)  # (n, n_ctx)
    corpus = Corpus(tokens=tokens, source_of=torch.zeros(n, dtype=torch.long),
                    recipe=spec.corpus_recipe(),
                    sha256=hashlib.sha256(tokens.numpy().tobytes()).hexdigest(),
                    tokenizer_sha256=tokenizer_hash(tokenizer))
    train, heldout = tokens[: spec.train_contexts], tokens[spec.train_contexts :]
    return LadderData(tokenizer, corpus, baseline_losses(train, heldout, spec.tokenizer.vocab_size))


# --- tokenizer -------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["def f(x):\n    return x ** 2  # 12345\n",
                                  "Größe: 3,14 — ünïcödé ✓", "", "  \t\n<|endoftext|>"])
def test_tokenizer_round_trip(tokenizer, text):
    from transformers import PreTrainedTokenizerFast

    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert max(ids, default=0) < SMALL_BPE.vocab_size


def test_tokenizer_shape(tokenizer):
    assert len(tokenizer) == SMALL_BPE.vocab_size
    assert tokenizer.bos_token == tokenizer.eos_token == EOT
    assert tokenizer.bos_token_id == 0
    digits = tokenizer("2026", add_special_tokens=False)["input_ids"]
    assert [tokenizer.decode([i]) for i in digits] == ["2", "0", "2", "6"]  # split one by one


def test_tokenizer_is_deterministic_and_cached(cache, tokenizer):
    assert train_bpe(SMALL_BPE) == train_bpe(SMALL_BPE)
    again = cached_tokenizer(cache, SMALL_BPE)
    assert again.name_or_path == tokenizer.name_or_path  # the same materialised directory
    assert tokenizer_hash(again) == tokenizer_hash(tokenizer)


def test_ladder_tokenizer_decodes_real_tokens(cache):
    """The ladder's own tokenizer (8,192 BPE on every corpus source): what Method 2 decodes."""
    tok = cached_tokenizer(cache, BPESpec())
    assert len(tok) == 8192
    ids = tok("def __init__(self, name):", add_special_tokens=False)["input_ids"]
    pieces = [tok.decode([i]) for i in ids]
    assert "".join(pieces) == "def __init__(self, name):"
    assert len(ids) <= 8 and any(len(p.strip()) >= 4 for p in pieces)  # merges, not bytes


# --- builds ------------------------------------------------------------------------------------


def test_lr_schedule():
    spec = dataclasses.replace(TINY, warmup_fraction=0.25, final_lr_fraction=0.1)  # 64 steps
    assert lr_factor(spec, 0) == pytest.approx(1 / 16)
    assert lr_factor(spec, 15) == pytest.approx(1.0)
    assert lr_factor(spec, 63) == pytest.approx(0.1, abs=1e-3)


def test_seeded_build_is_deterministic(tmp_path, tokenizer):
    data = copy_two_back(TINY, tokenizer)
    a = build_ladder_model(ContentCache(tmp_path / "a"), TINY, data)
    b = build_ladder_model(ContentCache(tmp_path / "b"), TINY, data)
    assert not a.cache_hit and not b.cache_hit
    assert _state_hash(a.state) == _state_hash(b.state)
    assert a.card["heldout_loss"] == b.card["heldout_loss"]
    other = build_ladder_model(ContentCache(tmp_path / "c"), dataclasses.replace(TINY, seed=1), data)
    assert _state_hash(other.state) != _state_hash(a.state)  # the seed does reach the weights


def test_a_model_that_does_not_beat_the_bigram_fails_the_build(cache, tokenizer):
    untrained = dataclasses.replace(TINY, epochs=0)
    with pytest.raises(LadderBuildError, match="not a trained subject.*bigram baseline"):
        build_ladder_model(cache, untrained, copy_two_back(untrained, tokenizer))
    key = ladder_build.cache_key(ladder_build.PRODUCER, ladder_build.VERSION,
                                 **ladder_build._parts(untrained, copy_two_back(untrained, tokenizer)))
    assert cache.get(ladder_build.PRODUCER, key) is None  # nothing cached


def test_model_card(cache, tokenizer):
    built = build_ladder_model(cache, TINY, copy_two_back(TINY, tokenizer))
    card = built.card
    assert set(card) >= CARD_FIELDS
    assert card["trained"] and card["subject"] == "ladder:solu-1l"
    assert card["tokens_seen"] == TINY.steps * TINY.batch_size * TINY.n_ctx == 2 * 32 * 8 * 32
    assert card["unique_train_tokens"] == TINY.train_contexts * TINY.n_ctx
    assert card["heldout_predictions"] == TINY.heldout_contexts * (TINY.n_ctx - 1)
    n_params = sum(t.numel() for k, t in built.state.items() if not k.endswith(("IGNORE", "mask")))
    assert card["n_params"] == n_params
    assert card["heldout_loss"] < card["bigram_loss"] and card["beats_bigram"]
    assert card["bigram_margin"] == pytest.approx(card["bigram_loss"] - card["heldout_loss"])
    assert card["architecture"]["act_fn"] == "solu_ln" and card["architecture"]["d_vocab"] == 300


def test_second_build_is_a_cache_hit(cache, tokenizer, monkeypatch):
    data = copy_two_back(TINY, tokenizer)
    first = build_ladder_model(cache, TINY, data)

    def no_training(*args, **kwargs):
        raise AssertionError("a cached ladder model was trained again")

    monkeypatch.setattr(ladder_build, "train", no_training)
    second = build_ladder_model(cache, TINY, data)
    assert second.cache_hit and second.cache_key == first.cache_key
    assert _state_hash(second.state) == _state_hash(first.state)
    assert second.card["heldout_loss"] == first.card["heldout_loss"]


# --- subjects ----------------------------------------------------------------------------------


def test_ladder_names_are_known_subjects():
    assert {f"ladder:{f}-{n}l" for f in ("solu", "gelu") for n in (1, 2, 4)} <= set(LADDER)
    for name in LADDER:
        assert KNOWN_SUBJECTS[name].kind == "ladder"
        twin = parse_subject(name + ":random", seed=3)
        assert twin.random_init and twin.init_seed == 3 and twin.id == name + ":random"
    assert LADDER["ladder:solu-2l"].act_fn == "solu_ln" and LADDER["ladder:gelu-4l"].act_fn == "gelu"


@pytest.fixture
def tiny_ladder(monkeypatch, tokenizer):
    """``ladder:solu-1l`` replaced by TINY on the copy-two-back data, for load_subject."""
    monkeypatch.setitem(LADDER, "ladder:solu-1l", TINY)
    monkeypatch.setattr(ladder_build, "ladder_data", lambda cache, spec: copy_two_back(spec, tokenizer))


def test_load_subject_trains_caches_and_identifies(tiny_ladder, tmp_path):
    spec = parse_subject("ladder:solu-1l")
    first = load_subject(spec, cache_dir=tmp_path)
    again = load_subject(spec, cache_dir=tmp_path)
    assert first.weight_hash == again.weight_hash  # identity from the unprocessed weights
    assert first.card["trained"] and again.card["cache_key"] == first.card["cache_key"]
    prov = first.provenance()
    assert prov["model_card"]["heldout_loss"] == first.card["heldout_loss"]
    assert prov["n_layers"] == 1 and prov["d_mlp"] == 256
    assert first.model.tokenizer.decode(first.model.to_tokens("abc", prepend_bos=False)[0]) == "abc"
    assert first.model.cfg.act_fn == "solu_ln" and not first.model.cfg.gated_mlp

    twin = load_subject(parse_subject("ladder:solu-1l:random"), cache_dir=tmp_path)
    assert twin.weight_hash == load_subject(parse_subject("ladder:solu-1l:random"),
                                            cache_dir=tmp_path).weight_hash
    assert twin.weight_hash != first.weight_hash
    assert not twin.card["trained"] and twin.card["tokens_seen"] == 0
    assert twin.card["heldout_loss"] > twin.card["unigram_loss"]  # random weights: worse than counts


def test_build_cli_trains_a_ladder_subject(tiny_ladder, tmp_path, capsys):
    import json

    from harness.build import main

    assert main(["model", "--subject=ladder:solu-1l", f"--cache-dir={tmp_path}"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model_card"]["beats_bigram"] and report["stage_seconds"]["subject training"] > 0
    assert main(["ladder", "--subject=nope", f"--cache-dir={tmp_path}"]) == 2


def test_model_card_in_the_evidence_markdown():
    from harness.evidence.record import model_card_rows

    card = {"subject": "ladder:gelu-2l", "trained": True, "architecture": {"n_layers": 2},
            "heldout_loss": 4.5, "bigram_loss": 5.0, "unigram_loss": 6.8, "tokens_seen": 100}
    rows = dict(model_card_rows(card))
    assert rows["architecture"] == "n_layers 2" and rows["heldout_loss"] == "4.5"
    assert rows["bigram_loss"] == "5" and rows["tokens_seen"] == "100"


def test_noxfile_names_the_ladder():
    import ast
    from pathlib import Path

    tree = ast.parse((Path(__file__).resolve().parents[3] / "noxfile.py").read_text(encoding="utf-8"))
    assigned = {t.id: node.value for node in tree.body if isinstance(node, ast.Assign)
                for t in node.targets if isinstance(t, ast.Name)}
    assert ast.literal_eval(assigned["LADDER"]) == list(LADDER)
