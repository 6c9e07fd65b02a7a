"""Family S on a user's own texts (``--texts PATH``): every S claim must run on them and end in
a verdict with its statistics (or inconclusive with the reason), never crash; the claims that
select on the train split and score on the held-out one end inconclusive/too-few-texts, saying
how to add held-out rows, when the file has none. Runs through the
real plugin in an in-process pytest session (pytester) with the default subject and cache: the
model loaded by any session of this process is reused (harness.evidence.plugin's process store)
and the SAEs are built on first use, so this is slow cold and takes seconds warm.

Marked ``e2e`` (run by ``nox -s e2e``, which CI runs after the test command): three whole
family-S sessions on other texts (~55 s warm, plus the cold forwards of their texts) are
end-to-end runs on other inputs, like family N on the GPT-2 stand-in; the --texts plumbing
itself is unit-tested in tests/harness/evidence/test_plugin.py and tests/harness/data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[3]
S_CLAIMS = {"S1", "S2", "S3", "S4", "S5", "S6", "S7"}


def _own_texts() -> list[dict]:
    return [json.loads(line) for line in (ROOT / "fixtures/texts/categorized.jsonl").read_text().splitlines()
            if line.strip()]


def _run(pytester: pytest.Pytester, run_state, rows: list[dict]) -> dict:
    path = pytester.path / "user_texts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    evidence = pytester.path / "evidence"
    result = pytester.runpytest(
        str(ROOT / "claims" / "test_sae_specialists.py"), f"--rootdir={ROOT}", "-c", str(ROOT / "pyproject.toml"),
        "--texts", str(path), "--evidence-dir", str(evidence),
        # pytester points HOME at a temporary directory: hand the inner run this session's
        # cache, or it would build the SAEs again in a cold one
        f"--cache-dir={run_state.cache_dir}",
        "-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-q",
    )
    # Exit 0 or 1 (a claim may be refuted on someone's texts: a result); never a usage error.
    assert result.ret in (0, 1), "\n".join(result.outlines[-60:] + result.errlines[-30:])
    [run_dir] = [p for p in evidence.iterdir() if (p / "evidence.json").exists()]  # the user's texts: a report directory of their own
    assert run_dir.name.startswith("smollm2-135m@float32-seed0-texts")
    doc = json.loads((run_dir / "evidence.json").read_text())
    doc["run_dir"] = run_dir
    for c in doc["claims"]:
        assert "user_texts.jsonl" in c["inputs"]["texts"]["source"], c["inputs"]["texts"]
    return doc


def _recomputed_gain(strong_csv: Path, candidates_csv: Path) -> float:
    """S1's headline from its data files: specialists(masked-nobos) - specialists(unmasked-bos),
    a specialist being the candidate with the best score on the train texts (first on ties)
    whose score on the held-out texts is > 0."""
    import csv

    strong: dict[tuple[str, str, str], list[tuple[str, set[int]]]] = {}
    for r in csv.DictReader(strong_csv.open()):
        strong.setdefault((r["hook"], r["policy"], r["split"]), []).append(
            (r["category"], set(json.loads(r["strong_features"]))))

    def score(texts, category, f):
        return sum(f in fs for c, fs in texts if c == category) - sum(f in fs for c, fs in texts if c != category)

    count = {"masked-nobos": 0, "unmasked-bos": 0}
    for r in csv.DictReader(candidates_csv.open()):
        if r["policy"] not in count:
            continue
        train, heldout = (strong[(r["hook"], r["policy"], s)] for s in ("train", "heldout"))
        scores = [score(train, r["category"], f) for f in json.loads(r["candidates"])]
        best = json.loads(r["candidates"])[scores.index(max(scores))]
        assert best == int(r["selected_feature"]) and max(scores) == int(r["train_score"])
        count[r["policy"]] += score(heldout, r["category"], best) > 0
    return float(count["masked-nobos"] - count["unmasked-bos"])


@pytest.mark.slow
def test_s_claims_run_on_user_texts(heavy_imports, pytester: pytest.Pytester, run_state):
    rename = {"python": "code", "math": "maths", "web": "links"}
    rows = [{**r, "category": rename[r["category"]]} for r in _own_texts() if r["category"] in rename]
    # per category: the first 12 train texts and the 6 held-out ones
    seen: dict[str, int] = {}
    kept = []
    for r in rows:
        seen[r["category"]] = seen.get(r["category"], 0) + (r["split"] == "train")
        if r["split"] == "heldout" or seen[r["category"]] <= 12:
            kept.append(r)
    rows = kept
    doc = _run(pytester, run_state, rows)
    run_dir = doc["run_dir"]
    by_id: dict[str, list[dict]] = {}
    for c in doc["claims"]:
        by_id.setdefault(c["id"], []).append(c)
    assert set(by_id) == S_CLAIMS
    for cid, records in by_id.items():
        for c in records:
            assert c["verdict"] in ("supported", "refuted", "inconclusive"), (cid, c["verdict"], c["reason"])
            assert c["reason_code"] != "too-few-texts", (cid, c["reason"])
            if cid == "S6":  # the user's texts have neither social nor conversational
                assert c["verdict"] == "inconclusive" and "social" in c["reason"], c["reason"]
            elif c["verdict"] != "inconclusive" or c["reason_code"] not in ("no-specialists", "too-few-units"):
                assert c["statistics"], (cid, c["reason"])
    s1 = by_id["S1"][0]["statistics"]["specialist_gain_masked_minus_unmasked"]
    assert all(max(counts) <= 3 for counts in s1["padding_matrix"].values())  # 3 categories
    # The headline recomputed from the per-unit files alone (no model, no SAE).
    for record in by_id["S1"]:
        files = {d["file"].rsplit("_", 1)[-1]: run_dir / d["file"] for d in record["data"]}
        assert _recomputed_gain(files["features.csv"], files["candidates.csv"]) == \
            record["statistics"]["specialist_gain_masked_minus_unmasked"]["estimate"]["value"]


@pytest.mark.slow
def test_s_claims_too_few_texts_are_inconclusive(heavy_imports, pytester: pytest.Pytester, run_state):
    rows = [r for r in _own_texts() if r["split"] == "heldout"]  # 6 per category < 10
    doc = _run(pytester, run_state, rows)
    assert {c["id"] for c in doc["claims"]} == S_CLAIMS
    for c in doc["claims"]:
        assert c["verdict"] == "inconclusive" and "fewer than 10 texts" in c["reason"], (c["id"], c["reason"])


@pytest.mark.slow
def test_s_claims_without_heldout_rows_say_how_to_add_them(heavy_imports, pytester: pytest.Pytester, run_state):
    """A texts file whose lines have no "split" (all train): the claims that select on train and
    score on held-out texts end inconclusive/too-few-texts with a reason naming the fix; S4 and
    S7, which select nothing, still measure."""
    keep = {"python", "math", "web"}
    rows = [{"category": r["category"], "text": r["text"]} for r in _own_texts()  # no "split" key
            if r["category"] in keep and r["split"] == "train"]  # 18 per category
    doc = _run(pytester, run_state, rows)
    by_id: dict[str, list[dict]] = {}
    for c in doc["claims"]:
        by_id.setdefault(c["id"], []).append(c)
    assert set(by_id) == S_CLAIMS
    for cid in ("S1", "S2", "S3", "S5", "S6"):
        for c in by_id[cid]:
            assert c["verdict"] == "inconclusive" and c["reason_code"] == "too-few-texts", (cid, c["reason"])
            assert '"split": "heldout"' in c["reason"], c["reason"]
    for cid in ("S4", "S7"):
        for c in by_id[cid]:
            assert c["reason_code"] != "too-few-texts" and c["statistics"], (cid, c["reason"])
