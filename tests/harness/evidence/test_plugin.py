"""The pytest plugin, run on throwaway projects through pytester.

Every project gets its own small registry and a conftest loading ``harness.evidence.plugin``;
its claim tests use only ``evidence``, ``claim``, ``rng`` and ``run_state`` (no real model).
In-process runs are cheap (the heavy imports are already loaded). The two subprocess runs (a
crash; xdist with an offline hub subject and a shared model) batch several checks, because
each process pays for importing torch (and transformer-lens) again.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.evidence import stages
from harness.evidence.record import SCHEMA_VERSION
from tests.standins import H1_REGISTRY, W1_NEAR_ZERO

pytest_plugins = ["pytester"]

SUBJECT = "smollm2-135m"

REGISTRY = H1_REGISTRY + """\
  H2:
    family: H
    title: a tiny error
    source: a test source
    statement: The error is tiny.
    definition: max error
    decision:
      statistic: err
      direction: below
      threshold: {float32: 1.0e-4, float64: 1.0e-10}
      against: {none: a test claim}
    expected: {smollm2-135m: refuted}
""" + W1_NEAR_ZERO + """\
    expected: {smollm2-135m: refuted}
"""

CONFTEST = 'pytest_plugins = ["harness.evidence.plugin"]\n'

HEADER = """\
import pytest
from harness.statistics.stats import Estimate, exact
"""


def _project(pytester: pytest.Pytester, tests: str, registry: str = REGISTRY,
             conftest: str = CONFTEST) -> None:
    pytester.makeini("[pytest]\n")  # pins the rootdir: the registry is fixtures/claims.yaml
    (pytester.path / "fixtures").mkdir()
    (pytester.path / "fixtures" / "claims.yaml").write_text(registry, encoding="utf-8")
    pytester.makeconftest(conftest)
    pytester.makepyfile(test_claims=HEADER + tests)


def _records(path: Path) -> dict[str, dict]:
    """Claim records of an evidence.json, by test name (each test at most once)."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    names = [c["test"] for c in doc["claims"]]
    assert len(names) == len(set(names)), f"a test recorded twice: {names}"
    return {c["test"]: c for c in doc["claims"]}


def _line_with(lines: list[str], *parts: str) -> str:
    """The first line holding every part, in this order (plain substrings, no globbing)."""
    for line in lines:
        pos = 0
        for part in parts:
            pos = line.find(part, pos)
            if pos < 0:
                break
            pos += len(part)
        else:
            return line
    raise AssertionError(f"no line holds {parts}; output:\n" + "\n".join(lines))


# Hypothesis' plugin imports hypothesis in its terminal summary: 3 s per inner run, since
# pytester drops modules an in-process run imported. None of these projects use it.
QUIET = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest")


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest(*QUIET, *args)


# --- verdicts and the report (in process) -------------------------------------------------

SUPPORTED = """
import numpy as np
from harness.statistics.stats import claim_rng

@pytest.mark.claim(id="H1")
def test_big(evidence, claim, rng, run_state):
    assert claim.id == "H1" and run_state.spec.id == "smollm2-135m"
    assert np.array_equal(rng.random(3), claim_rng(run_state.seed, "H1").random(3))
    evidence.record("r", Estimate(0.8, 0.7, 0.9, 50, "bootstrap-percentile"), description="r")
    evidence.note("a note,   with   spaces")
    assert evidence.judge() == "supported"

def test_not_a_claim():
    pass
"""


def test_supported_claim_passes_and_writes_the_report(pytester: pytest.Pytester) -> None:
    _project(pytester, SUPPORTED)
    ev = pytester.path / "ev"
    result = _run(pytester, f"--evidence-dir={ev}", "--seed=3", "--dtype=float64")
    result.assert_outcomes(passed=2)
    out = result.outlines
    _line_with(out, f"claims on {SUBJECT}")
    _line_with(out, "claim", "test", "verdict", "headline statistic", "95% CI", "threshold")
    _line_with(out, "H1", "test_big", "supported", "r = 0.8", "[0.7, 0.9]", "above 0.5")
    run_dir = ev / f"{SUBJECT}@float64-seed3"  # not the default run: its own directory
    _line_with(out, f"evidence: {run_dir / 'evidence.json'}")

    doc = json.loads((run_dir / "evidence.json").read_text())
    assert doc["schema_version"] == SCHEMA_VERSION and doc["subject_id"] == SUBJECT
    prov = doc["provenance"]
    assert {"commit", "dirty"} <= set(prov["git"])
    assert prov["packages"]["pytest"] == pytest.__version__
    assert (prov["device"], prov["dtype"], prov["seed"]) == ("cpu", "float64", 3)
    [record] = doc["claims"]  # the non-claim test adds nothing
    assert (record["id"], record["verdict"], record["test"]) == ("H1", "supported", "test_big")
    assert record["statement"] == "The statistic r is large."
    assert record["statistics"]["r"]["estimate"] == {
        "value": 0.8, "ci_low": 0.7, "ci_high": 0.9, "n": 50,
        "method": "bootstrap-percentile", "confidence": 0.95}
    assert record["statistics"]["r"]["threshold"] == 0.5
    assert record["notes"] == ["a note, with spaces"]
    assert record["expected"] is False and record["outcome"] == "passed"
    assert record["duration_s"] >= 0

    md = (run_dir / "evidence.md").read_text()
    assert "| claim | test | verdict | headline statistic | 95% CI | threshold |" in md
    assert "| H1 | test_big | supported | r = 0.8 | [0.7, 0.9] | above 0.5 |" in md
    assert "seed 3" in md and "dtype float64" in md


VERDICTS = """
@pytest.mark.claim(id="H1")
def test_refuted(evidence):
    evidence.record("r", Estimate(0.2, 0.1, 0.3, 50, "bootstrap-percentile"))
    evidence.judge()

@pytest.mark.claim(id="H1")
def test_inconclusive(evidence):
    evidence.record("r", Estimate(0.5, 0.4, 0.6, 50, "bootstrap-percentile"))
    evidence.judge()

@pytest.mark.claim(id="H2")
def test_expected_refutation(evidence):
    evidence.record("err", exact(0.5, 10))
    evidence.judge()

@pytest.mark.claim(id="W1")
def test_flips_to_supported(evidence):
    evidence.record("m", exact(0.0, 10))
    evidence.judge()

@pytest.mark.claim(id="H1")
def test_breaks(evidence):
    raise RuntimeError("boom")
"""


def test_refuted_inconclusive_expected_and_flipped_verdicts(pytester: pytest.Pytester) -> None:
    _project(pytester, VERDICTS)
    ev = pytester.path / "ev"
    result = _run(pytester, f"--evidence-dir={ev}", "-rA")
    result.assert_outcomes(failed=4, xfailed=1)
    out = result.outlines
    # refuted: the failure quotes the statement and the estimate
    _line_with(out, "ClaimRefuted: H1 refuted on smollm2-135m: 'The statistic r is large.'",
               "r = 0.2 [0.1, 0.3] (n=50), claim needs it above 0.5")
    _line_with(out, "ClaimInconclusive: H1 inconclusive on smollm2-135m:",
               "r = 0.5 [0.4, 0.6] (n=50)")
    _line_with(out, "XFAIL test_claims.py::test_expected_refutation",
               "H2 recorded as refuted on smollm2-135m")
    # An expected refutation that now passes is a failure: the flip is caught.
    _line_with(out, "W1 on smollm2-135m: measured supported, the registry records refuted")

    records = _records(ev / SUBJECT / "evidence.json")
    assert set(records) == {"test_refuted", "test_inconclusive", "test_expected_refutation",
                            "test_flips_to_supported", "test_breaks"}
    refuted = records["test_refuted"]
    assert (refuted["verdict"], refuted["outcome"]) == ("refuted", "failed")
    assert refuted["reason"].startswith("H1 refuted on smollm2-135m: 'The statistic r is large.'")
    assert records["test_inconclusive"]["verdict"] == "inconclusive"
    expected = records["test_expected_refutation"]
    assert (expected["verdict"], expected["expected"], expected["outcome"]) == (
        "refuted", True, "skipped")
    flipped = records["test_flips_to_supported"]
    assert (flipped["verdict"], flipped["expected"], flipped["outcome"]) == (
        "supported", False, "failed")
    assert flipped["expected_verdict"] == "refuted"
    broken = records["test_breaks"]
    assert (broken["verdict"], broken["reason"]) == ("error", "RuntimeError: boom")

    md = (ev / SUBJECT / "evidence.md").read_text()
    assert ("| H2 | test_expected_refutation | refuted (expected) | err = 0.5 | exact "
            "| below 0.0001 |") in md
    assert ("| W1 | test_flips_to_supported | supported | m = 0 | exact "
            "| between [-0.1, 0.1] |") in md


NOT_VERDICTS = """
import math
from harness.evidence.record import ClaimRefuted

@pytest.mark.claim(id="H1")
def test_never_judges(evidence):
    evidence.record("r", Estimate(0.8, 0.7, 0.9, 50, "b"))

@pytest.mark.claim(id="H1")
def test_no_evidence_fixture():
    pass

@pytest.mark.claim(id="H1")
def test_plain_assert(evidence):
    evidence.record("r", Estimate(0.8, 0.7, 0.9, 50, "b"))
    assert 1 + 1 == 3, "a precondition"  # deliberately false: a plain assert must be an error

@pytest.mark.claim(id="H1")
def test_refuted_by_hand(evidence):
    raise ClaimRefuted("H1 refuted, says the test")

@pytest.mark.claim(id="H1")
def test_swallows_its_verdict(evidence):
    evidence.record("r", Estimate(0.2, 0.1, 0.3, 50, "b"))
    try:
        evidence.judge()
    except ClaimRefuted:
        pass

@pytest.mark.claim(id="H1")
def test_nan_headline(evidence):
    evidence.record("r", Estimate(math.nan, 0.7, 0.9, 50, "b"))
    evidence.judge()

@pytest.mark.claim(id="H1")
def test_nan_interval(evidence):
    evidence.record("r", Estimate(0.8, math.nan, math.nan, 50, "b"))
    evidence.judge()
"""


def test_only_judge_makes_a_verdict(pytester: pytest.Pytester) -> None:
    """Judge-less tests, plain asserts, verdicts raised by hand or swallowed, and NaN
    headlines are harness errors: the run fails and the record says 'error', never a verdict
    (before: supported, refuted, refuted, refuted, supported, inconclusive, inconclusive)."""
    _project(pytester, NOT_VERDICTS)
    ev = pytester.path / "ev"
    result = _run(pytester, f"--evidence-dir={ev}")
    result.assert_outcomes(failed=7)
    records = _records(ev / SUBJECT / "evidence.json")
    assert {name: r["verdict"] for name, r in records.items()} == dict.fromkeys(records, "error")
    assert len(records) == 7
    assert "never called evidence.judge()" in records["test_never_judges"]["reason"]
    assert "never called evidence.judge()" in records["test_no_evidence_fixture"]["reason"]
    assert records["test_plain_assert"]["reason"] == "AssertionError: a precondition"
    assert "raised by hand" in records["test_refuted_by_hand"]["reason"]
    assert "judged refuted and then passed" in records["test_swallows_its_verdict"]["reason"]
    for name in ("test_nan_headline", "test_nan_interval"):
        assert "HarnessError: H1 on smollm2-135m: headline r" in records[name]["reason"], name
        assert "non-finite" in records[name]["reason"]
    _line_with(result.outlines, "harness error: the claim test ended without a verdict")


CODES = """
@pytest.mark.claim(id="H2")
def test_interval(evidence):
    evidence.record("err", Estimate(1e-4, 1e-5, 1e-3, 9, "b"))
    evidence.judge()

@pytest.mark.claim(id="H2")
def test_early_exit(evidence):
    evidence.inconclusive("too few of something", code="too-few-units")
"""


def test_an_expected_inconclusive_needs_its_reason_code(pytester: pytest.Pytester) -> None:
    """An early exit ('too few units') does not satisfy an expected inconclusive of the
    interval kind, and the reason code is in the record."""
    registry = REGISTRY.replace("    expected: {smollm2-135m: refuted}\n",
                                "    expected: {smollm2-135m: inconclusive/interval}\n", 1)
    _project(pytester, CODES, registry=registry)
    ev = pytester.path / "ev"
    result = _run(pytester, f"--evidence-dir={ev}", "-rA")
    result.assert_outcomes(xfailed=1, failed=1)
    records = _records(ev / SUBJECT / "evidence.json")
    assert (records["test_interval"]["reason_code"], records["test_interval"]["expected"]) == (
        "interval", True)
    early = records["test_early_exit"]
    assert (early["verdict"], early["reason_code"], early["expected"]) == (
        "inconclusive", "too-few-units", False)
    _line_with(result.outlines, "measured inconclusive/too-few-units, the registry records "
               "inconclusive/interval")



# --- usage errors (in process) ------------------------------------------------------------

VALID_TEST = """
@pytest.mark.claim(id="H1")
def test_ok(evidence):
    evidence.record("r", exact(0.9, 1))
    evidence.judge()
"""


def _marked(marker: str) -> str:
    return f"\n{marker}\ndef test_marked(evidence):\n    pass\n"


@pytest.mark.parametrize(
    ("tests", "registry_edit", "args", "message"),
    [
        pytest.param(_marked('@pytest.mark.claim(id="H9")'), None, [],
                     ("test_claims.py::test_marked: unknown claim id 'H9'; the registry (",
                      "claims.yaml) knows H1, H2, W1"), id="unknown-id"),
        pytest.param(_marked('@pytest.mark.claim("H1")'), None, [],
                     ("the claim marker takes exactly id=...; got args ('H1',), kwargs []",),
                     id="positional-marker"),
        pytest.param(_marked('@pytest.mark.claim(id="H1", threshold=0.3)'), None, [],
                     ("the claim marker takes exactly id=...", "kwargs ['id', 'threshold']"),
                     id="extra-marker-kwarg"),
        pytest.param(_marked("@pytest.mark.claim"), None, [],
                     ("the claim marker takes exactly id=...",), id="bare-marker"),
        pytest.param(_marked('@pytest.mark.claim(id="H1")\n@pytest.mark.claim(id="H2")'), None,
                     [], ("test_marked: more than one claim marker",), id="two-markers"),
        pytest.param(VALID_TEST, None, ["--subject", "gpt3-huge"],
                     ("unknown subject 'gpt3-huge': known subjects are gpt2-small, "
                      "smollm2-135m, solu-1l, solu-2l",), id="unknown-subject"),
        pytest.param(VALID_TEST, None, ["--subject", "ckpt"],
                     ("ckpt is not a Hugging Face checkpoint directory (no config.json in it)",),
                     id="subject-dir-without-config"),
        pytest.param(VALID_TEST, None, ["--device", "cuda"],
                     ("--device cuda asked for, but torch sees no CUDA device here",),
                     id="absent-cuda"),
        pytest.param(VALID_TEST, None, ["--corpus", "nowhere"],
                     ("--corpus ", "nowhere: no such file or directory",), id="corpus-missing"),
        pytest.param(VALID_TEST, None, ["--corpus", "bad.jsonl"],
                     ("bad.jsonl, line 2: no 'text' field (found ['txt']); every line needs one",),
                     id="corpus-jsonl-line-without-text"),
        pytest.param(VALID_TEST, None, ["--dtype", "nonsense"],
                     ("unknown dtype 'nonsense'; choose one of ['bfloat16'",), id="bad-dtype"),
        pytest.param(VALID_TEST, ("    title: near zero\n", "    title: x\n    tolerance: 1\n"),
                     [], ("claim W1: unknown keys ['tolerance'], missing keys []",),
                     id="registry-unknown-key"),
        pytest.param(VALID_TEST, ("{smollm2-135m: refuted}", "{smollm2-135m: passes}"), [],
                     ("claim H2: smollm2-135m: expected verdict 'passes': 'passes' not in (",),
                     id="registry-bad-verdict"),
        pytest.param(VALID_TEST, ("{smollm2-135m: refuted}", "{smollm2-135m: inconclusive}"), [],
                     ("claim H2: smollm2-135m: expected 'inconclusive': an expected inconclusive "
                      "names its reason",), id="registry-inconclusive-without-code"),
        pytest.param(VALID_TEST, ("direction: above", "direction: upward"), [],
                     ("claim H1: direction must be one of", "not 'upward'"),
                     id="registry-bad-direction"),
        pytest.param(VALID_TEST, ("  W1:\n", "  H2:\n"), [],
                     ("claims.yaml is not valid YAML: found duplicate key 'H2' at line 22",),
                     id="registry-duplicate-id"),
    ],
)
def test_usage_errors(pytester: pytest.Pytester, tests: str,
                      registry_edit: tuple[str, str] | None, args: list[str],
                      message: tuple[str, ...]) -> None:
    if "--device" in args:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA: --device cuda is valid here")
    registry = REGISTRY
    if registry_edit is not None:
        assert registry_edit[0] in registry
        registry = registry.replace(*registry_edit, 1)
    _project(pytester, tests, registry=registry)
    (pytester.path / "ckpt").mkdir()
    (pytester.path / "bad.jsonl").write_text('{"text": "a"}\n{"txt": "b"}\n', encoding="utf-8")
    result = _run(pytester, f"--evidence-dir={pytester.path / 'ev'}", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.errlines if line.startswith("ERROR:")]
    assert len(errors) == 1, result.errlines  # one line says what is wrong
    _line_with(errors, "ERROR: ", *message)
    assert not (pytester.path / "ev").exists()  # nothing measured, nothing reported


# --- subprocess runs ----------------------------------------------------------------------

CRASH = """
import os

@pytest.mark.claim(id="H1")
def test_first(evidence):
    evidence.record("r", exact(0.9, 1))
    evidence.judge()

@pytest.mark.claim(id="H1")
def test_second(evidence):
    evidence.record("r", exact(0.8, 1))
    os._exit(1)  # the interpreter dies: no teardown, no session finish

@pytest.mark.claim(id="W1")
def test_third(evidence):
    pass
"""


def test_a_crash_keeps_what_was_already_measured(pytester: pytest.Pytester) -> None:
    _project(pytester, CRASH)
    # A relative --evidence-dir is relative to where pytest was invoked.
    result = pytester.runpytest_subprocess(*QUIET, "--evidence-dir=out/ev",
                                           timeout=120)
    assert result.ret == 1
    records = _records(pytester.path / "out" / "ev" / SUBJECT / "evidence.json")
    assert list(records) == ["test_first"]
    assert records["test_first"]["verdict"] == "supported"
    md = (pytester.path / "out" / "ev" / SUBJECT / "evidence.md").read_text()
    assert "| H1 | test_first | supported |" in md


XDIST_CONFTEST = '''
import dataclasses
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

import harness.evidence.record

pytest_plugins = ["harness.evidence.plugin"]

# Log every report write with the writing process, to show only the controller writes.
HERE = Path(__file__).parent
_flush = harness.evidence.record.EvidenceWriter.flush


def _logged_flush(self):
    with (HERE / "flushes.log").open("a") as fh:
        fh.write(f"{os.getpid()} {len(self.records)}\\n")
    _flush(self)


harness.evidence.record.EvidenceWriter.flush = _logged_flush


def pytest_configure(config):
    if not hasattr(config, "workerinput"):
        (HERE / "controller.pid").write_text(str(os.getpid()))


@pytest.fixture(scope="session")
def tiny_shared_model(request):
    """A 1-layer HookedTransformer placed where the session keeps its loaded subjects."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from harness.evidence.plugin import STATE
    from harness.evidence.stages import MODEL_LOAD, stage

    with stage(MODEL_LOAD):  # charged on the worker, summed on the controller
        model = HookedTransformer(HookedTransformerConfig(
            n_layers=1, d_model=8, n_ctx=8, d_head=4, n_heads=2, d_vocab=10, act_fn="relu"))
    state = request.config.stash[STATE]
    key = dataclasses.replace(state.spec, name="tiny", kind="path", source="<memory>")
    state.store._loaded[key] = SimpleNamespace(model=model)
    return model
'''

XDIST_RECORDS = """
@pytest.mark.claim(id="H1")
def test_a(evidence):
    evidence.record("r", exact(0.9, 1))
    evidence.judge()

@pytest.mark.claim(id="H1")
def test_b(evidence):
    evidence.record("r", exact(0.1, 1))
    evidence.judge()

@pytest.mark.claim(id="W1")
def test_c(evidence):
    evidence.record("m", exact(0.0, 1))
    evidence.judge()

@pytest.mark.claim(id="H2")
def test_d(evidence, rng):
    evidence.record("err", exact(rng.random() * 1e-6, 1))
    evidence.judge()
"""

XDIST_SHARED_MODEL = """
import torch

CALLS = []

@pytest.mark.claim(id="H1")
def test_needs_hub_weights(subject, evidence):
    evidence.record("r", exact(0.9, 1))

def test_leaves_a_torch_hook(tiny_shared_model):
    tiny_shared_model.blocks[0].mlp.register_forward_hook(lambda m, i, o: CALLS.append(1))

def test_leaves_a_lens_hook(tiny_shared_model):
    tiny_shared_model.add_hook("blocks.0.hook_resid_pre", lambda x, hook: CALLS.append(2))

def test_the_model_is_clean_after_the_leaks(tiny_shared_model):
    tiny_shared_model(torch.tensor([[1, 2, 3]]))
    assert CALLS == []

def test_hooks_inside_a_context_are_fine(tiny_shared_model):
    with tiny_shared_model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: None)]):
        tiny_shared_model(torch.tensor([[1, 2, 3]]))
"""


def test_xdist_hub_subject_and_hook_leaks(pytester: pytest.Pytester,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """One ``-n 2 --subject gpt2-small`` run, offline with an empty HF cache:

    - the controller alone writes the report, and it holds every claim test's record;
    - a claim needing the hub subject is skipped as unavailable, with the reason recorded;
    - a test leaving a hook on a shared model fails with "left hooks", and the hooks are
      removed, so the next test sees a clean model;
    - the wall-time breakdown sums the workers' stages and families on the controller.
    """
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(pytester.path / "empty_hf_home"))
    monkeypatch.delenv(stages.INSTALL_ENV, raising=False)  # nox sets it for the outer run
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE"):
        monkeypatch.delenv(var, raising=False)
    _project(pytester, XDIST_RECORDS, conftest=XDIST_CONFTEST)
    pytester.makepyfile(test_shared_model=HEADER + XDIST_SHARED_MODEL)
    ev = pytester.path / "ev"
    result = pytester.runpytest_subprocess(
        *QUIET, "-n", "2", "--dist", "loadfile", "--subject", "gpt2-small",
        f"--evidence-dir={ev}", "-rA", timeout=300,
    )
    result.assert_outcomes(passed=7, failed=1, skipped=1, errors=2)

    # every claim record, once, written by the controller only, after each record
    records = _records(ev / "gpt2-small" / "evidence.json")
    assert set(records) == {"test_a", "test_b", "test_c", "test_d", "test_needs_hub_weights"}
    assert [records[t]["verdict"] for t in ("test_a", "test_b", "test_c", "test_d")] == [
        "supported", "refuted", "supported", "supported"]  # no expected verdicts for gpt2-small
    controller = (pytester.path / "controller.pid").read_text()
    flushes = [line.split() for line in (pytester.path / "flushes.log").read_text().splitlines()]
    assert {pid for pid, _ in flushes} == {controller}
    assert [int(n) for _, n in flushes] == [1, 2, 3, 4, 5, 5]  # the last adds the timings
    _line_with(result.outlines, "claims on gpt2-small")

    # the hub subject is unavailable offline: skipped, with the reason in the report
    hub = records["test_needs_hub_weights"]
    assert (hub["verdict"], hub["outcome"]) == ("unavailable", "skipped")
    assert hub["reason"].startswith("unavailable: gpt2-small:") and "hub" in hub["reason"]
    _line_with(result.outlines, "SKIPPED", "unavailable: gpt2-small: ", "hub")

    # leaked hooks: both kinds are caught, and cleaned up for the next test
    out = result.outlines
    for test, module in [("test_leaves_a_torch_hook", "blocks.0.mlp"),
                         ("test_leaves_a_lens_hook", "blocks.0.hook_resid_pre")]:
        header = out.index(_line_with(out, f"ERROR at teardown of {test}"))
        _line_with(out[header:header + 4],
                   f"test left hooks attached to the shared model: ['{module}']")
    _line_with(out, "PASSED", "test_the_model_is_clean_after_the_leaks")

    # timings: summed over both workers on the controller, no "other" row
    timings = json.loads((ev / "gpt2-small" / "evidence.json").read_text())["timings"]
    assert timings["workers"] == 2
    rows = {r["name"]: r["seconds"] for r in timings["rows"]}
    assert set(rows) == {"model load", "family H", "family W", "harness tests"}
    assert rows["model load"] > 0  # both the tiny model (worker) and the failed hub load
    _line_with(out, "wall time by stage")
    _line_with(out, "summed over 2 xdist workers")


VARIANTS = """
@pytest.mark.claim(id="H1")
@pytest.mark.parametrize("kind", ["strict", "loose"])
def test_variant(evidence, kind):
    value = 0.8 if kind == "strict" else 0.2  # only the loose variant is refuted
    evidence.record("r", Estimate(value, value - 0.1, value + 0.1, 50, "bootstrap-percentile"))
    evidence.judge()
"""


def test_expected_verdict_of_one_parametrized_variant(pytester: pytest.Pytester) -> None:
    registry = REGISTRY.replace(
        "    decision: {statistic: r, direction: above, threshold: 0.5, against: {none: a test claim}}\n",
        "    decision: {statistic: r, direction: above, threshold: 0.5, against: {none: a test claim}}\n"
        "    expected: {'smollm2-135m[loose]': refuted}\n", 1)
    _project(pytester, VARIANTS, registry=registry)
    result = _run(pytester, f"--evidence-dir={pytester.path / 'ev'}", "-rA")
    result.assert_outcomes(passed=1, xfailed=1)
    _line_with(result.outlines, "XFAIL test_claims.py::test_variant[loose]", "H1 recorded as refuted")


USES_TEXTS = """
@pytest.mark.claim(id="H2")
def test_on_texts(evidence, texts):
    evidence.record("err", exact(0.5, len(texts.texts)))
    evidence.judge()
"""


def test_user_texts_drop_the_verdicts_recorded_on_the_projects_texts(pytester: pytest.Pytester) -> None:
    _project(pytester, USES_TEXTS)
    path = pytester.path / "mine.jsonl"
    path.write_text('{"category": "a", "text": "one"}\n{"category": "b", "text": "two"}\n', encoding="utf-8")
    # H2 is recorded as refuted on smollm2-135m: a strict xfail on the project's texts ...
    _run(pytester, f"--evidence-dir={pytester.path / 'ev1'}").assert_outcomes(xfailed=1)
    # ... but measured on the user's texts it is their result, reported as refuted.
    result = _run(pytester, f"--evidence-dir={pytester.path / 'ev2'}", f"--texts={path}")
    result.assert_outcomes(failed=1)
    [run_dir] = [p for p in (pytester.path / "ev2").iterdir()  # the user's texts: a directory of their own
                 if (p / "evidence.json").exists()]
    assert run_dir.name.startswith(f"{SUBJECT}@float32-seed0-texts")
    assert _records(run_dir / "evidence.json")["test_on_texts"]["verdict"] == "refuted"


USES_CORPUS = """
@pytest.mark.claim(id="H2")
def test_on_corpus(evidence, corpus):
    evidence.record("err", exact(0.5, int(corpus.tokens.numel())))
    evidence.judge()
"""

# The plugin's corpus fixture tokenizes with the subject's tokenizer (a model load); this one
# packs the same recipe (run_state.corpus_recipe: --corpus, sizes, seed) with a stand-in's,
# the default's from its smallest source only (tokenizing the stdlib takes ~15 s).
STANDIN_CORPUS = CONFTEST + """
import dataclasses
import pytest

@pytest.fixture(scope="session")
def corpus(run_state, tmp_path_factory):
    from harness.data.corpus import build_corpus
    from tests.standins import train_tokenizer

    tokenizer = train_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=400)
    recipe = run_state.corpus_recipe
    if recipe.user is None:
        recipe = dataclasses.replace(recipe, weights=(1.0, 0.0, 0.0))
    return build_corpus(tokenizer, recipe)
"""


def test_user_corpus_is_described_beside_the_claims_and_drops_recorded_verdicts(
        pytester: pytest.Pytester) -> None:
    """With --corpus the claims that read the corpus record the user's corpus (path, kind,
    files, raw-text and token sha256) and say so in evidence.md; the verdicts recorded on the
    default corpus do not apply, and the report gets a directory of its own."""
    _project(pytester, USES_CORPUS, conftest=STANDIN_CORPUS)
    mine = pytester.path / "mine"
    mine.mkdir()
    (mine / "a.txt").write_text("Plain words about gardens and rivers. " * 40, encoding="utf-8")
    sizes = ("--corpus-contexts=4", "--corpus-context-len=16")
    # H2 is recorded as refuted on smollm2-135m: a strict xfail on the default corpus ...
    _run(pytester, f"--evidence-dir={pytester.path / 'ev1'}", *sizes).assert_outcomes(xfailed=1)
    default = _records(pytester.path / "ev1" / SUBJECT / "evidence.json")["test_on_corpus"]
    assert default["inputs"]["corpus"]["description"].startswith("the default background corpus: CPython")
    # ... but on the user's corpus it is their result, reported as refuted.
    result = _run(pytester, f"--evidence-dir={pytester.path / 'ev2'}", *sizes, f"--corpus={mine}")
    result.assert_outcomes(failed=1)
    [run_dir] = [p for p in (pytester.path / "ev2").iterdir() if (p / "evidence.json").exists()]
    assert run_dir.name.startswith(f"{SUBJECT}@float32-seed0-corpus")
    corpus = _records(run_dir / "evidence.json")["test_on_corpus"]["inputs"]["corpus"]
    user = corpus["recipe"]["user"]
    assert (user["path"], user["kind"], user["files"]) == (str(mine), "text", [["a.txt", 1520]])
    assert run_dir.name.endswith(user["text_sha256"][:8]) and len(corpus["sha256"]) == 64
    md = (run_dir / "evidence.md").read_text(encoding="utf-8")
    _line_with(md.splitlines(), f"Corpus: the user's corpus {mine} (text: 1 file(s), 1,520 bytes",
               "64 tokens, token sha256 " + corpus["sha256"][:16])


def test_a_subset_run_keeps_the_other_claims_and_seeds_keep_their_own_reports(
        pytester: pytest.Pytester) -> None:
    """`-k family-W` after a full run updates W1 and keeps H1 and H2 with their own run stamp
    (it rewrote the report from empty before); another --seed writes elsewhere."""
    _project(pytester, XDIST_RECORDS)
    ev = pytester.path / "ev"
    _run(pytester, f"--evidence-dir={ev}")
    first = json.loads((ev / SUBJECT / "evidence.json").read_text())
    assert sorted(r["id"] for r in first["claims"]) == ["H1", "H1", "H2", "W1"]
    result = _run(pytester, f"--evidence-dir={ev}", "-k", "family-W")
    _line_with(result.outlines, "the report also keeps 3 claim record(s) of earlier runs")
    second = json.loads((ev / SUBJECT / "evidence.json").read_text())
    assert [r["nodeid"] for r in second["claims"]] == [r["nodeid"] for r in first["claims"]]
    by_id = {r["nodeid"]: r for r in second["claims"]}
    for r in first["claims"]:
        kept = by_id[r["nodeid"]]
        if r["id"] == "W1":
            assert kept["run"] == second["run"] != first["run"]
        else:
            assert kept == r  # untouched, with the first run's stamp
    assert "earlier run" in (ev / SUBJECT / "evidence.md").read_text()
    _run(pytester, f"--evidence-dir={ev}", "--seed=1", "-k", "family-H")
    assert sorted(p.name for p in ev.iterdir() if (p / "evidence.json").exists()) == [
        SUBJECT, f"{SUBJECT}@float32-seed1"]
    assert json.loads((ev / SUBJECT / "evidence.json").read_text()) == second


def test_an_unreadable_report_is_set_aside_not_merged(pytester: pytest.Pytester) -> None:
    _project(pytester, XDIST_RECORDS)
    ev = pytester.path / "ev"
    (ev / SUBJECT).mkdir(parents=True)
    (ev / SUBJECT / "evidence.json").write_text('{"schema_version": "0.9", "claims": []}')
    result = _run(pytester, f"--evidence-dir={ev}", "-k", "W1")
    _line_with(result.outlines, "an unreadable earlier report was set aside as")
    assert [p.name.split("-")[0] for p in (ev / SUBJECT).glob("evidence.json.unreadable-*")] == [
        "evidence.json.unreadable"]
    assert [r["id"] for r in _records(ev / SUBJECT / "evidence.json").values()] == ["W1"]


DRIFT = """
@pytest.mark.claim(id="H1")
@pytest.mark.parametrize("value", [0.8, 0.95, 0.6])
def test_moves(evidence, value):
    evidence.record("r", Estimate(value, value - 0.01, value + 0.01, 50, "b"))
    evidence.judge()
"""

SPREAD = """\
smollm2-135m:
  H1:
    statistic: r
    seeds: [0, 1, 2]
    verdicts: [supported, supported, supported]
    estimates: [0.79, 0.80, 0.82]
    varied: session-seed
"""


def test_a_headline_that_leaves_its_band_fails_the_run(pytester: pytest.Pytester) -> None:
    """Supported all three times, but 0.95 and 0.6 lie outside the recorded band
    [0.79 - 0.03, 0.82 + 0.03]: a regression that keeps the verdict is caught (it stayed
    green before), and says by how much."""
    _project(pytester, DRIFT)
    (pytester.path / "fixtures" / "seed_spread.yaml").write_text(SPREAD, encoding="utf-8")
    ev = pytester.path / "ev"
    result = _run(pytester, f"--evidence-dir={ev}", "-rA")
    result.assert_outcomes(passed=1, failed=2)
    records = _records(ev / SUBJECT / "evidence.json")
    inside = records["test_moves[0.8]"]
    assert inside["band"] == [pytest.approx(0.76), pytest.approx(0.85)] and inside["drift"] == 0
    high = records["test_moves[0.95]"]
    assert high["verdict"] == "supported" and high["drift"] == pytest.approx(0.1)
    assert records["test_moves[0.6]"]["drift"] == pytest.approx(-0.16)
    _line_with(result.outlines, "H1 on smollm2-135m: drift: r = 0.95 lies outside the recorded "
               "tolerance band [0.76, 0.85] by +0.1")
    # another corpus size: the spread does not apply, nothing drifts
    _run(pytester, f"--evidence-dir={ev}", "--corpus-contexts=64").assert_outcomes(passed=3)


TRAINING = """
@pytest.mark.claim(id="H1")
def test_learned(evidence, run_state):
    value = 0.3 if run_state.spec.random_init else 0.9
    evidence.record("r", Estimate(value, value - 0.05, value + 0.05, 50, "b"))
    evidence.judge()
"""


def test_a_claim_about_training_carries_its_trained_minus_twin_contrast(pytester: pytest.Pytester) -> None:
    """The twin first (its report), then the trained subject: the record gets the contrast;
    without a twin report it says how to get one."""
    registry = H1_REGISTRY.replace("    statement: The statistic r is large.\n",
                                   "    statement: The statistic r is large.\n"
                                   "    about_training: r is read as learned\n")
    _project(pytester, TRAINING, registry=registry)
    ev = pytester.path / "ev"
    _run(pytester, f"--evidence-dir={ev}").assert_outcomes(passed=1)
    alone = _records(ev / SUBJECT / "evidence.json")["test_learned"]["training_contrast"]
    assert "run the claims on the random-init twin first" in alone["unavailable"]
    _run(pytester, f"--evidence-dir={ev}", f"--subject={SUBJECT}:random").assert_outcomes(failed=1)
    _run(pytester, f"--evidence-dir={ev}").assert_outcomes(passed=1)
    tc = _records(ev / SUBJECT / "evidence.json")["test_learned"]["training_contrast"]
    assert (tc["contrast"], tc["twin_verdict"], tc["also_at_random_init"]) == (
        pytest.approx(0.6), "refuted", False)
    assert "Trained minus random-init twin: r 0.9 - 0.3 = 0.6" in (ev / SUBJECT / "evidence.md").read_text()


def test_k_selects_by_claim_id_and_by_family(pytester: pytest.Pytester) -> None:
    _project(pytester, XDIST_RECORDS)
    ev = f"--evidence-dir={pytester.path / 'ev'}"
    # test_b is refuted (H1 has no expected verdict); H2 and W1 are not, but recorded as refuted
    _run(pytester, ev, "-k", "family-H").assert_outcomes(passed=1, failed=2)
    _run(pytester, ev, "-k", "W1").assert_outcomes(failed=1, deselected=3)
    _run(pytester, ev, "-k", "H2 or family-W").assert_outcomes(failed=2, deselected=2)
