"""The cross-subject report: every run directory's ``evidence.json`` under an evidence
directory, side by side.

Writes, under the evidence directory:

- ``matrix.md`` and ``index.html``: one row per claim test (family H, W, S, R, N, then the
  number), one column per subject run ordered by parameter count with each random-init twin
  beside its model. A cell is the verdict (with the reason code when inconclusive), the
  headline and its 95% interval, linked to the record in that subject's ``evidence.html``
  (harness.evidence.matrix; the runs are read and ordered by harness.evidence.runs).
- ``trends/W_agreement_by_layer.png``: family W's agreement per layer for every subject beside
  the thesis's published table (harness.evidence.trends).
- ``<run>/evidence.html`` for every run directory: its ``evidence.md``, self-contained
  (harness.evidence.html).

A record kept from an earlier run than its directory's latest (a subset run keeps the other
claims' records) is marked "earlier run" as in ``evidence.md``. The plugin calls
:func:`write_report` at the end of every session that wrote evidence; the CLI
(``python -m harness.evidence.report [--evidence-dir evidence]``) rebuilds it by hand.
"""

from __future__ import annotations

import argparse
import html
import sys
from collections.abc import Callable
from pathlib import Path

from harness.evidence import trends
from harness.evidence.html import ReportError, page, render_subject_page
from harness.evidence.matrix import (
    build_matrix,
    published_rows,
    render_index_html,
    render_matrix_md,
)
from harness.evidence.record import atomic_write_text
from harness.evidence.registry import Registry, RegistryError
from harness.evidence.runs import (
    SUBJECT_HTML,
    TRENDS_DIR,
    SubjectReport,
    load_subjects,
    order_subjects,
)

__all__ = ["INDEX_HTML", "MATRIX_MD", "ReportError", "main", "write_report"]

MATRIX_MD = "matrix.md"
INDEX_HTML = "index.html"


def _write(path: Path, make: Callable[[], str]) -> Path:
    """Write what ``make`` renders to ``path`` atomically; any failure is a ReportError that
    names the file."""
    try:
        text = make()
        atomic_write_text(path, text)
    except ReportError:
        raise
    except Exception as exc:
        raise ReportError(f"{path}: could not write it: {type(exc).__name__}: {exc}") from exc
    return path


def _empty_page(s: SubjectReport) -> str:
    return page(f"Evidence: {s.subject_id}",
                f'<nav><a href="../{INDEX_HTML}">all subjects: the cross-subject matrix</a></nav>'
                f"<h1>Evidence: {html.escape(s.subject_id)}</h1>"
                '<p class="note">No claim records yet: evidence.json holds none.</p>')


def write_report(evidence_dir: Path, registry: Registry) -> list[Path]:
    """Rewrite every run directory's evidence.html, the trend figure, matrix.md and index.html
    under ``evidence_dir``; returns the files written. Raises ReportError naming the file."""
    subjects = order_subjects(load_subjects(evidence_dir))
    written = []
    for s in subjects:
        page_path = s.directory / SUBJECT_HTML
        if not s.records and not (s.directory / "evidence.md").exists():
            written.append(_write(page_path, lambda s=s: _empty_page(s)))
        else:
            written.append(_write(page_path, lambda s=s: render_subject_page(
                s.directory, s.doc, index_href=f"../{INDEX_HTML}")))

    models = list(dict.fromkeys(s.model for s in subjects))
    series = [trends.Series(s.name, models.index(s.model), s.twin, layers)
              for s in subjects if (layers := trends.w_layers(s.doc))]
    points = trends.published_points(registry)
    figure = evidence_dir / TRENDS_DIR / trends.FIGURE
    if series:
        try:
            trends.agreement_figure(series, points, figure)
        except Exception as exc:
            raise ReportError(f"{figure}: could not draw it: {type(exc).__name__}: {exc}") from exc
        written.append(figure)
    else:
        figure.unlink(missing_ok=True)  # no stale figure of subjects no longer there
    published = published_rows(points, series)
    m = build_matrix(subjects)
    shown = figure if series else None
    rel = f"{TRENDS_DIR}/{trends.FIGURE}" if series else None
    written.append(_write(evidence_dir / MATRIX_MD, lambda: render_matrix_md(m, rel, published)))
    written.append(_write(evidence_dir / INDEX_HTML, lambda: render_index_html(m, shown, published)))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m harness.evidence.report",
        description="Write the cross-subject report (matrix.md, index.html, each run's "
                    "evidence.html) from every */evidence.json under the evidence directory.")
    parser.add_argument("--evidence-dir", type=Path, default=Path("evidence"),
                        help="the directory holding one report directory per run (default evidence/)")
    parser.add_argument("--registry", type=Path, default=Path("fixtures/claims.yaml"),
                        help="the claim registry, for the published numbers (default fixtures/claims.yaml)")
    args = parser.parse_args(argv)
    try:
        registry = Registry.load(args.registry)
        written = write_report(args.evidence_dir, registry)
    except (ReportError, RegistryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
