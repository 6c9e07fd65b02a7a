"""``--corpus PATH``: the user's text files, JSONL and saved Hugging Face datasets, packed like
the default corpus, hashed into the recipe, with one clear error per bad input."""

from __future__ import annotations

import json

import pytest
import torch

from harness.activations.cache import ContentCache
from harness.activations.harvest import cached_corpus
from harness.data.corpus import CorpusError, CorpusRecipe, build_corpus
from harness.data.user_corpus import read_user_corpus, text_sha256
from tests.standins import corpus as standin_lines
from tests.standins import train_tokenizer

N_CTX, CTX_LEN = 8, 16


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=400)


def _lines(seed: int, n: int = 60) -> list[str]:
    return standin_lines(seed=seed, n_lines=n)


def _pack(tokenizer, path, **kwargs) -> tuple:
    user = read_user_corpus(path)
    recipe = CorpusRecipe.of_user(user, **{"n_contexts": N_CTX, "context_len": CTX_LEN, **kwargs})
    return user, build_corpus(tokenizer, recipe)


def _check_packed(corpus, tokenizer) -> None:
    """The default's layout: (n_contexts, context_len), BOS first, deterministic."""
    assert corpus.tokens.shape == (N_CTX, CTX_LEN) and corpus.tokens.dtype == torch.long
    assert (corpus.tokens[:, 0] == tokenizer.bos_token_id).all()
    again = build_corpus(tokenizer, corpus.recipe)
    assert torch.equal(again.tokens, corpus.tokens) and again.sha256 == corpus.sha256
    prov = corpus.provenance()
    assert prov["contexts_per_source"] == {"user": N_CTX} and prov["sha256"] == corpus.sha256
    user = prov["recipe"]["user"]
    assert user["text_sha256"] == corpus.recipe.user.text_sha256 and user["files"]
    assert prov["description"].startswith(f"the user's corpus {user['path']} ({user['kind']}:")


def test_a_directory_of_text_files(tmp_path, tokenizer):
    root = tmp_path / "texts"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("\n".join(_lines(1)), encoding="utf-8")
    (root / "sub" / "b.md").write_text("# Notes\n\n" + "\n".join(_lines(2)), encoding="utf-8")
    (root / "notes").write_text("\n".join(_lines(3)), encoding="utf-8")  # any text, any name
    (root / "image.bin").write_bytes(b"\x89PNG\x00\x01\xff")
    (root / ".hidden.txt").write_text("never read", encoding="utf-8")
    (root / "blank.txt").write_text("  \n", encoding="utf-8")
    user, corpus = _pack(tokenizer, root)
    assert user.kind == "text" and user.n_documents == 3
    assert [f for f, _ in user.files] == ["a.txt", "blank.txt", "notes", "sub/b.md"]
    assert dict(user.files)["a.txt"] == (root / "a.txt").stat().st_size
    assert user.skipped == ("image.bin",)
    assert "1 non-text files skipped" in user.description
    _check_packed(corpus, tokenizer)
    single, one = _pack(tokenizer, root / "a.txt")  # a single file is a corpus too
    assert single.kind == "text" and single.files == (("a.txt", dict(user.files)["a.txt"]),)
    assert one.sha256 != corpus.sha256


def test_a_jsonl_file(tmp_path, tokenizer):
    path = tmp_path / "docs.jsonl"
    rows = [{"text": line, "id": i} for i, line in enumerate(_lines(4, 120))]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    user, corpus = _pack(tokenizer, path)
    assert user.kind == "jsonl" and user.n_documents == 120
    assert user.text_sha256 == text_sha256(r["text"] for r in rows)
    _check_packed(corpus, tokenizer)


@pytest.mark.parametrize(("lines", "match"), [
    (['{"text": "fine"}', '{"body": "no text here"}'], r"docs\.jsonl, line 2: no 'text' field \(found \['body'\]\)"),
    (['{"text": "fine"}', "", "{not json"], r"line 3: not JSON"),
    (['{"text": 3}'], r"line 1: 'text' is a int, not a string"),
    (['["text"]'], r"line 1: no 'text' field \(found list\)"),
])
def test_a_jsonl_line_without_text_is_named(tmp_path, lines, match):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=match):
        read_user_corpus(path)


def test_a_saved_hugging_face_dataset(tmp_path, tokenizer):
    from datasets import Dataset, DatasetDict

    train = Dataset.from_dict({"text": _lines(5, 80), "n": list(range(80))})
    train.save_to_disk(str(tmp_path / "ds"))
    user, corpus = _pack(tokenizer, tmp_path / "ds")
    assert user.kind == "hf-dataset" and user.n_documents == 80
    assert {"state.json", "dataset_info.json"} <= {f for f, _ in user.files}
    assert user.text_sha256 == text_sha256(_lines(5, 80))
    _check_packed(corpus, tokenizer)

    both = DatasetDict({"train": train, "test": Dataset.from_dict({"text": _lines(6, 10)})})
    both.save_to_disk(str(tmp_path / "dd"))
    splits = read_user_corpus(tmp_path / "dd")
    assert splits.n_documents == 90  # every split, in name order: test, then train
    assert splits.text_sha256 == text_sha256(_lines(6, 10) + _lines(5, 80))

    Dataset.from_dict({"content": ["a", "b"]}).save_to_disk(str(tmp_path / "nocol"))
    with pytest.raises(CorpusError, match=r"no 'text' column \(columns: \['content'\]\)"):
        read_user_corpus(tmp_path / "nocol")


def test_bad_paths_are_one_clear_error(tmp_path, tokenizer):
    with pytest.raises(CorpusError, match=r"--corpus .*nowhere: no such file or directory"):
        read_user_corpus(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match=r"empty: no text in it \(text, 0 file\(s\) read\)"):
        read_user_corpus(tmp_path / "empty")
    (tmp_path / "blank.txt").write_text("\n\n   \n", encoding="utf-8")
    with pytest.raises(CorpusError, match="no text in it"):
        read_user_corpus(tmp_path / "blank.txt")
    (tmp_path / "blob.dat").write_bytes(b"\x00\x01\x02")
    with pytest.raises(CorpusError, match="not a UTF-8 text file"):
        read_user_corpus(tmp_path / "blob.dat")


def test_too_few_tokens_says_needed_against_available(tmp_path, tokenizer):
    path = tmp_path / "short.txt"
    path.write_text("a few words, not enough for many contexts", encoding="utf-8")
    with pytest.raises(CorpusError) as err:
        _pack(tokenizer, path, n_contexts=50)
    msg = str(err.value)
    assert f"{path} is too small: 50 contexts of {CTX_LEN} tokens" in msg
    assert f"need {50 * (CTX_LEN - 1):,} text tokens" in msg and "it tokenizes to" in msg
    assert "--corpus-contexts" in msg and "\n" not in msg


def test_editing_a_file_changes_the_hash_and_the_cache_key(tmp_path, tokenizer):
    root = tmp_path / "texts"
    root.mkdir()
    (root / "a.txt").write_text("\n".join(_lines(7)), encoding="utf-8")
    cache = ContentCache(tmp_path / "cache")
    before = read_user_corpus(root)
    recipe = CorpusRecipe.of_user(before, n_contexts=N_CTX, context_len=CTX_LEN)
    first = cached_corpus(cache, tokenizer, recipe)
    assert torch.equal(cached_corpus(cache, tokenizer, recipe).tokens, first.tokens)
    (root / "a.txt").write_text("\n".join(_lines(8)), encoding="utf-8")
    with pytest.raises(CorpusError, match="changed since the run started"):
        before.documents()  # the recipe read at start-up no longer describes the files
    after = read_user_corpus(root)
    assert after.text_sha256 != before.text_sha256
    edited = cached_corpus(cache, tokenizer, CorpusRecipe.of_user(after, n_contexts=N_CTX,
                                                                 context_len=CTX_LEN))
    assert edited.sha256 != first.sha256
    assert len(list((tmp_path / "cache" / "corpus").rglob("meta.json"))) == 2


def test_the_default_corpus_says_what_it_is():
    description = CorpusRecipe().description
    assert description.startswith("the default background corpus: CPython ")
    assert "mostly code and technical prose" in description and "pydoc_topics 40%" in description
    with pytest.raises(CorpusError, match="one source 'user'"):
        CorpusRecipe(user=read_user_corpus(__file__))
