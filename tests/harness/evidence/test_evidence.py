"""ClaimEvidence (record / judge / figure) and EvidenceWriter (atomic, NaN-honest report)."""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from harness.evidence.errors import HarnessError
from harness.evidence.record import (
    SCHEMA_VERSION,
    ClaimEvidence,
    ClaimInconclusive,
    ClaimRefuted,
    ClaimVerdict,
    EvidenceWriter,
    atomic_write_text,
    render_markdown,
)
from harness.evidence.registry import Claim, Decision, Published
from harness.statistics.stats import Estimate, exact

STATEMENT = "The statistic is large."


def _claim(decision: Decision, cid: str = "H1") -> Claim:
    return Claim(
        id=cid, family=cid[0], title="a test claim", source="a source", statement=STATEMENT,
        definition="r over things", decision=decision,
        published=(Published("r", 0.9, "gpt2-small L8", "paper, table 2"),),
    )


ABOVE = Decision(statistic="r", direction="above", threshold=0.5)


def _evidence(tmp_path: Path, decision: Decision = ABOVE, cid: str = "H1") -> ClaimEvidence:
    return ClaimEvidence(claim=_claim(decision, cid), subject_id="smollm2-135m",
                         dtype="float32", figure_dir=tmp_path / "figures")


def _strict_json(text: str):
    """json.loads that refuses the bare NaN / Infinity tokens Python's json would accept."""
    def refuse(token: str):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(text, parse_constant=refuse)


# --- ClaimEvidence ------------------------------------------------------------------------


def test_record_stores_estimate_threshold_and_null(tmp_path: Path) -> None:
    ev = _evidence(tmp_path)
    est = Estimate(0.8, 0.7, 0.9, 50, "bootstrap-percentile")
    assert ev.record("r", est, null=exact(0.1, 50), description="median r") is est
    ev.record("side", exact(2.0, 3), null=0.0, layer=np.int64(5))
    assert ev.statistics["r"]["threshold"] == 0.5
    assert ev.statistics["r"]["direction"] == "above"
    assert ev.statistics["r"]["null"]["value"] == 0.1
    assert "threshold" not in ev.statistics["side"]  # only the headline statistic is judged
    assert ev.statistics["side"]["layer"] == 5 and type(ev.statistics["side"]["layer"]) is int


def test_record_rejects_a_duplicate_name(tmp_path: Path) -> None:
    ev = _evidence(tmp_path)
    ev.record("r", exact(0.9, 1))
    with pytest.raises(ValueError, match="'r' recorded twice for H1"):
        ev.record("r", exact(0.1, 1))


@pytest.mark.parametrize(
    ("decision", "estimate", "raises", "verdict"),
    [
        (ABOVE, Estimate(0.8, 0.7, 0.9, 50, "b"), None, "supported"),
        (ABOVE, Estimate(0.2, 0.1, 0.3, 50, "b"), ClaimRefuted, "refuted"),
        (ABOVE, Estimate(0.5, 0.4, 0.6, 50, "b"), ClaimInconclusive, "inconclusive"),
        (Decision("r", "between", bounds=(-0.1, 0.1)), exact(0.5, 9), ClaimRefuted, "refuted"),
        (Decision("r", "below", threshold={"float32": 1e-4}), exact(1e-6, 9), None, "supported"),
    ],
)
def test_judge(tmp_path: Path, decision: Decision, estimate: Estimate,
               raises: type[Exception] | None, verdict: str) -> None:
    ev = _evidence(tmp_path, decision)
    ev.record("r", estimate)
    if raises is None:
        assert ev.judge() == verdict
    else:
        with pytest.raises(raises) as info:
            ev.judge()
        message = str(info.value)
        assert f"H1 {verdict} on smollm2-135m" in message
        assert repr(STATEMENT) in message and f"r = {estimate}" in message
    assert ev.verdict == verdict


def test_verdicts_are_not_assertion_errors() -> None:
    """A plain ``assert`` in a claim test must not pass for a refutation (the plugin maps
    AssertionError to 'error'): the verdict exceptions are their own class."""
    assert not issubclass(ClaimRefuted, AssertionError)
    assert not issubclass(ClaimInconclusive, AssertionError)
    assert issubclass(ClaimRefuted, ClaimVerdict) and issubclass(ClaimInconclusive, ClaimVerdict)
    assert not issubclass(ClaimRefuted, ClaimInconclusive)


def test_nan_headline_is_a_harness_error(tmp_path: Path) -> None:
    ev = _evidence(tmp_path)
    ev.record("r", Estimate(math.nan, 0.1, 0.9, 50, "b"))
    with pytest.raises(HarnessError, match="H1 on smollm2-135m: headline r = nan .* non-finite value"):
        ev.judge()
    assert ev.verdict is None


def test_inconclusive_codes(tmp_path: Path) -> None:
    ev = _evidence(tmp_path)
    ev.record("r", Estimate(0.5, 0.4, 0.6, 50, "b"))
    with pytest.raises(ClaimInconclusive) as info:
        ev.judge()
    assert info.value.code == ev.code == "interval"
    ev2 = _evidence(tmp_path)
    with pytest.raises(ValueError, match="code 'interval': give one of"):
        ev2.inconclusive("why", code="interval")  # judge's own code
    with pytest.raises(ValueError, match="code 'nope'"):
        ev2.inconclusive("why", code="nope")
    with pytest.raises(ClaimInconclusive, match=r"H1 inconclusive \(too-few-texts\)") as info:
        ev2.inconclusive("only 3 texts", code="too-few-texts")
    assert (info.value.code, ev2.verdict, ev2.to_record()["reason_code"]) == (
        "too-few-texts", "inconclusive", "too-few-texts")


def test_judge_without_the_headline_statistic_raises(tmp_path: Path) -> None:
    ev = _evidence(tmp_path)
    ev.record("other", exact(1.0, 1))
    with pytest.raises(KeyError, match="headline statistic 'r' was never recorded"):
        ev.judge()
    assert ev.verdict is None


def test_figure_is_saved_and_listed(tmp_path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global figure state, Agg canvas

    ev = _evidence(tmp_path)
    fig = Figure(figsize=(2, 2))
    fig.add_subplot().plot([0, 1], [1, 0])
    path = ev.figure(fig, "scatter")
    assert path == tmp_path / "figures" / "H1_scatter.png"
    assert path.read_bytes().startswith(b"\x89PNG")
    ev.record("r", exact(0.9, 1))
    record = ev.to_record()
    assert record["figures"] == ["figures/H1_scatter.png"]
    doc = {"schema_version": SCHEMA_VERSION, "subject_id": "s", "provenance": {},
           "claims": [record]}
    assert "![figures/H1_scatter.png](figures/H1_scatter.png)" in render_markdown(doc)


def test_attach_writes_text_beside_figures_and_links_it(tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    ev = _evidence(tmp_path)
    fig = Figure(figsize=(2, 2))
    fig.add_subplot().plot([0, 1], [1, 0])
    ev.figure(fig, "scatter")
    page = "<!DOCTYPE html><p>caf\u00e9 &amp; tokens</p>"
    path = ev.attach("tokens", page)
    assert path == tmp_path / "figures" / "H1_tokens.html"
    assert path.read_text(encoding="utf-8") == page
    assert sorted(p.name for p in path.parent.iterdir()) == ["H1_scatter.png", "H1_tokens.html"]
    ev.attach("raw", "a,b\n", suffix=".csv")
    record = ev.to_record()
    assert record["figures"] == ["figures/H1_scatter.png", "figures/H1_tokens.html",
                                 "figures/H1_raw.csv"]
    md = render_markdown({"schema_version": SCHEMA_VERSION, "subject_id": "s", "provenance": {},
                          "claims": [record]})
    assert "![figures/H1_scatter.png](figures/H1_scatter.png)" in md
    assert "- [figures/H1_tokens.html](figures/H1_tokens.html)" in md
    assert "![figures/H1_tokens.html]" not in md and "[figures/H1_raw.csv](figures/H1_raw.csv)" in md
    for bad in ("", "a/b"):
        with pytest.raises(ValueError, match="file name part"):
            ev.attach(bad, "x")
    with pytest.raises(ValueError, match="suffix"):
        ev.attach("x", "x", suffix="html")


def test_markdown_lists_each_sae_once_with_its_quality() -> None:
    trained = {"hook_name": "blocks.1.hook_resid_pre", "origin": "trained-locally", "d_sae": 64,
               "weights_sha256": "a" * 64, "quality": {"fve": 0.91234, "l0": 8.0, "dead_share": 0.25,
                                                       "ce_recovered": 0.5}}
    hub = {"hook_name": "blocks.8.hook_resid_pre", "origin": "hub", "d_sae": 24576,
           "weights_sha256": "b" * 64, "quality": {}}
    claims = [{"id": "S1", "inputs": {"saes": [trained, hub]}}, {"id": "S2", "inputs": {"saes": [trained]}},
              {"id": "H1", "inputs": {}}]
    md = render_markdown({"schema_version": SCHEMA_VERSION, "subject_id": "s", "provenance": {},
                          "claims": claims})
    assert md.count("| blocks.1.hook_resid_pre | trained-locally | 64 | 0.9123 | 8 | 0.25 | 0.5 | aaaaaaaaaaaaaaaa |") == 1
    assert "| blocks.8.hook_resid_pre | hub | 24576 | - | - | - | - | bbbbbbbbbbbbbbbb |" in md
    no_saes = render_markdown({"schema_version": SCHEMA_VERSION, "subject_id": "s", "provenance": {},
                               "claims": [{"id": "H1"}]})
    assert "SAEs the claims ran on" not in no_saes


# --- EvidenceWriter -----------------------------------------------------------------------

PROVENANCE = {"git": {"commit": "abc", "dirty": False}, "device": "cpu", "dtype": "float32",
              "seed": 0, "packages": {"numpy": np.__version__}}


def _record(ev: ClaimEvidence, test: str, verdict: str) -> dict:
    return {**ev.to_record(), "verdict": verdict, "test": test, "expected": False}


def test_writer_writes_json_and_markdown_after_each_record(tmp_path: Path) -> None:
    writer = EvidenceWriter(tmp_path / "out", "smollm2-135m", dict(PROVENANCE))
    ev = _evidence(tmp_path)
    ev.record("r", Estimate(0.8, 0.7, 0.9, 50, "bootstrap-percentile"), description="median r")
    writer.add(_record(ev, "test_one", "supported"))
    doc = _strict_json(writer.json_path.read_text())
    assert doc["schema_version"] == SCHEMA_VERSION and doc["subject_id"] == "smollm2-135m"
    assert doc["provenance"] == PROVENANCE
    assert [c["test"] for c in doc["claims"]] == ["test_one"]

    ev2 = _evidence(tmp_path, Decision("m", "between", bounds=(-0.1, 0.1)), cid="W1")
    ev2.record("m", exact(0.3, 7))
    writer.add(_record(ev2, "test_two", "refuted"))
    assert [c["test"] for c in _strict_json(writer.json_path.read_text())["claims"]] == [
        "test_one", "test_two"]
    md = writer.md_path.read_text()
    assert "# Evidence: smollm2-135m" in md
    assert "| claim | test | verdict | headline statistic | 95% CI | threshold |" in md
    assert "| H1 | test_one | supported | r = 0.8 | [0.7, 0.9] | above 0.5 |" in md
    assert "| W1 | test_two | refuted | m = 0.3 | exact | between [-0.1, 0.1] |" in md
    assert "| r | headline | 0.8 | [0.7, 0.9] | 50 | bootstrap-percentile |  | median r |" in md
    assert "decides nothing (no best-of-many)" in md
    assert "- r = 0.9 (gpt2-small L8; paper, table 2)" in md  # published, with provenance
    assert sorted(p.name for p in writer.directory.iterdir()) == ["evidence.json", "evidence.md"]


def test_nan_and_inf_are_written_as_strings_never_hidden(tmp_path: Path) -> None:
    writer = EvidenceWriter(tmp_path, "s", dict(PROVENANCE))
    ev = _evidence(tmp_path)
    ev.record("r", Estimate(math.nan, math.nan, math.nan, 3, "pearson-fisher-z"),
              null=math.inf, spread=np.float32("nan"))
    writer.add(_record(ev, "test_nan", "inconclusive"))
    stat = _strict_json(writer.json_path.read_text())["claims"][0]["statistics"]["r"]
    assert stat["estimate"]["value"] == "nan" and stat["estimate"]["ci_low"] == "nan"
    assert stat["null"] == "inf" and stat["spread"] == "nan"
    assert "| r | headline | nan | [nan, nan] | 3 |" in writer.md_path.read_text()


def test_atomic_write_leaves_the_old_file_when_the_replace_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "evidence.json"
    atomic_write_text(target, '{"claims": []}\n')

    def crash(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write_text(target, '{"claims": [1, 2')
    assert json.loads(target.read_text()) == {"claims": []}
    assert [p.name for p in tmp_path.iterdir()] == ["evidence.json"]  # no temp file left


def test_an_unserialisable_record_leaves_the_previous_report(tmp_path: Path) -> None:
    writer = EvidenceWriter(tmp_path, "s", dict(PROVENANCE))
    ev = _evidence(tmp_path)
    ev.record("r", exact(0.9, 1))
    writer.add(_record(ev, "test_ok", "supported"))
    with pytest.raises(TypeError):
        writer.add({**_record(ev, "test_bad", "supported"), "oops": object()})
    assert [c["test"] for c in _strict_json(writer.json_path.read_text())["claims"]] == ["test_ok"]


def test_a_concurrent_reader_always_sees_a_whole_report(tmp_path: Path) -> None:
    writer = EvidenceWriter(tmp_path, "s", {**PROVENANCE, "padding": "x" * 200_000})
    ev = _evidence(tmp_path)
    ev.record("r", exact(0.9, 1))
    writer.add(_record(ev, "test_0", "supported"))
    done = threading.Event()

    def write() -> None:
        for i in range(1, 40):
            writer.add(_record(ev, f"test_{i}", "supported"))
        done.set()

    thread = threading.Thread(target=write)
    thread.start()
    reads = 0
    while not done.is_set() or reads == 0:
        doc = _strict_json(writer.json_path.read_text())  # a torn file would fail here
        assert doc["claims"][0]["test"] == "test_0"
        reads += 1
    thread.join()
    assert len(_strict_json(writer.json_path.read_text())["claims"]) == 40


def test_per_unit_data_round_trips_and_is_listed_with_its_sha256(tmp_path: Path) -> None:
    import csv
    import hashlib
    import json as _json

    ev = _evidence(tmp_path)
    ev.slug = "test_x-a"
    vals = np.array([0.1, 1 / 3, math.nan])
    path = ev.data("neurons", {"neuron": np.arange(3), "tokens": np.array([[1, 2], [3, 4], [5, 6]]),
                               "value": vals}, "per neuron")
    assert path == tmp_path / "data" / "H1_test_x-a_neurons.csv"  # beside figures/
    [entry] = ev.data_files
    assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (entry["rows"], entry["columns"], entry["file"]) == (3, ["neuron", "tokens", "value"],
                                                                "data/H1_test_x-a_neurons.csv")
    rows = list(csv.DictReader(path.open()))
    assert [_json.loads(r["tokens"]) for r in rows] == [[1, 2], [3, 4], [5, 6]]
    back = np.array([float(r["value"]) for r in rows])
    assert back[0] == 0.1 and back[1] == 1 / 3 and math.isnan(back[2])  # floats round-trip exactly
    assert ev.to_record()["data"] == [entry]
    with pytest.raises(ValueError, match="equally long"):
        ev.data("bad", {"a": [1, 2], "b": [1]}, "x")
    with pytest.raises(ValueError, match="plain file name part"):
        ev.data("a/b", {"a": [1]}, "x")


@pytest.mark.parametrize(
    ("direction", "estimate", "null", "verdict", "code"),
    [
        ("above", Estimate(0.8, 0.7, 0.9, 50, "b"), Estimate(0.1, 0.0, 0.2, 50, "n"), "supported", None),
        # beats the threshold, not the null: R3's case (-0.28 vs random firings' -0.42)
        ("above", Estimate(0.8, 0.7, 0.9, 50, "b"), Estimate(0.75, 0.6, 0.8, 50, "n"), "inconclusive", "null"),
        ("above", Estimate(0.8, 0.7, 0.9, 50, "b"), 0.95, "inconclusive", "null"),  # a bare number
        ("below", Estimate(-0.3, -0.35, -0.25, 50, "b"), Estimate(-0.42, math.nan, math.nan, 50, "n"),
         "inconclusive", "null"),
        ("below", Estimate(-0.3, -0.35, -0.25, 50, "b"), Estimate(-0.1, -0.2, 0.0, 50, "n"), "supported", None),
        ("above", Estimate(0.2, 0.1, 0.3, 50, "b"), Estimate(0.0, -0.1, 0.05, 50, "n"), "refuted", None),
    ],
)
def test_a_claim_is_judged_against_its_null(tmp_path: Path, direction, estimate, null, verdict, code) -> None:
    threshold = 0.5 if direction == "above" else 0.0
    d = Decision("r", direction, threshold=threshold, against={"from": "headline"})
    ev = _evidence(tmp_path, d)
    ev.record("r", estimate, null=null)
    if verdict == "supported":
        assert ev.judge() == "supported"
    else:
        with pytest.raises(ClaimRefuted if verdict == "refuted" else ClaimInconclusive):
            ev.judge()
    assert (ev.verdict, ev.code) == (verdict, code)
    assert any(n.startswith("Judged against the null recorded with it") for n in ev.notes)


def test_a_between_claim_must_overlap_its_null_and_a_missing_null_is_an_error(tmp_path: Path) -> None:
    d = Decision("m", "between", bounds=(-0.1, 0.1), against={"from": "headline"})
    ev = _evidence(tmp_path, d)
    ev.record("m", Estimate(0.05, 0.04, 0.06, 9, "b"), null=Estimate(0.0, -0.01, 0.01, 9, "n"))
    with pytest.raises(ClaimInconclusive):  # within bounds, but distinguishable from chance
        ev.judge()
    ev = _evidence(tmp_path, d)
    ev.record("m", Estimate(0.005, -0.01, 0.02, 9, "b"), null=Estimate(0.0, -0.01, 0.01, 9, "n"))
    assert ev.judge() == "supported"
    ev = _evidence(tmp_path, Decision("m", "between", bounds=(-0.1, 0.1), against={"statistic": "nul"}))
    ev.record("m", Estimate(0.005, -0.01, 0.02, 9, "b"))
    with pytest.raises(HarnessError, match="judges it against 'nul', which the test never recorded"):
        ev.judge()


def test_every_registry_claim_names_what_it_is_judged_against() -> None:
    from harness.evidence.registry import Registry

    real = Registry.load(Path(__file__).resolve().parents[3] / "fixtures" / "claims.yaml")
    for claim in real.claims.values():
        assert claim.decision.against is not None and len(claim.decision.against) == 1, claim.id


def _headline_record(value: float, lo: float, hi: float, verdict: str) -> dict:
    return {"test": "t", "verdict": verdict, "statistics": {"r": {
        "estimate": {"value": value, "ci_low": lo, "ci_high": hi}, "threshold": 0.0}}}


def test_training_contrast_known_answer() -> None:
    from harness.evidence.record import training_contrast

    tc = training_contrast(_headline_record(0.61, 0.58, 0.64, "supported"),
                           _headline_record(0.04, 0.00, 0.08, "supported"), "twin.json")
    assert tc["contrast"] == pytest.approx(0.57)
    assert (tc["ci_low"], tc["ci_high"]) == (pytest.approx(0.57 - 0.05), pytest.approx(0.57 + 0.05))
    assert tc["also_at_random_init"] is True and tc["twin_verdict"] == "supported"
    assert not training_contrast(_headline_record(0.6, 0.5, 0.7, "supported"),
                                 _headline_record(0.0, -0.1, 0.1, "inconclusive"), "t")["also_at_random_init"]
    assert "run the claims on the random-init twin first" in training_contrast(
        _headline_record(0.6, 0.5, 0.7, "supported"), None, "twin.json")["unavailable"]


def test_reports_are_written_with_the_usual_permissions(tmp_path: Path) -> None:
    """mkstemp's 0600 made evidence files unreadable to anyone else; the umask decides now."""
    import os
    import stat

    from harness.evidence.record import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "r.md", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "r.md").stat().st_mode) == 0o644
