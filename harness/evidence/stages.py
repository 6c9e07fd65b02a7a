"""Where a run's wall time goes: named stages, per-test timings and the session breakdown.

Producers mark their expensive work with :func:`stage`::

    from harness.evidence.stages import stage

    with stage("SAE build"):
        ...

Time inside a stage is recorded on the process's *session recorder* (a :class:`StageRecorder`;
the pytest plugin installs a fresh one per pytest session with :func:`activate` and restores the
previous one at the end; outside pytest a process-wide default recorder collects it). Stages may
nest: each stage is charged its *exclusive* time (its own elapsed time minus that of the stages
it contains), so no second is counted twice, and a stage nested in one of the same name (a
fixture's ``SAE build`` around a producer's ``SAE build``) counts once. Only finished stages
are counted; do not ``yield`` inside a stage (a generator fixture would charge its whole test
to it). Stage names are free text; the suite's own are the constants below.

The plugin measures each test's setup + call + teardown and subtracts the stage time that
finished inside them (:class:`TestTiming`), so a claim family's total never includes a model
load or SAE build its fixtures triggered. :class:`StageTally` sums those per-test records on the
controlling process and :meth:`StageTally.summary` makes the :class:`Timings` breakdown.

Standard library only: producers import this without pulling in anything heavy.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CORPUS",
    "HARNESS_TESTS",
    "HARVEST",
    "INSTALL",
    "INSTALL_ENV",
    "MODEL_LOAD",
    "SAE_BUILD",
    "SUBJECT_TRAINING",
    "StageRecorder",
    "StageTally",
    "TestTiming",
    "Timings",
    "activate",
    "family_label",
    "install_seconds_from_env",
    "recorder",
    "stage",
]

INSTALL = "install"
"""Installing the environment (nox), before pytest starts; passed in through INSTALL_ENV."""
MODEL_LOAD = "model load"
SUBJECT_TRAINING = "subject training"
"""Training a subject the suite builds itself (the size ladder), on first use or ahead."""
CORPUS = "corpus"
HARVEST = "harvest"
SAE_BUILD = "SAE build"
STAGE_ORDER = (INSTALL, MODEL_LOAD, SUBJECT_TRAINING, CORPUS, HARVEST, SAE_BUILD)
"""The suite's stages, in the order the breakdown lists them (any other name follows)."""

HARNESS_TESTS = "harness tests"
"""The family row of tests without a claim marker."""
OTHER = "other"
"""Session wall time in no stage and no test (start-up, collection); single-process runs only."""
INSTALL_ENV = "INTERP_CLAIMS_INSTALL_SECONDS"
"""Environment variable through which nox hands pytest the seconds its install took."""


class StageRecorder:
    """Exclusive seconds per stage name in one process. Thread-safe; stages nest per thread."""

    def __init__(self) -> None:
        self._totals: dict[str, float] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    def _stack(self) -> list[list[Any]]:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Charge the time inside the block (less any nested stage) to ``name``, also when
        the block raises (a skip or failure still spent the time)."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"a stage name must be a non-empty string, got {name!r}")
        stack = self._stack()
        frame = [name, time.perf_counter(), 0.0]  # name, start, seconds in nested stages
        stack.append(frame)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - frame[1]
            stack.pop()
            if stack:
                stack[-1][2] += elapsed
            self.add(name, max(0.0, elapsed - frame[2]))

    def add(self, name: str, seconds: float) -> None:
        """Charge ``seconds`` measured elsewhere to ``name``."""
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"stage seconds must be finite and >= 0, got {seconds!r}")
        with self._lock:
            self._totals[name] = self._totals.get(name, 0.0) + seconds

    def totals(self) -> dict[str, float]:
        """Seconds per stage of the stages finished so far (a snapshot)."""
        with self._lock:
            return dict(self._totals)

    def since(self, before: Mapping[str, float]) -> dict[str, float]:
        """Seconds per stage finished since the snapshot ``before`` (only stages with time)."""
        now = self.totals()
        return {k: v - before.get(k, 0.0) for k, v in now.items() if v - before.get(k, 0.0) > 0}


# The process's session recorder: the one documented module global. `stage()` charges it.
_DEFAULT = StageRecorder()
_active: StageRecorder = _DEFAULT


def recorder() -> StageRecorder:
    """The process's current session recorder."""
    return _active


def activate(new: StageRecorder) -> StageRecorder:
    """Make ``new`` the session recorder; returns the previous one, to restore at the end
    (the plugin does this per pytest session, so nested in-process sessions stay apart)."""
    global _active
    previous, _active = _active, new
    return previous


def stage(name: str):
    """``with stage("harvest"): ...`` charges the block to the current session recorder."""
    return _active.stage(name)


def install_seconds_from_env(environ: Mapping[str, str] | None = None) -> float | None:
    """The install seconds nox passed in ``INTERP_CLAIMS_INSTALL_SECONDS``; None when unset
    or not a finite non-negative number (a reporting aid, never a reason to stop a run)."""
    raw = (os.environ if environ is None else environ).get(INSTALL_ENV, "").strip()
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


@dataclass(frozen=True)
class TestTiming:
    """One test's time, measured where it ran: ``seconds`` is setup + call + teardown less
    the stage time finished inside them (``stages``), charged to ``family``."""

    __test__ = False  # not a pytest test class

    family: str
    seconds: float
    stages: Mapping[str, float] = field(default_factory=dict)
    pid: int = field(default_factory=os.getpid)
    """The process that ran the test: its stages are in that process's own recorder."""

    @classmethod
    def measure(cls, family: str, phase_seconds: float, stages: Mapping[str, float]) -> TestTiming:
        return cls(family=family, seconds=max(0.0, phase_seconds - sum(stages.values())),
                   stages=dict(stages))

    def to_dict(self) -> dict[str, Any]:
        """Plain types, for ``report.user_properties`` (pytest-xdist serialises those)."""
        return {"family": self.family, "seconds": self.seconds, "stages": dict(self.stages),
                "pid": self.pid}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TestTiming:
        return cls(family=str(d["family"]), seconds=float(d["seconds"]),
                   stages={str(k): float(v) for k, v in d["stages"].items()}, pid=int(d["pid"]))


@dataclass(frozen=True)
class Timings:
    """The session's breakdown: ``rows`` of (stage or family, seconds), listed in order."""

    wall_seconds: float
    """pytest's session on the controlling process, start-up to finish (install excluded)."""
    rows: tuple[tuple[str, float], ...]
    install_seconds: float | None = None
    workers: int = 1
    """Processes that ran tests. Above 1 (pytest-xdist) the stage and family rows are summed
    over the workers, so they can add up to more than the wall time, and there is no
    ``other`` row."""

    @property
    def accounted_seconds(self) -> float:
        return sum(s for _, s in self.rows)

    def shares(self) -> list[tuple[str, float, float]]:
        """(name, seconds, share of the rows' sum) per row."""
        total = self.accounted_seconds
        return [(n, s, s / total if total > 0 else 0.0) for n, s in self.rows]

    def to_dict(self) -> dict[str, Any]:
        return {
            "wall_seconds": round(self.wall_seconds, 3),
            "install_seconds": None if self.install_seconds is None
            else round(self.install_seconds, 3),
            "workers": self.workers,
            "rows": [{"name": n, "seconds": round(s, 3), "share": round(f, 4)}
                     for n, s, f in self.shares()],
        }


def family_label(family: str | None) -> str:
    """The row name of a claim family (``None``: tests without a claim marker)."""
    return HARNESS_TESTS if family is None else f"family {family}"


class StageTally:
    """Controller-side: sums the per-test timings the reports carry."""

    def __init__(self, own: StageRecorder) -> None:
        self.own = own
        """The controller's own recorder: stages of tests it ran itself, and outside tests."""
        self.families: dict[str, float] = {}
        self.remote_stages: dict[str, float] = {}
        self.pids: set[int] = set()

    def add(self, timing: TestTiming) -> None:
        self.families[timing.family] = self.families.get(timing.family, 0.0) + timing.seconds
        self.pids.add(timing.pid)
        if timing.pid != os.getpid():  # an xdist worker: its stages are not in `own`
            for name, seconds in timing.stages.items():
                self.remote_stages[name] = self.remote_stages.get(name, 0.0) + seconds

    def summary(self, wall_seconds: float, install_seconds: float | None = None) -> Timings:
        """The breakdown: install, stages (suite order, then by name), families, harness tests,
        and, when every test ran in this process, ``other`` (wall time in none of those).
        Stage time a worker spent outside any test (rare: stages run in fixtures) is not seen."""
        stages = self.own.totals()
        for name, seconds in self.remote_stages.items():
            stages[name] = stages.get(name, 0.0) + seconds
        rows: list[tuple[str, float]] = []
        if install_seconds is not None:
            rows.append((INSTALL, install_seconds))
        stages.pop(INSTALL, None)
        rank = {name: i for i, name in enumerate(STAGE_ORDER)}
        rows += sorted(stages.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0]))
        rows += sorted(((n, s) for n, s in self.families.items() if n != HARNESS_TESTS))
        if HARNESS_TESTS in self.families:
            rows.append((HARNESS_TESTS, self.families[HARNESS_TESTS]))
        in_process = self.pids <= {os.getpid()}
        if in_process:  # every test ran here: what the rows miss of the wall time is overhead
            in_session = sum(s for n, s in rows if n != INSTALL)
            rows.append((OTHER, max(0.0, wall_seconds - in_session)))
        return Timings(wall_seconds=wall_seconds, rows=tuple(rows), install_seconds=install_seconds,
                       workers=1 if in_process else len(self.pids))
