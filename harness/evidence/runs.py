"""The run directories under an evidence directory, as the cross-subject report reads them.

Each directory directly under ``--evidence-dir`` that holds an ``evidence.json`` is one run
(harness.evidence.record.run_dir_name: the subject id, or ``SUBJECT@DTYPE-seedN...``). This
module reads and checks them (a broken or missing file is a ReportError naming it) and orders
them the way the matrix shows them: by the model's parameter count, each random-init twin
right after its model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from harness.evidence.html import ReportError
from harness.evidence.record import READABLE_SCHEMAS

SUBJECT_HTML = "evidence.html"
TRENDS_DIR = "trends"
"""The report's own directory beside the runs (the trend figures): never a run."""
TWIN = ":random"
_REPORT_FILES = ("evidence.md", "figures", "data")
"""What marks a directory as a run's report even without its evidence.json."""


@dataclass(frozen=True)
class SubjectReport:
    """One run directory's ``evidence.json``, read and checked."""

    name: str
    """The directory's name: the subject id, or ``SUBJECT@DTYPE-seedN...`` for other runs."""
    directory: Path
    doc: dict

    @property
    def subject_id(self) -> str:
        return self.doc["subject_id"]

    @property
    def records(self) -> list[dict]:
        return self.doc["claims"]

    @property
    def subject(self) -> dict:
        """The subject's provenance: the report's own, else the first claim's inputs."""
        subj = (self.doc.get("provenance") or {}).get("subject")
        for r in self.records:
            subj = subj or (r.get("inputs") or {}).get("subject")
        return subj if isinstance(subj, dict) else {}

    @property
    def twin(self) -> bool:
        return self.subject_id.endswith(TWIN) or bool(self.subject.get("random_init"))

    @property
    def model(self) -> str:
        """The subject its twin sits beside (a twin's model; a model's own id)."""
        return self.subject_id.removesuffix(TWIN)

    @property
    def variant(self) -> str:
        """What the directory name adds to the subject id (``@float64-seed3``), or ''."""
        return self.name.removeprefix(self.subject_id)

    @property
    def n_params(self) -> int | None:
        """Parameter count as the evidence records it (the subject's provenance, or a trained
        subject's model card); None when it records none."""
        subj = self.subject
        n = subj.get("n_params") or (subj.get("model_card") or {}).get("n_params")
        return int(n) if isinstance(n, (int, float)) and not isinstance(n, bool) else None

    @property
    def href(self) -> str:
        """This directory's page, relative to the evidence directory. './' first: a name
        like ``smollm2-135m:random`` would otherwise read as a URL scheme."""
        return f"./{quote(self.name, safe=':@+=,;-._~')}/{SUBJECT_HTML}"


def _read(path: Path) -> dict:
    """A run directory's evidence.json, checked enough for the report to rely on."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ReportError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise ReportError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ReportError(f"{path}: not an evidence report (a JSON {type(doc).__name__})")
    if doc.get("schema_version") not in READABLE_SCHEMAS:
        raise ReportError(f"{path}: schema_version {doc.get('schema_version')!r}; the report "
                          f"reads {', '.join(READABLE_SCHEMAS)} (rerun the claims on this subject)")
    if not isinstance(doc.get("subject_id"), str) or not isinstance(doc.get("claims"), list):
        raise ReportError(f"{path}: lacks subject_id or its claims list")
    for i, r in enumerate(doc["claims"]):
        if not isinstance(r, dict) or not isinstance(r.get("id"), str):
            raise ReportError(f"{path}: claim record {i} has no id")
    return doc


def load_subjects(evidence_dir: Path) -> list[SubjectReport]:
    """Every run directory directly under ``evidence_dir`` (in name order).

    A directory holding a report (evidence.md, figures/ or data/) without its evidence.json,
    or an evidence.json this code cannot read, is an error naming the file; a directory
    holding none of them is not a run (it is skipped); no run at all is an error."""
    if not evidence_dir.is_dir():
        raise ReportError(f"{evidence_dir}: no such evidence directory (run the claims first)")
    found = []
    for child in sorted(evidence_dir.iterdir()):
        if not child.is_dir() or child.name.startswith(".") or child.name == TRENDS_DIR:
            continue
        path = child / "evidence.json"
        if not path.exists():
            if any((child / f).exists() for f in _REPORT_FILES):
                raise ReportError(f"{path}: missing, although {child} holds a report (rerun the "
                                  "claims on this subject, or remove the directory)")
            continue
        found.append(SubjectReport(child.name, child, _read(path)))
    if not found:
        raise ReportError(f"{evidence_dir}: holds no */evidence.json (run the claims first)")
    return found


def order_subjects(subjects: list[SubjectReport]) -> list[SubjectReport]:
    """By the model's parameter count (subjects that record none last, by name), each
    random-init twin right after its model (per run variant: dtype, seed, ...)."""
    sizes: dict[str, int] = {}
    for s in subjects:
        if s.n_params is not None:
            sizes[s.model] = min(sizes.get(s.model, s.n_params), s.n_params)
    return sorted(subjects, key=lambda s: (s.model not in sizes, sizes.get(s.model, 0), s.model,
                                           s.variant, s.twin, s.name))


