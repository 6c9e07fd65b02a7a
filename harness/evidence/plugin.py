"""The suite's pytest plugin: options, the ``claim`` marker, subject and evidence fixtures,
verdicts, and the evidence report. Loaded from the root conftest.py only.

State lives on ``config.stash`` and on reports (``report.user_properties``, which pytest-xdist
serialises), never in module globals. Only the controlling process writes the report.

Wall time: each process gets its own session recorder (harness.evidence.stages), charged by the fixtures
here ("model load", "corpus", "SAE build") and by producers. Every test's teardown report
carries its family's seconds (setup + call + teardown less the stage time that finished inside
them) and those stage seconds; the controller sums them, with its own recorder, into the
breakdown it prints and records under ``timings`` in the evidence.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from harness.models.determinism import pin

pin()  # before any torch op: ATen's ISA level, MKL's CNR mode and the thread count (see module)

from harness.data.corpus import CorpusError, CorpusRecipe
from harness.evidence import stages
from harness.evidence.provenance import run_provenance
from harness.evidence.record import (
    SUMMARY_HEADER,
    TIMING_HEADER,
    ClaimEvidence,
    ClaimVerdict,
    EvidenceWriter,
    run_dir_name,
    summary_rows,
    timing_rows,
    timing_total,
    training_contrast,
)
from harness.evidence.registry import Expected, Registry, RegistryError
from harness.models.subjects import (
    DEFAULT_SUBJECT,
    KNOWN_SUBJECTS,
    SubjectError,
    SubjectSpec,
    SubjectUnavailable,
    WeightProcessing,
    check_device_dtype,
    parse_subject,
)
from harness.statistics import seed_spread
from harness.statistics.stats import claim_rng

RECORD_KEY = "interp_claims_record"
TIMING_KEY = "interp_claims_timing"
MARKER_KWARGS = {"id"}


_PROCESS_LOADED: dict = {}
"""Subjects loaded by any session of this process, by spec: in-process pytest runs (pytester,
the suite's own tests of the plugin) reuse a model instead of loading it again (~25 s each on
2 cores). Safe because loaded subjects are read-only by contract (``_no_leaked_hooks`` checks
the hooks; parameters have requires_grad off)."""
_PROCESS_HF: dict = {}


class SubjectStore:
    """Loaded subjects of this process, by spec; a failure is remembered, not retried."""

    def __init__(self, cache_dir: Path | None = None) -> None:
        self.cache_dir = cache_dir
        """The content cache trained subjects (the size ladder) come from (``--cache-dir``)."""
        self._loaded: dict[SubjectSpec, object] = _PROCESS_LOADED
        self._errors: dict[SubjectSpec, Exception] = {}
        self._hf: dict[tuple[str, str], tuple] = _PROCESS_HF

    def hf_model(self, spec: SubjectSpec) -> tuple:
        """One transformers model per checkpoint, shared by the processing variants (only
        TL's converted copies are handed to claim tests; the harness's own loader tests read
        it to compare logits)."""
        from harness.models.loaders import load_hf

        key = (spec.kind, spec.source)
        if key not in self._hf:
            self._hf[key] = load_hf(spec, self.cache_dir)
        return self._hf[key]

    def get(self, spec: SubjectSpec):  # -> LoadedSubject
        if spec in self._errors:
            raise self._errors[spec]
        if spec not in self._loaded:
            from harness.models.loaders import load_subject  # heavy: torch, transformers

            try:
                self._loaded[spec] = load_subject(spec, hf_loader=self.hf_model,
                                                  cache_dir=self.cache_dir)
            except (SubjectError, SubjectUnavailable) as exc:
                self._errors[spec] = exc
                raise
        return self._loaded[spec]

    def models(self) -> list:
        return [s.model for s in self._loaded.values()]


@dataclass
class RunState:
    registry: Registry
    spec: SubjectSpec
    seed: int
    evidence_dir: Path
    cache_dir: Path
    corpus_recipe: CorpusRecipe
    texts: object  # harness.data.texts.TextSet, validated at start-up
    user_texts: bool = False
    """``--texts`` was given: verdicts recorded on the project's texts do not apply."""
    sae_seed: int | None = None
    """``--sae-seed``; None: seed 0 with the recorded seed spread applied."""
    spreads: dict = field(default_factory=dict)
    """harness.statistics.seed_spread.load(): {subject id: {claim key: SeedSpread}}."""
    store: SubjectStore = field(default_factory=SubjectStore)
    recorder: stages.StageRecorder = field(default_factory=stages.StageRecorder)
    """This process's session recorder (made current for the session by pytest_configure)."""

    @property
    def user_corpus(self) -> bool:
        """``--corpus`` was given: verdicts recorded on the default corpus do not apply."""
        return self.corpus_recipe.user is not None

    @property
    def run_dir(self) -> Path:
        """Where this run's report goes: one directory per (subject, dtype, seed, SAE seed,
        texts, corpus), so runs that differ in any of them never overwrite each other."""
        return self.run_dir_of(self.spec.id)

    def run_dir_of(self, subject_id: str) -> Path:
        """The report directory of ``subject_id`` under this run's other settings."""
        user = self.corpus_recipe.user
        return self.evidence_dir / run_dir_name(
            subject_id, dtype=self.spec.dtype, seed=self.seed, sae_seed=self.sae_seed,
            texts_sha256=self.texts.sha256 if self.user_texts else None,
            corpus_sha256=user.text_sha256 if user is not None else None)


STATE = pytest.StashKey[RunState]()
EVIDENCE = pytest.StashKey[ClaimEvidence]()
PREVIOUS_RECORDER = pytest.StashKey[stages.StageRecorder]()
STAGES_BEFORE = pytest.StashKey[dict[str, float]]()
"""An item's snapshot of the recorder's totals as its setup starts."""
EXPECTED = pytest.StashKey["Expected | None"]()
"""A claim test's recorded expectation (registry, seed spread), set at collection."""
PHASE_SECONDS = pytest.StashKey[float]()
"""An item's setup + call + teardown seconds so far."""


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("interp-claims", "interpretability claims")
    group.addoption(
        "--subject",
        default=DEFAULT_SUBJECT,
        help=f"subject name ({', '.join(sorted(KNOWN_SUBJECTS))}; tl:NAME for any model "
        f"TransformerLens's from_pretrained knows; NAME:random for the random-init twin) or a "
        f"checkpoint directory. Default: {DEFAULT_SUBJECT}",
    )
    group.addoption("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    group.addoption(
        "--dtype", default="float32", help="float32 (default), float64, bfloat16, float16"
    )
    group.addoption("--seed", type=int, default=0, help="session seed (default 0)")
    group.addoption(
        "--sae-seed", type=int, default=None,
        help="train the subject's SAEs with this seed (default 0). Given explicitly, SAE-based "
        "verdicts are this seed's alone: the recorded seed spread (fixtures/seed_spread.yaml) "
        "is not applied (what `nox -s reseed` runs)",
    )
    group.addoption(
        "--evidence-dir", default="evidence", help="report directory (default evidence/)"
    )
    group.addoption(
        "--texts", default=None,
        help="JSONL of categorized texts ({category, text[, split]} per line) used instead of "
        "fixtures/texts/categorized.jsonl by every claim that uses categorized texts",
    )
    group.addoption(
        "--cache-dir", default=None,
        help="content-addressed cache of expensive intermediates (default: the user's cache "
        "directory, $XDG_CACHE_HOME/interp-claims or ~/.cache/interp-claims on Linux)",
    )
    group.addoption("--corpus-contexts", type=int, default=CorpusRecipe.n_contexts,
                    help=f"background corpus size in contexts (default {CorpusRecipe.n_contexts})")
    group.addoption("--corpus-context-len", type=int, default=CorpusRecipe.context_len,
                    help=f"tokens per corpus context (default {CorpusRecipe.context_len})")
    group.addoption(
        "--corpus", default=None,
        help="your own background corpus instead of CPython's text: a directory or file of "
        "plain text, a JSONL file ({text} per line) or a Hugging Face dataset saved with "
        "save_to_disk (a text column); packed like the default",
    )
    parser.addini("claims_registry", "path of the claim registry", default="fixtures/claims.yaml")


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "claim(id): a claim test; id must exist in the claim registry"
    )
    config.addinivalue_line("markers", "slow: loads a real model or trains something")
    config.addinivalue_line(
        "markers", "e2e: a whole claim family run end to end on a stand-in of another subject "
        "(nox -s e2e; the test command deselects them)")
    opt = config.option
    from harness.data.texts import TextsError, load_texts

    try:
        registry = Registry.load(config.rootpath / config.getini("claims_registry"))
        check_device_dtype(opt.device, opt.dtype)
        spec = parse_subject(opt.subject, device=opt.device, dtype=opt.dtype, seed=opt.seed)
        sizes = {"n_contexts": opt.corpus_contexts, "context_len": opt.corpus_context_len,
                 "seed": opt.seed}
        if opt.corpus:
            from harness.data.user_corpus import read_user_corpus

            recipe = CorpusRecipe.of_user(read_user_corpus(_resolve(config, opt.corpus)), **sizes)
        else:
            recipe = CorpusRecipe(**sizes)
        texts = load_texts(_resolve(config, opt.texts) if opt.texts else None)
        spreads = seed_spread.load(config.rootpath / "fixtures" / "seed_spread.yaml")
    except (RegistryError, SubjectError, CorpusError, TextsError, ValueError, KeyError) as exc:
        raise pytest.UsageError(str(exc)) from None
    from harness.activations.cache import default_cache_dir

    cache_dir = _resolve(config, opt.cache_dir) if opt.cache_dir else default_cache_dir()
    state = RunState(
        registry=registry,
        spec=spec,
        seed=opt.seed,
        evidence_dir=_resolve(config, opt.evidence_dir),
        cache_dir=cache_dir,
        store=SubjectStore(cache_dir),
        corpus_recipe=recipe,
        texts=texts,
        user_texts=bool(opt.texts),
        sae_seed=opt.sae_seed,
        spreads=spreads,
    )
    config.stash[STATE] = state
    config.stash[PREVIOUS_RECORDER] = stages.activate(state.recorder)
    if not _is_worker(config):
        prov = run_provenance(config.rootpath, device=opt.device, dtype=opt.dtype, seed=opt.seed)
        writer = EvidenceWriter(state.run_dir, spec.id, prov)
        reporter = EvidenceReporter(writer, stages.StageTally(state.recorder),
                                    install_seconds=stages.install_seconds_from_env(),
                                    evidence_dir=state.evidence_dir, registry=registry)
        config.pluginmanager.register(reporter, "interp-claims-evidence")


def pytest_unconfigure(config: pytest.Config) -> None:
    previous = config.stash.get(PREVIOUS_RECORDER, None)
    if previous is not None:  # an enclosing (pytester) session gets its recorder back
        stages.activate(previous)
        del config.stash[PREVIOUS_RECORDER]
        state = config.stash.get(STATE, None)
        if state is not None:  # and the stages the inner session ran (e.g. an SAE build)
            for name, seconds in state.recorder.totals().items():
                previous.add(name, seconds)


def _resolve(config: pytest.Config, path: str) -> Path:
    """A user-given path, relative to where pytest was invoked."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else config.invocation_params.dir / p


def _claim_id(item: pytest.Item, registry: Registry) -> str | None:
    marks = list(item.iter_markers("claim"))
    if not marks:
        return None
    if len(marks) > 1:
        raise pytest.UsageError(f"{item.nodeid}: more than one claim marker")
    mark = marks[0]
    unknown = set(mark.kwargs) - MARKER_KWARGS
    if mark.args or unknown or "id" not in mark.kwargs:
        raise pytest.UsageError(
            f"{item.nodeid}: the claim marker takes exactly id=...; got args {mark.args}, "
            f"kwargs {sorted(mark.kwargs)}"
        )
    cid = mark.kwargs["id"]
    if cid not in registry:
        raise pytest.UsageError(
            f"{item.nodeid}: unknown claim id {cid!r}; the registry ({registry.path}) knows "
            f"{', '.join(registry.claims)}"
        )
    return cid


def _spread(item: pytest.Item, state: RunState, cid: str) -> seed_spread.SeedSpread | None:
    """The recorded seed spread of a claim test, when it applies to this run: measured on the
    project's texts and default corpus size; SAE-seed spreads only with the default SAE seed
    (an explicit --sae-seed is that seed's run alone, as `nox -s reseed` needs)."""
    fixtures = getattr(item, "fixturenames", ())
    if (state.user_texts and "texts" in fixtures) or (state.user_corpus and "corpus" in fixtures):
        return None
    default_corpus = CorpusRecipe(seed=state.seed)
    if (state.corpus_recipe.n_contexts, state.corpus_recipe.context_len) != (
            default_corpus.n_contexts, default_corpus.context_len):
        return None
    callspec = getattr(item, "callspec", None)
    spread = seed_spread.lookup(state.spreads, state.spec.id, cid, callspec.id if callspec else None)
    if spread is not None and spread.varied == "sae-seed" and (
            state.sae_seed is not None or "saes" not in fixtures):
        return None
    return spread


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    state = config.stash[STATE]
    for item in items:
        cid = _claim_id(item, state.registry)
        if cid is None:
            continue
        # `-k H2` (or `-k "W1 or W3"`) selects by claim id, not only by test name; `-k family-S`
        # selects a whole family (a bare `-k S` would match every test name containing an "s":
        # pytest's -k is a case-insensitive substring match).
        item.extra_keyword_matches.add(cid)
        item.extra_keyword_matches.add(f"family-{state.registry[cid].family}")
        item.stash[EXPECTED] = _expectation(item, state, cid)


def _expectation(item: pytest.Item, state: RunState, cid: str) -> Expected | None:
    """What the registry (and the seed spread) record for this claim test on this subject;
    None where nothing is recorded or the user's own texts make the record moot."""
    fixtures = getattr(item, "fixturenames", ())
    if (state.user_texts and "texts" in fixtures) or (state.user_corpus and "corpus" in fixtures):
        return None  # expected verdicts were measured on the project's own texts and corpus
    callspec = getattr(item, "callspec", None)
    expected = state.registry[cid].expected_verdict(state.spec.id, callspec.id if callspec else None)
    spread = _spread(item, state, cid)
    if spread is not None and not spread.stable:
        expected = Expected("inconclusive", "seed-unstable")  # see harness.statistics.seed_spread
    return expected


@pytest.fixture(scope="session")
def run_state(request: pytest.FixtureRequest) -> RunState:
    """The session's options, registry and subject spec."""
    return request.config.stash[STATE]


def _load(state: RunState, spec: SubjectSpec):
    try:
        with stages.stage(stages.MODEL_LOAD):
            return state.store.get(spec)
    except SubjectUnavailable as exc:
        pytest.skip(f"unavailable: {exc}")
    except SubjectError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def subject(run_state: RunState):
    """The session's subject (a LoadedSubject), loaded once.

    Read-only use only: the model is shared by every test of the session; mutations (weights,
    hooks, ``cfg``) leak into every later test. Hooks only inside ``model.hooks(...)`` or
    ``run_with_cache``; an autouse check fails any test that leaves one attached.
    """
    return _load(run_state, run_state.spec)


@pytest.fixture(scope="session")
def subject_variant(run_state: RunState) -> Callable[[WeightProcessing], object]:
    """``subject_variant(processing)``: the session's subject under other weight processing,
    loaded once per processing. Same read-only contract as ``subject``."""
    import dataclasses

    def get(processing: WeightProcessing):
        return _load(run_state, dataclasses.replace(run_state.spec, processing=processing))

    return get


@pytest.fixture(scope="session")
def texts(run_state: RunState):
    """The categorized texts (``--texts PATH`` or the project's own), a frozen TextSet."""
    return run_state.texts


@pytest.fixture(scope="session")
def content_cache(run_state: RunState):
    """The content-addressed cache of expensive intermediates (``--cache-dir``)."""
    from harness.activations.cache import ContentCache

    return ContentCache(run_state.cache_dir)


@pytest.fixture(scope="session")
def corpus(run_state: RunState, subject, content_cache):
    """The background corpus (``--corpus PATH`` or CPython's text) tokenized for the session's
    subject, built once and cached; a corpus too small for the requested size fails here, the
    first place its tokenizer is known."""
    from harness.activations.harvest import cached_corpus

    try:
        with stages.stage(stages.CORPUS):
            return cached_corpus(content_cache, subject.model.tokenizer, run_state.corpus_recipe)
    except CorpusError as exc:  # e.g. a --corpus too small for the requested contexts
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def saes(request: pytest.FixtureRequest, subject, corpus, content_cache):
    """The subject's SAEs (harness.saes.train.subject_saes): four residual depths + one MLP,
    the source's hub SAEs where published, else trained once with sae-lens on the background
    corpus and cached. Read-only."""
    from harness.saes.train import subject_saes

    try:
        with stages.stage(stages.SAE_BUILD):
            return subject_saes(content_cache, subject, corpus,
                                seed=request.config.stash[STATE].sae_seed or 0)
    except SubjectUnavailable as exc:
        pytest.skip(f"unavailable: {exc}")


@pytest.fixture
def claim(request: pytest.FixtureRequest, run_state: RunState):
    """The registry entry of the running claim test."""
    cid = _claim_id(request.node, run_state.registry)
    if cid is None:
        raise pytest.UsageError(f"{request.node.nodeid} uses a claim fixture without a claim marker")
    return run_state.registry[cid]


@pytest.fixture
def rng(claim, run_state: RunState):
    """numpy Generator owned by this claim: derived from (session seed, claim id)."""
    return claim_rng(run_state.seed, claim.id)


@pytest.fixture
def evidence(request: pytest.FixtureRequest, claim, run_state: RunState) -> Iterator[ClaimEvidence]:
    """Records statistics for the report; ``evidence.judge()`` gives the verdict."""
    ev = ClaimEvidence(
        claim=claim,
        subject_id=run_state.spec.id,
        dtype=run_state.spec.dtype,
        figure_dir=run_state.run_dir / "figures",
        slug=_slug(request.node.name),
    )
    for name in ("subject", "corpus", "texts", "saes"):
        if name in request.fixturenames:
            value = request.getfixturevalue(name)
            ev.inputs[name] = (value.provenance() if hasattr(value, "provenance")
                               else [v.provenance() for v in value])
    ev.seed_spread = _spread(request.node, run_state, claim.id)
    request.node.stash[EVIDENCE] = ev
    yield ev


def _slug(test_name: str) -> str:
    """A claim test's name as a file-name part: test_x[a/b 1] -> test_x-a-b-1."""
    import re

    return re.sub(r"[^A-Za-z0-9_.]+", "-", test_name).strip("-")


def _leaked_hooks(model) -> list[str]:
    return [
        name or "<root>"
        for name, mod in model.named_modules()
        if mod._forward_hooks or mod._forward_pre_hooks or mod._backward_hooks
    ]


@pytest.fixture(autouse=True)
def _no_leaked_hooks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves a hook on a shared model (and clean up after it)."""
    yield
    for model in request.config.stash[STATE].store.models():
        leaked = _leaked_hooks(model)
        if leaked:
            model.reset_hooks(including_permanent=True)
            for mod in model.modules():  # reset_hooks only removes hooks added through TL
                mod._forward_hooks.clear()
                mod._forward_pre_hooks.clear()
                mod._backward_hooks.clear()
            pytest.fail(f"test left hooks attached to the shared model: {leaked[:5]}", pytrace=False)


NO_JUDGE = ("the claim test ended without a verdict: it never called evidence.judge() (or "
            "evidence.inconclusive(...)); a harness error, not a pass")


def _verdict(call: pytest.CallInfo, report: pytest.TestReport,
             ev: ClaimEvidence | None) -> tuple[str, str, str | None]:
    """(verdict, reason, inconclusive code) of a claim test's phase.

    Only ``evidence.judge()`` / ``evidence.inconclusive()`` make a scientific verdict, and only
    a skip (a missing network, file or package) makes 'unavailable'. Everything else is
    'error': a test that returns without judging, a ``ClaimRefuted`` raised by hand, a plain
    ``AssertionError`` (a precondition, a bug in the harness), a HarnessError (a NaN), any
    other exception.
    """
    excinfo = call.excinfo
    if report.skipped and (excinfo is None or not excinfo.errisinstance(ClaimVerdict)):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        return "unavailable", reason.removeprefix("Skipped: "), None
    if excinfo is None:
        if ev is not None and ev.verdict == "supported":
            return "supported", "", None
        if ev is not None and ev.verdict is not None:
            return "error", (f"the claim test judged {ev.verdict} and then passed: it caught "
                             "its own verdict"), None
        return "error", NO_JUDGE, None
    if excinfo.errisinstance(ClaimVerdict):
        exc = excinfo.value
        if ev is None or (ev.verdict, ev.code) != (exc.verdict, exc.code):
            return "error", (f"{type(exc).__name__} raised by hand, not by evidence.judge() or "
                             f"evidence.inconclusive(): {exc}")[:300], None
        return exc.verdict, str(exc), exc.code
    return "error", excinfo.exconly().splitlines()[0][:300], None


def _settle(report: pytest.TestReport, cid: str, subject_id: str, verdict: str, reason: str,
            code: str | None, expected: Expected | None, drift: str | None = None) -> bool:
    """Set the report's outcome from the verdict and the recorded expectation; True when the
    verdict is the expected one.

    An error always fails. A verdict equal to the recorded one (inconclusive: with its code)
    passes when supported and shows as xfailed otherwise; any other verdict that differs from a
    record fails and says both; with no record, only 'supported' passes."""
    if verdict == "error":
        if not report.failed:
            report.outcome, report.longrepr = "failed", f"harness error: {reason}"
        return False
    if verdict == "unavailable":
        return False
    if drift:  # the verdict may be the recorded one; the number is not
        report.outcome, report.longrepr = "failed", f"{cid} on {subject_id}: {drift}"
        return False
    measured = Expected(verdict, code)
    if expected is None:
        return False
    if measured == expected:
        if verdict != "supported":
            report.outcome = "skipped"  # how pytest itself reports an expected failure (xfail)
            report.wasxfail = f"{cid} recorded as {expected} on {subject_id} in the registry"
        return True
    report.outcome = "failed"
    report.longrepr = (f"{cid} on {subject_id}: measured {measured}, the registry records "
                       f"{expected}: the verdict changed (review it and record the new one). "
                       f"{reason}").rstrip()
    return False


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item: pytest.Item):
    state = item.config.stash.get(STATE, None)
    if state is not None:  # before any fixture: stages its setup triggers count as its own
        item.stash[STAGES_BEFORE] = state.recorder.totals()
    return (yield)


def _timing(item: pytest.Item, state: RunState, call: pytest.CallInfo) -> stages.TestTiming | None:
    """Adds the phase's seconds; after teardown, the test's TestTiming (else None)."""
    phases = item.stash.get(PHASE_SECONDS, 0.0) + call.duration
    item.stash[PHASE_SECONDS] = phases
    if call.when != "teardown":
        return None
    inside = state.recorder.since(item.stash.get(STAGES_BEFORE, state.recorder.totals()))
    family = None
    if item.get_closest_marker("claim") is not None:
        family = state.registry[_claim_id(item, state.registry)].family
    return stages.TestTiming.measure(stages.family_label(family), phases, inside)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    state = item.config.stash.get(STATE, None)
    if state is None:
        return report
    timing = _timing(item, state, call)
    if timing is not None:
        report.user_properties.append((TIMING_KEY, timing.to_dict()))
    if item.get_closest_marker("claim") is None:
        return report
    if call.when == "call" or (call.when == "setup" and not report.passed):
        ev = item.stash.get(EVIDENCE, None)
        cid = _claim_id(item, state.registry)
        record = ev.to_record() if ev else {"id": cid, "title": state.registry[cid].title,
                                            "statement": state.registry[cid].statement,
                                            "statistics": {}, "notes": []}
        verdict, reason, code = _verdict(call, report, ev)
        expected = item.stash.get(EXPECTED, None)
        drift = ev.drift_message() if ev is not None and verdict != "error" else None
        matched = _settle(report, cid, state.spec.id, verdict, reason, code, expected, drift)
        record.update(
            verdict=verdict,
            reason=reason,
            reason_code=code,
            expected=matched,
            expected_verdict=None if expected is None else str(expected),
            test=item.name,
            nodeid=item.nodeid,
            outcome=report.outcome,
            duration_s=round(call.duration, 3),
        )
        claim = state.registry[cid]
        if claim.about_training and not state.spec.random_init and state.spec.kind != "planted" \
                and verdict != "error":
            record["training_contrast"] = _twin_contrast(state, record)
        report.user_properties.append((RECORD_KEY, record))
    return report


def _twin_contrast(state: RunState, record: dict) -> dict:
    """The record's trained-minus-twin contrast, from the twin's report in this evidence dir
    (same dtype, seed, texts and corpus), when it holds the same test."""
    import dataclasses
    import json

    twin = dataclasses.replace(state.spec, random_init=True)
    path = state.run_dir_of(twin.id) / "evidence.json"
    twin_record = None
    if path.exists():
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            twin_record = next((r for r in doc.get("claims", []) if r.get("test") == record["test"]
                                and r.get("id") == record["id"]), None)
        except (OSError, ValueError):
            twin_record = None
    return training_contrast(record, twin_record, str(path))


def _write_table(tr, header: list[str], rows: list[list[str]]) -> None:
    rows = [header, *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for row in rows:
        tr.write_line("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


class EvidenceReporter:
    """Controller-side: collects records and timings from reports, rewrites the report, prints
    the claims table and the wall-time breakdown."""

    def __init__(self, writer: EvidenceWriter, tally: stages.StageTally,
                 install_seconds: float | None = None, evidence_dir: Path | None = None,
                 registry: Registry | None = None) -> None:
        self.writer = writer
        self.tally = tally
        self.install_seconds = install_seconds
        self.started = time.perf_counter()
        self.timings: stages.Timings | None = None
        self.evidence_dir = evidence_dir
        """Where the cross-subject report goes (harness.evidence.report); None: not written."""
        self.registry = registry
        self.report_files: list[Path] = []
        self.report_error: str | None = None

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        for key, value in report.user_properties:
            if key == RECORD_KEY:
                self.writer.add(value)
            elif key == TIMING_KEY:
                self.tally.add(stages.TestTiming.from_dict(value))

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if not self.tally.pids:
            return  # no test ran
        self.timings = self.tally.summary(time.perf_counter() - self.started,
                                          self.install_seconds)
        if self.writer.records:
            self.writer.set_timings(self.timings.to_dict())
            self._write_report(session)

    def _write_report(self, session: pytest.Session) -> None:
        """Refresh the cross-subject report (every run's evidence.html, matrix.md, index.html)
        from the evidence just written. A failure fails the run with a message naming the file,
        after the claims' own outcomes (which it leaves as they are)."""
        if self.evidence_dir is None or self.registry is None:
            return
        from harness.evidence.report import ReportError, write_report

        try:
            self.report_files = write_report(self.evidence_dir, self.registry)
        except ReportError as exc:
            self.report_error = str(exc)
        except Exception as exc:  # a bug in the report writer: the same, with its type
            self.report_error = f"writing the report under {self.evidence_dir}: {type(exc).__name__}: {exc}"
        if self.report_error is not None and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        tr = terminalreporter
        if self.writer.records:
            tr.section(f"claims on {self.writer.subject_id}")
            mine = [r for r in self.writer.records if r.get("run") == self.writer.run]
            _write_table(tr, SUMMARY_HEADER, summary_rows(mine))
            if len(mine) < len(self.writer.records):
                tr.write_line(f"(the report also keeps {len(self.writer.records) - len(mine)} claim "
                              "record(s) of earlier runs in this directory, marked 'earlier run')")
            if self.writer.set_aside is not None:
                tr.write_line(f"an unreadable earlier report was set aside as {self.writer.set_aside}")
            tr.write_line(f"evidence: {self.writer.json_path}  {self.writer.md_path}")
            if self.report_files:
                tr.write_line(f"cross-subject report: {self.evidence_dir / 'index.html'}  "
                              f"{self.evidence_dir / 'matrix.md'}")
        if self.report_error is not None:
            tr.section("evidence report FAILED", red=True, bold=True)
            tr.write_line(f"the cross-subject report was not written: {self.report_error}",
                          red=True)
            tr.write_line("(the claims' verdicts above and their evidence.json/evidence.md stand; "
                          "this run fails for the report alone)")
        if self.timings is not None:
            timings = self.timings.to_dict()
            tr.section("wall time by stage")
            _write_table(tr, TIMING_HEADER, timing_rows(timings))
            tr.write_line(timing_total(timings))
