"""Seed spread: a verdict that flips between SAE training seeds is never a confident one."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.evidence.record import ClaimEvidence, ClaimInconclusive
from harness.evidence.registry import Claim, Decision
from harness.statistics.reseed import render, spreads_from
from harness.statistics.seed_spread import SeedSpread, dump, load, lookup
from harness.statistics.stats import Estimate, exact

ROOT = Path(__file__).resolve().parents[3]


def _spread(*verdicts: str, key: str = "S5[source-5.0]") -> SeedSpread:
    return SeedSpread(key=key, statistic="r", seeds=tuple(range(len(verdicts))),
                      verdicts=verdicts, estimates=tuple(0.1 * i for i in range(len(verdicts))))


def _evidence(tmp_path: Path, spread: SeedSpread | None) -> ClaimEvidence:
    claim = Claim(id="S5", family="S", title="t", source="s", statement="big", definition="d",
                  decision=Decision(statistic="r", direction="above", threshold=0.5))
    ev = ClaimEvidence(claim=claim, subject_id="smollm2-135m", dtype="float32",
                       figure_dir=tmp_path)
    ev.seed_spread = spread
    return ev


def test_stable_and_band():
    s = _spread("supported", "supported", "supported")
    assert s.stable and s.band == (0.0, pytest.approx(0.2))
    assert not _spread("supported", "refuted").stable
    with pytest.raises(ValueError, match="equally long"):
        SeedSpread(key="x", statistic="r", seeds=(0,), verdicts=(), estimates=())


def test_an_unstable_spread_turns_a_supported_reading_into_inconclusive(tmp_path):
    ev = _evidence(tmp_path, _spread("supported", "refuted", "supported"))
    ev.record("r", exact(0.9, 10))
    with pytest.raises(ClaimInconclusive, match="seed-unstable"):
        ev.judge()
    assert (ev.verdict, ev.raw_verdict) == ("inconclusive", "supported")
    record = ev.to_record()
    assert record["seed_spread"]["stable"] is False and record["raw_verdict"] == "supported"


def test_a_stable_spread_keeps_the_verdict_and_is_noted(tmp_path):
    ev = _evidence(tmp_path, _spread("supported", "supported"))
    ev.record("r", exact(0.9, 10))
    assert ev.judge() == "supported"
    assert any("across 2 SAE training seeds" in n for n in ev.notes)


def test_dump_load_lookup_round_trip(tmp_path):
    path = tmp_path / "spread.yaml"
    dump(path, "a", {"S5[source-5.0]": _spread("supported", "refuted")}, "# header")
    dump(path, "b", {"S1": _spread("refuted", "refuted", key="S1")}, "# header")
    got = load(path)
    assert set(got) == {"a", "b"}  # the second dump kept the first subject
    assert lookup(got, "a", "S5", "source-5.0").verdicts == ("supported", "refuted")
    assert lookup(got, "a", "S5", "scale-free") is None
    assert lookup(got, "b", "S1", None).stable
    assert load(tmp_path / "missing.yaml") == {}


def test_spreads_from_per_seed_evidence_uses_the_raw_verdicts():
    def doc(verdict, raw, value):
        return {"claims": [
            {"id": "S5", "test": "test_x[source-5.0]", "verdict": verdict, "raw_verdict": raw,
             "statistics": {"median_outside_inside_ratio": {"estimate": {"value": value}}}},
            {"id": "R1", "test": "test_r1", "verdict": "supported", "statistics": {}},
        ]}

    registry = ROOT / "fixtures" / "claims.yaml"
    from harness.evidence.registry import Registry

    stat = Registry.load(registry)["S5"].decision.statistic
    docs = {0: doc("inconclusive", "inconclusive", 0.13), 1: doc("refuted", "refuted", 0.08)}
    for d in docs.values():
        d["claims"][0]["statistics"] = {stat: {"estimate": {"value": d["claims"][0]["statistics"].popitem()[1]["estimate"]["value"]}}}
    spreads = spreads_from(docs, registry)
    assert set(spreads) == {"S5[source-5.0]"}  # R1 (synthetic) is not an SAE-seed claim
    s = spreads["S5[source-5.0]"]
    assert s.verdicts == ("inconclusive", "refuted") and not s.stable
    assert s.estimates == (0.13, 0.08)
    assert "**no**" in render("smollm2-135m", spreads, {"build": 1.0})


def test_the_committed_fixture_parses():
    load(ROOT / "fixtures" / "seed_spread.yaml")


def test_tolerance_band_known_answers():
    s = SeedSpread(key="W2", statistic="slope", seeds=(0, 1, 2), verdicts=("supported",) * 3,
                   estimates=(0.10, 0.12, 0.11), varied="session-seed")
    # range 0.02 > the run's half-width 0.005: band [0.10 - 0.02, 0.12 + 0.02]
    lo, hi = s.tolerance(Estimate(0.11, 0.105, 0.115, 9, "b"), "float32")
    assert (lo, hi) == (pytest.approx(0.08), pytest.approx(0.14))
    assert s.drift(Estimate(0.13, 0.125, 0.135, 9, "b"), "float32") == 0.0
    assert s.drift(Estimate(0.15, 0.149, 0.151, 9, "b"), "float32") == pytest.approx(0.01)
    assert s.drift(Estimate(0.05, 0.049, 0.051, 9, "b"), "float32") == pytest.approx(-0.03)
    # the run's own interval widens the band when it is wider than the seeds' range
    assert s.drift(Estimate(0.15, 0.05, 0.25, 9, "b"), "float32") == 0.0
    # recorded in float32: no band for another dtype
    assert s.tolerance(Estimate(0.5, 0.5, 0.5, 9, "b"), "float64") is None
    assert s.drift(Estimate(0.5, 0.5, 0.5, 9, "b"), "float64") == 0.0


def test_an_identity_headline_gets_a_rounding_floor_not_a_zero_width_band():
    s = SeedSpread(key="H1[folded]", statistic="max_rel_error", seeds=(0, 1), verdicts=("supported",) * 2,
                   estimates=(1.2e-7, 1.2e-7), varied="session-seed")
    assert s.drift(exact(2.4e-7, 9), "float32") == 0.0  # another machine's rounding
    assert s.drift(exact(5e-6, 9), "float32") > 0  # a real change


def test_dump_replaces_one_kind_and_keeps_the_other(tmp_path):
    path = tmp_path / "spread.yaml"
    dump(path, "a", {"S5": _spread("supported", "supported", key="S5")}, "# h")
    h2 = SeedSpread(key="H2", statistic="r", seeds=(0, 1), verdicts=("supported",) * 2,
                    estimates=(0.4, 0.41), varied="session-seed")
    dump(path, "a", {"H2": h2}, "# h")
    loaded = load(path)["a"]
    assert set(loaded) == {"S5", "H2"} and loaded["H2"] == h2
    dump(path, "a", {"S1": _spread("refuted", "refuted", key="S1")}, "# h")
    assert set(load(path)["a"]) == {"S1", "H2"}  # S5 (same kind, not re-measured) dropped
