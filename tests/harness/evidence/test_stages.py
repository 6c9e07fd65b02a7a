"""harness.evidence.stages: exclusive stage time, the session recorder, per-test timings and the
controller's breakdown; and the plugin's table and ``timings`` evidence (pytester)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

import harness.evidence.stages as stages
from harness.evidence.stages import (
    HARNESS_TESTS,
    INSTALL_ENV,
    StageRecorder,
    StageTally,
    TestTiming,
    Timings,
    install_seconds_from_env,
)
from tests.standins import H1_REGISTRY, W1_NEAR_ZERO

pytest_plugins = ["pytester"]


class Clock:
    """A perf_counter the test advances by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(stages.time, "perf_counter", c)
    return c


# --- the recorder -------------------------------------------------------------------------


def test_nested_stages_are_charged_exclusive_time(clock: Clock) -> None:
    rec = StageRecorder()
    with rec.stage("SAE build"):
        clock.tick(1.0)
        with rec.stage("harvest"):
            clock.tick(2.0)
        with rec.stage("SAE build"):  # a producer's stage inside the fixture's: counted once
            clock.tick(4.0)
            with rec.stage("harvest"):
                clock.tick(8.0)
        clock.tick(16.0)
    assert rec.totals() == {"SAE build": 21.0, "harvest": 10.0}
    assert sum(rec.totals().values()) == 31.0  # the wall time, nothing twice


def test_a_raising_block_is_still_charged_and_since_gives_deltas(clock: Clock) -> None:
    rec = StageRecorder()
    with rec.stage("model load"):
        clock.tick(1.5)
    before = rec.totals()
    with pytest.raises(RuntimeError), rec.stage("model load"):
        clock.tick(0.5)
        raise RuntimeError("unavailable")
    rec.add("corpus", 2.0)
    assert rec.totals() == {"model load": 2.0, "corpus": 2.0}
    assert rec.since(before) == {"model load": 0.5, "corpus": 2.0}
    assert rec.since(rec.totals()) == {}


@pytest.mark.parametrize("bad", ["", "  ", None])
def test_a_stage_needs_a_name(bad: object) -> None:
    with pytest.raises(ValueError, match="non-empty string"), StageRecorder().stage(bad):  # type: ignore[arg-type]
        pass


def test_stage_charges_the_active_recorder_and_activate_restores(clock: Clock) -> None:
    mine = StageRecorder()
    previous = stages.activate(mine)
    try:
        assert stages.recorder() is mine
        with stages.stage(stages.HARVEST):
            clock.tick(3.0)
    finally:
        assert stages.activate(previous) is mine
    assert mine.totals() == {"harvest": 3.0}
    assert stages.recorder() is previous


@pytest.mark.parametrize(("raw", "seconds"), [
    ("12.5", 12.5), (" 3 ", 3.0), ("0", 0.0), ("", None), ("soon", None), ("-1", None),
    ("nan", None), ("inf", None),
])
def test_install_seconds_from_env(raw: str, seconds: float | None) -> None:
    assert install_seconds_from_env({INSTALL_ENV: raw}) == seconds
    assert install_seconds_from_env({}) is None


def test_noxfile_passes_the_variable_the_plugin_reads() -> None:
    noxfile = (Path(__file__).resolve().parents[3] / "noxfile.py").read_text(encoding="utf-8")
    assert f'INSTALL_ENV = "{INSTALL_ENV}"' in noxfile
    assert noxfile.count("env = timed_install(session)") == noxfile.count("env=env)") == 5


# --- timings and the breakdown ------------------------------------------------------------


def test_test_timing_subtracts_stages_and_round_trips() -> None:
    t = TestTiming.measure("family H", 5.0, {"SAE build": 3.5, "model load": 1.0})
    assert t.seconds == pytest.approx(0.5) and t.pid == os.getpid()
    assert TestTiming.from_dict(json.loads(json.dumps(t.to_dict()))) == t
    assert TestTiming.measure("family H", 1.0, {"corpus": 1.2}).seconds == 0.0  # never negative


def test_single_process_summary(clock: Clock) -> None:
    own = StageRecorder()
    own.add("SAE build", 30.0)
    own.add("model load", 5.0)
    own.add("zebra", 1.0)  # any other name follows the suite's stages
    tally = StageTally(own)
    tally.add(TestTiming.measure("family S", 40.0, {"SAE build": 30.0}))
    tally.add(TestTiming.measure(HARNESS_TESTS, 2.0, {}))
    tally.add(TestTiming.measure("family H", 8.0, {"model load": 5.0}))
    t = tally.summary(wall_seconds=60.0, install_seconds=20.0)
    assert t.workers == 1
    assert [n for n, _ in t.rows] == ["install", "model load", "SAE build", "zebra", "family H",
                                      "family S", "harness tests", "other"]
    assert dict(t.rows) == {"install": 20.0, "model load": 5.0, "SAE build": 30.0, "zebra": 1.0,
                            "family H": 3.0, "family S": 10.0, "harness tests": 2.0,
                            "other": 9.0}
    assert t.accounted_seconds == 80.0  # = wall + install
    d = t.to_dict()
    assert d["wall_seconds"] == 60.0 and d["install_seconds"] == 20.0
    assert d["rows"][0] == {"name": "install", "seconds": 20.0, "share": 0.25}
    assert sum(r["share"] for r in d["rows"]) == pytest.approx(1.0, abs=1e-3)


def test_xdist_summary_sums_the_workers_stages() -> None:
    tally = StageTally(StageRecorder())  # the controller runs no test
    worker_a, worker_b = os.getpid() + 1, os.getpid() + 2
    tally.add(TestTiming("family H", 2.0, {"model load": 4.0}, pid=worker_a))
    tally.add(TestTiming("family H", 3.0, {"model load": 6.0}, pid=worker_b))
    t = tally.summary(wall_seconds=9.0)
    assert t == Timings(wall_seconds=9.0, rows=(("model load", 10.0), ("family H", 5.0)),
                        install_seconds=None, workers=2)


# --- through the plugin (pytester) ----------------------------------------------------------

REGISTRY = H1_REGISTRY + W1_NEAR_ZERO

TESTS = """
import time

import pytest

from harness.evidence.stages import SAE_BUILD, stage
from harness.statistics.stats import exact


@pytest.fixture(scope="session")
def built():
    with stage(SAE_BUILD):
        time.sleep(0.6)
    return "saes"


@pytest.mark.claim(id="H1")
def test_h(evidence, built):
    time.sleep(0.1)
    evidence.record("r", exact(0.9, 1))
    evidence.judge()


@pytest.mark.claim(id="W1")
def test_w(evidence, built):
    evidence.record("m", exact(0.0, 1))
    evidence.judge()


def test_plain():
    with stage("harvest"):
        time.sleep(0.2)
"""


def test_the_plugin_prints_and_records_the_breakdown(pytester: pytest.Pytester,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(INSTALL_ENV, "12.5")
    pytester.makeini("[pytest]\n")
    (pytester.path / "fixtures").mkdir()
    (pytester.path / "fixtures" / "claims.yaml").write_text(REGISTRY, encoding="utf-8")
    pytester.makeconftest('pytest_plugins = ["harness.evidence.plugin"]\n')
    pytester.makepyfile(test_timed=TESTS)
    ev = pytester.path / "ev"
    result = pytester.runpytest("-p", "no:cacheprovider", "-p", "no:hypothesispytest",
                                f"--evidence-dir={ev}")
    result.assert_outcomes(passed=3)

    doc = json.loads((ev / "smollm2-135m" / "evidence.json").read_text(encoding="utf-8"))
    timings = doc["timings"]
    rows = {r["name"]: r for r in timings["rows"]}
    assert list(rows) == ["install", "harvest", "SAE build", "family H", "family W",
                          "harness tests", "other"]
    assert rows["install"]["seconds"] == 12.5 and timings["install_seconds"] == 12.5
    assert rows["SAE build"]["seconds"] >= 0.6 and rows["harvest"]["seconds"] >= 0.2
    # the SAE build ran in test_h's setup: it is not in family H's seconds
    assert 0.1 <= rows["family H"]["seconds"] < 0.4
    assert rows["harness tests"]["seconds"] < 0.2  # test_plain's harvest is not counted twice
    assert timings["workers"] == 1
    assert sum(r["seconds"] for r in timings["rows"]) == pytest.approx(
        timings["wall_seconds"] + 12.5, abs=0.01)

    out = result.outlines
    start = next(i for i, line in enumerate(out) if "wall time by stage" in line)
    assert re.fullmatch(r"stage\s+seconds\s+share", out[start + 1])
    assert re.fullmatch(r"install\s+12\.5\s+\d+\.\d%", out[start + 2])
    assert re.fullmatch(r"SAE build\s+0\.\d\s+\d+\.\d%", out[start + 4])
    assert re.fullmatch(r"session wall time \d+\.\d s \(\+ install 12\.5 s\); shares are of "
                        r"the rows' sum", out[start + 9])

    md = (ev / "smollm2-135m" / "evidence.md").read_text(encoding="utf-8")
    assert "## Wall time by stage" in md and "| stage | seconds | share |" in md
    assert re.search(r"\| SAE build \| 0\.\d \| \d+\.\d% \|", md)
    assert "(+ install 12.5 s)" in md
