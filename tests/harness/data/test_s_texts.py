"""Family S on a user's own texts (``--texts PATH``): every S claim must run on them and end in
a verdict with its statistics (or inconclusive with the reason), never crash. Runs through the
real plugin in an in-process pytest session (pytester) with the default subject and cache: the
model loaded by any session of this process is reused (harness.evidence.plugin's process store)
and the SAEs are built on first use, so this is slow cold and takes seconds warm."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

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
    [run_dir] = evidence.iterdir()  # the user's texts: a report directory of their own
    assert run_dir.name.startswith("smollm2-135m@float32-seed0-texts")
    doc = json.loads((run_dir / "evidence.json").read_text())
    doc["run_dir"] = run_dir
    for c in doc["claims"]:
        assert "user_texts.jsonl" in c["inputs"]["texts"]["source"], c["inputs"]["texts"]
    return doc


def _recomputed_gain(strong_csv: Path, candidates_csv: Path) -> float:
    """S1's headline from its data files: specialists(masked-nobos) - specialists(unmasked-bos)."""
    import csv

    strong: dict[tuple[str, str], list[tuple[str, set[int]]]] = {}
    for r in csv.DictReader(strong_csv.open()):
        strong.setdefault((r["hook"], r["policy"]), []).append((r["category"], set(json.loads(r["strong_features"]))))
    count = {"masked-nobos": 0, "unmasked-bos": 0}
    for r in csv.DictReader(candidates_csv.open()):
        if r["policy"] not in count:
            continue
        texts = strong[(r["hook"], r["policy"])]
        best = max(sum(f in fs for c, fs in texts if c == r["category"])
                   - sum(f in fs for c, fs in texts if c != r["category"]) for f in json.loads(r["candidates"]))
        count[r["policy"]] += best > 0
    return float(count["masked-nobos"] - count["unmasked-bos"])


@pytest.mark.slow
def test_s_claims_run_on_user_texts(heavy_imports, pytester: pytest.Pytester, run_state):
    rename = {"python": "code", "math": "maths", "web": "links"}
    rows = [{**r, "category": rename[r["category"]]} for r in _own_texts() if r["category"] in rename]
    rows = [r for i, r in enumerate(rows) if i % 2 == 0]  # 12 per category
    doc = _run(pytester, run_state, rows)
    run_dir = doc["run_dir"]
    by_id: dict[str, list[dict]] = {}
    for c in doc["claims"]:
        by_id.setdefault(c["id"], []).append(c)
    assert set(by_id) == S_CLAIMS
    for cid, records in by_id.items():
        for c in records:
            assert c["verdict"] in ("supported", "refuted", "inconclusive"), (cid, c["verdict"], c["reason"])
            if cid == "S6":  # the user's texts have neither social nor conversational
                assert c["verdict"] == "inconclusive" and "social" in c["reason"], c["reason"]
            elif c["verdict"] != "inconclusive" or "no specialists" not in c["reason"]:
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
