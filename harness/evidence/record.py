"""Evidence: what a claim test measured, and the report it goes into.

:class:`ClaimEvidence` is what the ``evidence`` fixture hands a claim test. Its
:meth:`~ClaimEvidence.judge` applies the registry's decision and raises
:class:`ClaimRefuted` / :class:`ClaimInconclusive`, which the plugin maps to verdicts.
:class:`EvidenceWriter` rewrites ``evidence.json`` and ``evidence.md`` atomically after every
claim, so a crash keeps everything already measured. At the end of the session the plugin adds
the wall-time breakdown (``timings``: :class:`harness.evidence.stages.Timings` as a dict; null until
then, so a crashed run's report has none).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.evidence.errors import HarnessError
from harness.evidence.registry import INCONCLUSIVE_CODES, Claim
from harness.statistics.stats import Estimate, decide, require_finite

SCHEMA_VERSION = "1.2"
"""1.1: top-level ``timings``. 1.2: per claim ``run`` (commit and time of the run that measured
it: a subset run keeps the other claims' records), ``reason_code``, ``expected_verdict``
(additive; a 1.0 reader ignores them)."""
READABLE_SCHEMAS = ("1.1", "1.2")
"""Reports whose claim records a run keeps and updates (older ones are set aside)."""
IMAGE_SUFFIXES = (".png", ".svg", ".jpg", ".jpeg", ".gif")
"""Listed files the Markdown embeds as images; any other attachment is rendered as a link."""


class ClaimVerdict(Exception):  # noqa: N818 - a verdict, not an error
    """A scientific verdict other than supported, raised by ``ClaimEvidence.judge`` or
    ``ClaimEvidence.inconclusive`` only (the plugin refuses one raised by hand). Not an
    ``AssertionError``: a plain ``assert`` in a claim test is a harness error, never a verdict."""

    verdict = ""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class ClaimRefuted(ClaimVerdict):
    """The measured interval lies on the wrong side of the claim's threshold."""

    verdict = "refuted"


class ClaimInconclusive(ClaimVerdict):
    """The interval straddles the threshold (or the data cannot decide): not a pass. ``code``
    is a key of INCONCLUSIVE_CODES."""

    verdict = "inconclusive"

    def __init__(self, message: str, code: str = "interval") -> None:
        if code not in INCONCLUSIVE_CODES:
            raise ValueError(f"inconclusive code {code!r} is not one of {sorted(INCONCLUSIVE_CODES)}")
        super().__init__(message, code)


def _clean(x: Any) -> Any:
    """JSON-safe: NaN/inf become strings (JSON has no NaN; hiding them as null would lie)."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "item") and callable(x.item):  # numpy / torch scalars
        return _clean(x.item())
    return x


@dataclass
class ClaimEvidence:
    """Statistics, notes and figures of one claim test; read-only after the test ends."""

    claim: Claim
    subject_id: str
    dtype: str
    figure_dir: Path
    statistics: dict[str, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    verdict: str | None = None
    inputs: dict[str, dict] = field(default_factory=dict)
    """Provenance of what the claim ran on: ``subject``, ``corpus``, ``texts``, ``cache``."""
    started: float = field(default_factory=time.perf_counter)
    estimates: dict[str, Estimate] = field(default_factory=dict)
    """The recorded estimates as measured (``statistics`` holds their JSON-safe form, where a
    NaN is the string 'nan'); ``judge`` decides on these."""
    nulls: dict[str, Any] = field(default_factory=dict)
    """The null recorded with each statistic (an Estimate or a number), as measured."""
    seed_spread: Any = None
    """The claim test's :class:`harness.statistics.seed_spread.SeedSpread` on this subject (SAE-based
    claims, when measured): a verdict that differs between SAE training seeds is reported as
    inconclusive (seed-unstable), whatever this run's seed gives."""
    raw_verdict: str | None = None
    """The verdict of this run's own interval, before the seed spread is applied."""
    code: str | None = None
    """Why the verdict is inconclusive (a key of INCONCLUSIVE_CODES); None otherwise."""
    slug: str = ""
    """File-name part of this claim test (id and parameters), for attached data files."""
    data_files: list[dict] = field(default_factory=list)
    """Per-unit data files (:meth:`data`): file, sha256, rows, columns, description."""
    band: tuple[float, float] | None = None
    """The recorded tolerance band of the headline (SeedSpread.tolerance), when one applies."""
    drift: float = 0.0
    """How far the headline lies outside ``band`` (0 inside): nonzero fails the run."""

    def record(
        self,
        name: str,
        estimate: Estimate,
        *,
        null: Estimate | float | None = None,
        description: str = "",
        **extra: Any,
    ) -> Estimate:
        """Record one statistic (and its null, if any). Names are unique per test."""
        if name in self.statistics:
            raise ValueError(f"statistic {name!r} recorded twice for {self.claim.id}")
        entry: dict[str, Any] = {"estimate": estimate.to_dict(), "description": description}
        if null is not None:
            entry["null"] = null.to_dict() if isinstance(null, Estimate) else float(null)
        if name == self.claim.decision.statistic:
            d = self.claim.decision
            entry["threshold"] = (
                list(d.bounds) if d.direction == "between" else d.threshold_for(self.dtype)
            )
            entry["direction"] = d.direction
        entry.update(extra)
        self.statistics[name] = _clean(entry)
        self.estimates[name] = estimate
        if null is not None:
            self.nulls[name] = null
        return estimate

    def note(self, text: str) -> None:
        self.notes.append(" ".join(text.split()))

    def figure(self, fig: Any, name: str) -> Path:
        """Save a matplotlib figure beside the report and list it in the evidence."""
        self.figure_dir.mkdir(parents=True, exist_ok=True)
        path = self.figure_dir / f"{self.claim.id}_{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        self.figures.append(str(Path("figures") / path.name))
        return path

    def attach(self, name: str, text: str, suffix: str = ".html") -> Path:
        """Write a text attachment (e.g. a self-contained HTML token view) beside the figures,
        atomically, as ``{claim.id}_{name}{suffix}``, and list it with the figures: the
        Markdown report links to it (only images are embedded)."""
        if not name or "/" in name or "\\" in name:
            raise ValueError(f"attachment name must be a non-empty file name part, got {name!r}")
        if not suffix.startswith(".") or "/" in suffix:
            raise ValueError(f"suffix must start with '.', got {suffix!r}")
        path = self.figure_dir / f"{self.claim.id}_{name}{suffix}"
        atomic_write_text(path, text)
        self.figures.append(str(Path("figures") / path.name))
        return path

    def data(self, name: str, columns: dict[str, Any], description: str) -> Path:
        """Attach per-unit data behind an aggregate (per neuron, per feature, per text) as a CSV
        beside the report, listed in the record with its sha256, rows and columns, so a reader
        can recompute the headline without the model.

        ``columns``: equally long sequences; a cell that is itself a sequence (a token list) is
        written as JSON. The file is ``data/{slug}_{name}.csv`` (``slug``: the claim test)."""
        import csv
        import hashlib
        import io

        if not name or any(c in name for c in "/\\ "):
            raise ValueError(f"data name must be a plain file name part, got {name!r}")
        lengths = {k: len(v) for k, v in columns.items()}
        if not columns or len(set(lengths.values())) != 1:
            raise ValueError(f"{self.claim.id} data {name!r}: columns must be non-empty and equally long, "
                             f"got {lengths}")

        def cell(x: Any) -> Any:
            x = x.tolist() if hasattr(x, "tolist") else x
            if isinstance(x, (list, tuple)):
                return json.dumps(_clean(list(x)))
            x = _clean(x)
            return repr(x) if isinstance(x, float) else x  # repr: every float round-trips

        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(list(columns))
        for row in zip(*columns.values(), strict=True):
            writer.writerow([cell(x) for x in row])
        text = buf.getvalue()
        rel = Path("data") / f"{self.claim.id}_{self.slug or 'claim'}_{name}.csv"
        path = self.figure_dir.parent / rel
        atomic_write_text(path, text)
        self.data_files.append({"file": str(rel), "sha256": hashlib.sha256(text.encode()).hexdigest(),
                                "rows": next(iter(lengths.values())), "columns": list(columns),
                                "description": " ".join(description.split())})
        return path

    def judge(self) -> str:
        """Apply the registry's decision to the headline statistic; raise unless supported."""
        d = self.claim.decision
        if d.statistic not in self.statistics:
            raise KeyError(
                f"{self.claim.id}: headline statistic {d.statistic!r} was never recorded "
                f"(recorded: {sorted(self.statistics)})"
            )
        est = self.estimates[d.statistic]
        require_finite(est, f"{self.claim.id} on {self.subject_id}: headline {d.statistic}")
        self.verdict = self.raw_verdict = decide(est, d, self.dtype)
        self.code = "interval" if self.verdict == "inconclusive" else None
        beats, against = self._against(est)
        if self.verdict == "supported" and not beats:
            self.verdict = self.raw_verdict = "inconclusive"
            self.code = "null"
        if against:
            self.note(f"Judged against {against}: {'passed' if beats else 'NOT passed'}.")
        bound = list(d.bounds) if d.direction == "between" else d.threshold_for(self.dtype)
        message = (
            f"{self.claim.id} {self.verdict} on {self.subject_id}: {self.claim.statement!r} — "
            f"{d.statistic} = {est}, claim needs it {d.direction} {bound}"
        )
        if self.code == "null":
            message += f", and beyond its null ({against}): it is not"
        spread = self.seed_spread
        if spread is not None:
            self.band = spread.tolerance(est, self.dtype)
            self.drift = spread.drift(est, self.dtype)
            band = ("no band for this dtype" if self.band is None
                    else f"tolerance band [{self.band[0]:.4g}, {self.band[1]:.4g}]")
            self.note(f"Seed spread: {spread.describe()}; {band}; this run: {self.raw_verdict}"
                      f"{f', DRIFT {self.drift:+.4g}' if self.drift else ''}.")
            if not spread.stable:
                self.verdict, self.code = "inconclusive", "seed-unstable"
                message = (f"{self.claim.id} inconclusive (seed-unstable) on {self.subject_id}: "
                           f"the verdict flips between SAE training seeds ({spread.describe()}); "
                           f"this run alone: {self.raw_verdict}, {d.statistic} = {est}")
        if self.verdict == "refuted":
            raise ClaimRefuted(message)
        if self.verdict == "inconclusive":
            raise ClaimInconclusive(message, self.code)
        return self.verdict

    def _against(self, est: Estimate) -> tuple[bool, str]:
        """(whether the headline's interval beats the claim's null, a description of the null).

        'above': the interval lies entirely above the null's range; 'below': entirely below;
        'between' (a claim that something is at chance level): the interval overlaps the
        null's range. A null without an interval counts as its value."""
        d = self.claim.decision
        kind, value = next(iter((d.against or {"none": ""}).items()))
        if kind == "none":
            return True, ""
        name = d.statistic if kind == "from" else value
        null = self.nulls.get(name) if kind == "from" else self.estimates.get(name)
        if null is None:
            raise HarnessError(f"{self.claim.id}: the registry judges it against "
                               f"{'the null recorded with ' if kind == 'from' else ''}{name!r}, "
                               "which the test never recorded")
        if isinstance(null, Estimate):
            lo, hi = null.ci_low, null.ci_high
            if not (math.isfinite(lo) and math.isfinite(hi)):
                lo = hi = null.value
        else:
            lo = hi = float(null)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise HarnessError(f"{self.claim.id}: its null {name!r} is not finite ({null})")
        if d.direction == "above":
            beats = est.ci_low > hi
        elif d.direction == "below":
            beats = est.ci_high < lo
        else:
            beats = not (est.ci_high < lo or est.ci_low > hi)
        where = "the null recorded with it" if kind == "from" else name
        return beats, f"{where} [{lo:.4g}, {hi:.4g}]"

    def drift_message(self) -> str | None:
        """Why the run fails although the verdict may match: the headline left its band."""
        if not self.drift or self.band is None:
            return None
        d = self.claim.decision.statistic
        return (f"drift: {d} = {self.estimates[d].value:.6g} lies outside the recorded "
                f"tolerance band [{self.band[0]:.6g}, {self.band[1]:.6g}] by {self.drift:+.4g} "
                f"({self.seed_spread.describe()}): the number moved; find out why, then "
                "re-measure the spread")

    def inconclusive(self, reason: str, *, code: str) -> None:
        """End the claim as inconclusive for a reason other than an interval (e.g. too few
        texts in a category): not a pass, and not a crash. ``code``: a key of
        INCONCLUSIVE_CODES other than 'interval' and 'seed-unstable' (judge's own)."""
        if code not in INCONCLUSIVE_CODES or code in ("interval", "seed-unstable"):
            raise ValueError(f"code {code!r}: give one of "
                             f"{sorted(set(INCONCLUSIVE_CODES) - {'interval', 'seed-unstable'})}")
        self.verdict, self.code = "inconclusive", code
        self.note(reason)
        raise ClaimInconclusive(f"{self.claim.id} inconclusive ({code}) on {self.subject_id}: {reason}", code)

    def to_record(self) -> dict:
        return _clean(
            {
                "id": self.claim.id,
                "title": self.claim.title,
                "statement": self.claim.statement,
                "definition": self.claim.definition,
                "verdict": self.verdict,
                "raw_verdict": self.raw_verdict,
                "reason_code": self.code,
                "seed_spread": None if self.seed_spread is None else self.seed_spread.to_dict(),
                "band": None if self.band is None else list(self.band),
                "drift": self.drift,
                "statistics": self.statistics,
                "notes": self.notes,
                "figures": self.figures,
                "data": self.data_files,
                "published": [p.__dict__ for p in self.claim.published],
                "inputs": self.inputs,
            }
        )


def training_contrast(record: dict, twin: dict | None, twin_path: str) -> dict:
    """Trained-minus-twin contrast of a claim record's headline (the same claim test on the
    random-init twin, from the twin's report): the difference of the two estimates, with an
    interval from their half-widths added in quadrature (a normal approximation for two
    independent runs, stated in ``method``), and whether the claim also holds at random init.
    ``twin`` None: what is missing and how to get it."""
    if twin is None:
        return {"unavailable": f"no twin record of this test in {twin_path}: run the claims on the "
                               "random-init twin first (nox -s \"claims(SUBJECT:random)\")"}
    try:
        name = next(n for n, s in record["statistics"].items() if "threshold" in s)
        a, b = record["statistics"][name]["estimate"], twin["statistics"][name]["estimate"]
        va, la, ha, vb, lb, hb = (float(x) for x in (a["value"], a["ci_low"], a["ci_high"],
                                                     b["value"], b["ci_low"], b["ci_high"]))
    except (StopIteration, KeyError, TypeError, ValueError):
        return {"unavailable": f"the twin record in {twin_path} has no comparable headline",
                "twin_verdict": twin.get("verdict")}
    half = math.hypot((ha - la) / 2, (hb - lb) / 2)
    diff = va - vb
    return {"statistic": name, "trained": va, "twin": vb, "twin_verdict": twin.get("verdict"),
            "contrast": diff, "ci_low": diff - half, "ci_high": diff + half,
            "method": "difference of independent estimates, half-widths in quadrature",
            "also_at_random_init": twin.get("verdict") == "supported", "twin_report": twin_path}


DEFAULT_RUN = {"dtype": "float32", "seed": 0}


def run_dir_name(subject_id: str, *, dtype: str = "float32", seed: int = 0,
                 sae_seed: int | None = None, texts_sha256: str | None = None,
                 corpus_sha256: str | None = None) -> str:
    """The report directory of a run under ``--evidence-dir``: the subject id for the default
    run (float32, seed 0, the default SAE seed, the project's texts, the default corpus), else
    ``SUBJECT@DTYPE-seedN[-saeK][-textsSHA8][-corpusSHA8]`` (``corpus_sha256``: the raw text's
    hash of a ``--corpus``), so runs that differ in any of them do not overwrite each other's
    evidence."""
    if dtype == DEFAULT_RUN["dtype"] and seed == DEFAULT_RUN["seed"] and sae_seed is None \
            and texts_sha256 is None and corpus_sha256 is None:
        return subject_id
    name = f"{subject_id}@{dtype}-seed{seed}"
    if sae_seed is not None:
        name += f"-sae{sae_seed}"
    if texts_sha256 is not None:
        name += f"-texts{texts_sha256[:8]}"
    if corpus_sha256 is not None:
        name += f"-corpus{corpus_sha256[:8]}"
    return name


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file in the same directory and os.replace: never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a report is meant to be read by others
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return "" if x is None else str(x)


def headline(record: dict) -> tuple[str, str, str]:
    """(statistic = value, interval, threshold) strings for a summary row."""
    for name, s in record.get("statistics", {}).items():
        if "threshold" in s:
            e = s["estimate"]
            ci = "exact" if e["method"] == "exact" else f"[{_fmt(e['ci_low'])}, {_fmt(e['ci_high'])}]"
            return f"{name} = {_fmt(e['value'])}", ci, f"{s['direction']} {_fmt(s['threshold'])}"
    return "", "", ""


def earlier_run(record: dict, run: dict | None) -> bool:
    """Whether a record was measured by an earlier run than ``run`` (a kept record)."""
    return run is not None and record.get("run") is not None and record["run"] != run


def summary_rows(records: list[dict], run: dict | None = None) -> list[list[str]]:
    rows = []
    for r in records:
        stat, ci, thr = headline(r)
        verdict = r.get("verdict") or "?"
        if r.get("expected"):
            verdict += " (expected)"
        if earlier_run(r, run):
            verdict += f" (earlier run, {str(r['run'].get('commit'))[:8]})"
        if (r.get("training_contrast") or {}).get("also_at_random_init"):
            verdict += " (also holds at random init)"
        rows.append([r["id"], r.get("test", ""), verdict, stat, ci, thr])
    return rows


SUMMARY_HEADER = ["claim", "test", "verdict", "headline statistic", "95% CI", "threshold"]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


SAE_HEADER = ["hook", "origin", "d_sae", "FVE", "L0", "dead share", "CE recovered", "weights sha256"]
_SAE_QUALITY = ("fve", "l0", "dead_share", "ce_recovered")


def sae_rows(records: list[dict]) -> list[list[str]]:
    """One row per distinct SAE named in the claims' ``inputs.saes`` (quality on held-out
    contexts as measured when it was built; '-' for hub SAEs, whose quality is not measured)."""
    seen: dict[str, list[str]] = {}
    for r in records:
        for sae in (r.get("inputs") or {}).get("saes") or ():
            key = sae.get("weights_sha256", "")
            if key in seen:
                continue
            q = sae.get("quality") or {}
            seen[key] = [sae.get("hook_name", "?"), sae.get("origin", "?"), str(sae.get("d_sae", "?")),
                         *(_fmt(q[k]) if k in q else "-" for k in _SAE_QUALITY), key[:16]]
    return list(seen.values())


MODEL_CARD_FIELDS = (
    "subject", "trained", "n_params", "n_params_non_embedding", "tokens_seen",
    "unique_train_tokens", "epochs", "steps", "heldout_tokens", "heldout_loss", "unigram_loss",
    "bigram_loss", "bigram_margin", "baseline_method", "train_seconds", "tokenizer_sha256",
    "cache_key",
)


def model_card_rows(card: dict) -> list[list[str]]:
    """The model card of a subject the suite trained (or its twin): the architecture in one
    row, then the fields above that it has (losses in nats per held-out prediction)."""
    arch = card.get("architecture") or {}
    rows = [["architecture", ", ".join(f"{k} {v}" for k, v in arch.items())]] if arch else []
    return rows + [[k, _fmt(card[k]) if isinstance(card[k], float) else str(card[k])]
                   for k in MODEL_CARD_FIELDS if k in card]


TIMING_HEADER = ["stage", "seconds", "share"]


def timing_rows(timings: dict) -> list[list[str]]:
    """One row per stage or claim family of a ``timings`` dict (see harness.evidence.stages.Timings)."""
    return [[r["name"], f"{r['seconds']:.1f}", f"{100 * r['share']:.1f}%"] for r in timings["rows"]]


def timing_total(timings: dict) -> str:
    """The line under the timing table: session wall time, install, and how to read shares."""
    line = f"session wall time {timings['wall_seconds']:.1f} s"
    if timings.get("install_seconds") is not None:
        line += f" (+ install {timings['install_seconds']:.1f} s)"
    if timings.get("workers", 1) > 1:
        line += (f"; stages and families summed over {timings['workers']} xdist workers "
                 "(worker-seconds, can exceed the wall time)")
    return line + "; shares are of the rows' sum"


def render_markdown(doc: dict) -> str:
    prov = doc["provenance"]
    subj = prov.get("subject") or {}
    out = [
        f"# Evidence: {doc['subject_id']}",
        "",
        f"Schema {doc['schema_version']}; commit {prov.get('git', {}).get('commit', '?')}"
        f"{' (dirty)' if prov.get('git', {}).get('dirty') else ''}; device {prov.get('device')}; "
        f"dtype {prov.get('dtype')}; seed {prov.get('seed')}; "
        f"weights sha256 {str(subj.get('weight_hash', '?'))[:16]}",
        "",
        markdown_table(SUMMARY_HEADER, summary_rows(doc["claims"], doc.get("run"))),
        "",
    ]
    card = subj.get("model_card")
    if card:
        out += ["## Model card", "", markdown_table(["field", "value"], model_card_rows(card)), ""]
    saes = sae_rows(doc["claims"])
    if saes:
        out += ["## SAEs the claims ran on", "", markdown_table(SAE_HEADER, saes), ""]
    timings = doc.get("timings")
    if timings:
        out += ["## Wall time by stage", "", markdown_table(TIMING_HEADER, timing_rows(timings)), "",
                timing_total(timings) + ". A family's seconds are its tests' setup + call + "
                "teardown less the stages (model load, corpus, harvest, SAE build) that ran "
                "inside them.", ""]
    for r in doc["claims"]:
        out += [f"## {r['id']}: {r.get('title', '')} ({r.get('verdict')})", "", f"Test: `{r.get('test')}`", ""]
        if r.get("statement"):
            out += [f"Claim: {r['statement']}", ""]
        if r.get("reason"):
            out += [f"Reason: {r['reason']}", ""]
        corpus = (r.get("inputs") or {}).get("corpus")
        if isinstance(corpus, dict) and corpus.get("description"):
            out += [f"Corpus: {corpus['description']}; {corpus.get('n_tokens', '?')} tokens, "
                    f"token sha256 {str(corpus.get('sha256', '?'))[:16]}", ""]
        tc = r.get("training_contrast")
        if tc:
            out += [("Trained minus random-init twin: " + (
                f"{tc['statistic']} {_fmt(tc['trained'])} - {_fmt(tc['twin'])} = {_fmt(tc['contrast'])} "
                f"[{_fmt(tc['ci_low'])}, {_fmt(tc['ci_high'])}] ({tc['method']}); twin verdict "
                f"{tc['twin_verdict']}{': also holds at random init' if tc['also_at_random_init'] else ''}"
                if "contrast" in tc else tc["unavailable"])), ""]
        if r.get("run"):
            run = r["run"]
            out += [f"Run: commit {run.get('commit')}{' (dirty)' if run.get('dirty') else ''}, "
                    f"started {run.get('started')}"
                    f"{' (kept from an earlier run)' if earlier_run(r, doc.get('run')) else ''}", ""]
        stats_rows = []
        for name, s in r.get("statistics", {}).items():
            e = s["estimate"]
            null = s.get("null")
            null_s = _fmt(null["value"]) if isinstance(null, dict) else _fmt(null)
            role = ("headline" if "threshold" in s else "co-headline, reported" if s.get("co_headline")
                    else "reported")
            stats_rows.append([name, role, _fmt(e["value"]), f"[{_fmt(e['ci_low'])}, {_fmt(e['ci_high'])}]",
                               str(e["n"]), e["method"], null_s, s.get("description", "")])
        if stats_rows:
            out += [markdown_table(["statistic", "role", "value", "CI", "n", "method", "null", "what"],
                                   stats_rows), "",
                    "Only the headline decides the verdict (with the null or control named in the "
                    "registry); every other statistic, definition or threshold variant is reported "
                    "beside it and decides nothing (no best-of-many).", ""]
        if r.get("published"):
            out += ["Published:", ""]
            out += [f"- {p['quantity']} = {p['value']} ({p['subject']}; {p['provenance']})" for p in r["published"]]
            out.append("")
        out += [f"- {n}" for n in r.get("notes", [])]
        out += [f"![{f}]({f})" if f.lower().endswith(IMAGE_SUFFIXES) else f"- [{f}]({f})"
                for f in r.get("figures", [])]
        for d in r.get("data") or ():
            out.append(f"- data: [{d['file']}]({d['file']}) ({d['rows']} rows: "
                       f"{', '.join(d['columns'])}; sha256 {d['sha256'][:16]}): {d['description']}")
        out.append("")
    return "\n".join(out)


class EvidenceWriter:
    """The report of one run directory: claim records, rewritten after each one.

    A run updates the claims it runs and keeps every other record already in the directory
    (``-k family-S`` no longer wipes family H's evidence): records are keyed by pytest node
    id, and each carries the ``run`` (commit, dirty, start time) that measured it. A report
    this code cannot read (another schema, another subject, broken JSON) is renamed to
    ``evidence.json.unreadable-<time>`` and a fresh one started, never silently merged.
    """

    def __init__(self, directory: Path, subject_id: str, provenance: dict) -> None:
        self.directory = directory
        self.subject_id = subject_id
        self.provenance = provenance
        git = provenance.get("git") or {}
        self.run = {"id": uuid.uuid4().hex[:12], "commit": git.get("commit"), "dirty": git.get("dirty"),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.timings: dict | None = None
        self.set_aside: Path | None = None
        self.records: list[dict] = self._previous()
        self.kept = len(self.records)
        """Records of earlier runs found at start (some may be replaced by this run)."""

    def _previous(self) -> list[dict]:
        path = self.json_path
        if not path.exists():
            return []
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            ok = (isinstance(doc, dict) and doc.get("schema_version") in READABLE_SCHEMAS
                  and doc.get("subject_id") == self.subject_id and isinstance(doc.get("claims"), list))
        except (OSError, ValueError):
            ok = False
        if not ok:
            self.set_aside = path.with_name(f"{path.name}.unreadable-{int(time.time())}")
            os.replace(path, self.set_aside)
            return []
        return [r for r in doc["claims"] if isinstance(r, dict) and r.get("nodeid")]

    @property
    def json_path(self) -> Path:
        return self.directory / "evidence.json"

    @property
    def md_path(self) -> Path:
        return self.directory / "evidence.md"

    def add(self, record: dict) -> None:
        for name, value in (record.get("inputs") or {}).items():
            # First seen wins; a later claim on different inputs is visible in its own record.
            self.provenance.setdefault(name, value)
        record = {**record, "run": self.run}
        key = record.get("nodeid")
        for i, old in enumerate(self.records):
            if key is not None and old.get("nodeid") == key:
                self.records[i] = record
                break
        else:
            self.records.append(record)
        self.flush()

    def set_timings(self, timings: dict) -> None:
        """Record the session's wall-time breakdown (``Timings.to_dict()``) and rewrite."""
        self.timings = timings
        self.flush()

    def document(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "subject_id": self.subject_id,
            "provenance": self.provenance,
            "run": self.run,
            "claims": self.records,
            "timings": self.timings,
        }

    def flush(self) -> None:
        doc = _clean(self.document())
        atomic_write_text(self.json_path, json.dumps(doc, indent=2, sort_keys=False) + "\n")
        atomic_write_text(self.md_path, render_markdown(doc))
