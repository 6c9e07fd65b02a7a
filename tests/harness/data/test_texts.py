"""harness.data.texts: the family-S fixture's shape, the loader's errors and a JSONL round trip."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.data.texts import (
    DEFAULT_PATH,
    SPLITS,
    LabeledText,
    TextsError,
    TextSet,
    category_key,
    load_texts,
)

CATEGORIES = ("conversational", "formal", "math", "non_english", "python", "social", "web")
# Scripts written without spaces: about two characters per word.
NO_SPACE_SCRIPT = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")
EMOJI = re.compile("[\U0001f000-\U0001faff\u2600-\u27bf]")


def _words(text: str) -> int:
    return len(text.split()) + len(NO_SPACE_SCRIPT.findall(text)) // 2


def _write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "texts.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _row(category: str = "python", text: str = "print('hello world')", **extra) -> str:
    return json.dumps({"category": category, "text": text, **extra})


# -- the default fixture ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def fixture_set() -> TextSet:
    return load_texts()


def test_fixture_categories_and_split(fixture_set):
    assert fixture_set.categories == CATEGORIES
    assert fixture_set.require(20) == []
    for category, n in fixture_set.counts().items():
        assert n["heldout"] == 6, category
        assert n["train"] >= 14, category
    assert fixture_set.require(6, split="heldout") == []
    assert fixture_set.require(7, split="heldout") == list(CATEGORIES)


def test_fixture_texts_distinct_and_sized(fixture_set):
    texts = [t.text for t in fixture_set.texts]
    assert len(set(texts)) == len(texts)
    for t in fixture_set.texts:
        assert 8 <= _words(t.text) <= 60, (t.line, t.text[:40])
    # No near-duplicates: word-set Jaccard below 0.6 for every pair.
    bags = [set(re.findall(r"\w+", t.lower())) for t in texts]
    worst = max(len(a & b) / len(a | b) for a, b in itertools.combinations(bags, 2))
    assert worst < 0.6


def test_fixture_membership_not_one_token(fixture_set):
    """No whitespace token occurs in every text of a category, and the obvious markers miss
    some texts, so a single repeated token cannot decide membership."""
    by_cat = fixture_set.by_category()
    for category, texts in by_cat.items():
        assert not set.intersection(*(set(t.split()) for t in texts)), category
    assert not all("=" in t for t in by_cat["math"])
    assert not all("def " in t for t in by_cat["python"])
    assert not all(EMOJI.search(t) for t in by_cat["social"])
    assert not all("#" in t for t in by_cat["social"])
    assert not all("http" in t for t in by_cat["web"])


def test_fixture_hash_is_file_bytes(fixture_set):
    again = load_texts(DEFAULT_PATH)
    assert again == fixture_set
    assert fixture_set.sha256 == hashlib.sha256(DEFAULT_PATH.read_bytes()).hexdigest()
    assert fixture_set.source == "fixtures/texts/categorized.jsonl"
    prov = fixture_set.provenance()
    assert prov["sha256"] == fixture_set.sha256
    assert prov["n_texts"] == len(fixture_set.texts)
    assert prov["counts"]["math"] == {"train": 18, "heldout": 6}


def test_split_and_by_category(fixture_set):
    held = fixture_set.split("heldout")
    assert {t.split for t in held.texts} == {"heldout"}
    assert held.sha256 == fixture_set.sha256
    assert sum(len(v) for v in held.by_category().values()) == 6 * len(CATEGORIES)
    assert fixture_set.by_category("heldout") == held.by_category()
    with pytest.raises(ValueError, match="unknown split"):
        fixture_set.split("test")
    with pytest.raises(ValueError, match="unknown split"):
        fixture_set.by_category("validation")


# -- a user's file ---------------------------------------------------------------------------


def test_bom_crlf_blank_lines_and_exact_text(tmp_path):
    rows = [_row(text="  keep my spaces\t"), "", "   ", _row("web", "<p>hi there</p>", split="heldout")]
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(rows).encode() + b"\r\n\r\n")
    ts = load_texts(path)
    assert ts.texts == (
        LabeledText("python", "  keep my spaces\t", "train", 1),
        LabeledText("web", "<p>hi there</p>", "heldout", 4),
    )
    assert ts.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert ts.source == str(path.resolve())


def test_unicode_line_separators_stay_inside_a_text(tmp_path):
    text = "one\u2028two\u0085three\x0cfour"
    path = _write(tmp_path, [json.dumps({"category": "c", "text": text}, ensure_ascii=False)])
    assert [t.text for t in load_texts(path).texts] == [text]


GOOD = _row()
BAD_CASES = {
    "invalid json": ([GOOD, GOOD, '{"category": "python", "text": '], 3, "invalid JSON"),
    "not an object": ([GOOD, '["python", "x = 1"]'], 2, "expected a JSON object, got list"),
    "missing text": ([GOOD, '{"category": "python"}'], 2, "missing key 'text'"),
    "missing category": (['{"text": "x = 1 + 2"}'], 1, "missing key 'category'"),
    "unknown key": ([_row(spilt="heldout")], 1, "unknown key"),
    "text not a string": (['{"category": "math", "text": 42}'], 1, "'text' must be a string, got int"),
    "category not a string": (['{"category": ["a"], "text": "x"}'], 1, "'category' must be a string"),
    "split null": ([GOOD, _row(split=None)], 2, "'split' must be a string, got NoneType"),
    "unknown split": ([GOOD, GOOD, _row(split="test")], 3, "unknown split 'test'"),
    "empty text": ([GOOD, _row(text="")], 2, "'text' is empty or whitespace-only"),
    "whitespace text": ([_row(text=" \t\u3000")], 1, "'text' is empty or whitespace-only"),
    "blank category": ([_row(category="  ")], 1, "'category' is empty or whitespace-only"),
    "lone surrogate": ([GOOD, '{"category": "x", "text": "a\\ud800b"}'], 2, "lone surrogate"),
    "only blank lines": (["", "  ", ""], 1, "empty file"),
}


@pytest.mark.parametrize("lines, line_no, message", BAD_CASES.values(), ids=BAD_CASES.keys())
def test_bad_input_reports_line(tmp_path, lines, line_no, message):
    path = _write(tmp_path, lines)
    with pytest.raises(TextsError) as info:
        load_texts(path)
    text = str(info.value)
    assert text.startswith(f"{path}:{line_no}: ")
    assert message in text
    assert "\n" not in text


def test_non_utf8_bytes_report_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    latin1 = '{"category": "french", "text": "caf\xe9 cr\xe8me"}'.encode("latin-1")
    path.write_bytes(GOOD.encode() + b"\n" + latin1 + b"\n")
    with pytest.raises(TextsError, match=rf"^{re.escape(str(path))}:2: not valid UTF-8"):
        load_texts(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    with pytest.raises(TextsError, match=rf"^{re.escape(str(path))}:1: empty file"):
        load_texts(path)


def test_unreadable_path(tmp_path):
    for path in (tmp_path / "missing.jsonl", tmp_path):
        with pytest.raises(TextsError, match=rf"^{re.escape(str(path))}:0: cannot read"):
            load_texts(path)


def test_require_names_short_categories(tmp_path):
    rows = [_row("a", f"text number {i}") for i in range(3)]
    rows += [_row("b", "only train text"), _row("b", "only heldout text", split="heldout")]
    ts = load_texts(_write(tmp_path, rows))
    assert ts.counts() == {"a": {"train": 3, "heldout": 0}, "b": {"train": 1, "heldout": 1}}
    assert ts.require(2) == []
    assert ts.require(3) == ["b"]
    assert ts.require(2, split="train") == ["b"]
    assert ts.require(1, split="heldout") == ["a"]
    assert ts.require(0, split="heldout") == []
    assert ts.by_category("heldout") == {"a": [], "b": ["only heldout text"]}
    with pytest.raises(ValueError):
        ts.require(-1)


# -- round trip ------------------------------------------------------------------------------

non_blank = st.text(min_size=1, max_size=60).filter(lambda s: bool(s.strip()))
rows_strategy = st.lists(
    st.tuples(non_blank, non_blank, st.sampled_from((None, *SPLITS))), min_size=1, max_size=12
).filter(  # categories differing only in case or separators are refused (tested above)
    lambda rows: len({category_key(c) for c, _, _ in rows}) == len({c for c, _, _ in rows}))


@settings(max_examples=60, deadline=None)
@given(rows=rows_strategy, ascii_only=st.booleans(), newline=st.sampled_from(("\n", "\r\n")))
def test_jsonl_round_trip(rows, ascii_only, newline):
    """Any (category, text[, split]) rows written with json.dumps load back exactly."""
    lines = []
    for category, text, split in rows:
        obj = {"category": category, "text": text}
        if split is not None:
            obj["split"] = split
        lines.append(json.dumps(obj, ensure_ascii=ascii_only))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rt.jsonl"
        path.write_bytes(newline.join(lines).encode("utf-8"))
        ts = load_texts(path)
    assert ts.texts == tuple(
        LabeledText(c, t, s or "train", i) for i, (c, t, s) in enumerate(rows, 1)
    )
    assert ts.categories == tuple(sorted({c for c, _, _ in rows}))


def test_category_names_match_as_a_user_means_them(tmp_path) -> None:
    """A user's "Social" / "Conversational" are the claims' social / conversational (S6
    reported them missing before)."""
    path = tmp_path / "t.jsonl"
    rows = [{"category": c, "text": f"text {i}"} for i, c in
            enumerate(["Social", "Conversational", " Python ", "Social_Media", "web-links"])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    ts = load_texts(path)
    assert ts.find("social") == "Social"
    assert ts.find("CONVERSATIONAL") == "Conversational"
    assert ts.find("python") == " Python "
    assert ts.find("social media") == "Social_Media"
    assert ts.find("web_links") == "web-links"
    assert ts.find("soc") is None and ts.find("maths") is None
    assert category_key("  A-b__C d ") == "a b c d"


def test_categories_that_differ_only_in_case_are_refused(tmp_path) -> None:
    path = tmp_path / "t.jsonl"
    rows = [{"category": "social", "text": "a"}, {"category": "Social", "text": "b"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(TextsError, match=r"t.jsonl:2: category 'Social' and 'social' \(line 1\) differ only"):
        load_texts(path)
