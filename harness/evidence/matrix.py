"""The cross-subject matrix: one row per claim test, one column per run, as Markdown
(``matrix.md``) and as HTML (``index.html``).

A cell is one run's record of one claim test: the verdict (with the reason code when
inconclusive), marks ("expected", "earlier run COMMIT", "also holds at random init", as
``evidence.md``'s summary table has them), the headline and its interval, and the link to the
record's section in that run's ``evidence.html``.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from pathlib import Path

from harness.evidence import trends
from harness.evidence.html import data_uri, page, record_anchors
from harness.evidence.record import earlier_run, headline, markdown_table
from harness.evidence.runs import SubjectReport

FAMILY_ORDER = ("H", "W", "S", "R", "N")
"""Row order of the families: hook math first, then what builds on it (CLAIMS.md's order)."""
_ID = re.compile(r"^([A-Z])([0-9]+)$")


def claim_order(cid: str, test: str) -> tuple:
    """Sort key of a matrix row: family (H, W, S, R, N; others after), number, test."""
    m = _ID.match(cid)
    if m is None:
        return (len(FAMILY_ORDER) + 1, 0, cid, test)
    fam = FAMILY_ORDER.index(m.group(1)) if m.group(1) in FAMILY_ORDER else len(FAMILY_ORDER)
    return (fam, int(m.group(2)), cid, test)


@dataclass(frozen=True)
class Cell:
    """One subject's record of one claim test, as the matrix shows it."""

    verdict: str
    """The verdict, with ``/CODE`` when inconclusive."""
    marks: tuple[str, ...]
    statistic: str
    interval: str
    href: str
    earlier: bool

    @property
    def css(self) -> str:
        return f"v-{self.verdict.split('/')[0]}" + (" earlier" if self.earlier else "")


def _cell(s: SubjectReport, r: dict, anchor: str) -> Cell:
    verdict = str(r.get("verdict") or "?")
    if verdict == "inconclusive" and r.get("reason_code"):
        verdict += f"/{r['reason_code']}"
    earlier = earlier_run(r, s.doc.get("run"))
    marks = []
    if r.get("expected"):
        marks.append("expected")
    if earlier:
        marks.append(f"earlier run {str(r['run'].get('commit'))[:8]}")
    if (r.get("training_contrast") or {}).get("also_at_random_init"):
        marks.append("also holds at random init")
    stat, ci, _ = headline(r)
    return Cell(verdict, tuple(marks), stat, ci, f"{s.href}#{anchor}", earlier)


@dataclass(frozen=True)
class Matrix:
    """The runs (in column order) and every claim test any of them recorded."""

    subjects: list[SubjectReport]
    rows: list[tuple[str, str]]
    """(claim id, test), in claim order."""
    titles: dict[str, str]
    cells: dict[tuple[str, str, str], Cell]
    """(claim id, test, subject directory name) -> cell."""


def build_matrix(subjects: list[SubjectReport]) -> Matrix:
    cells: dict[tuple[str, str, str], Cell] = {}
    titles: dict[str, str] = {}
    for s in subjects:
        for r, anchor in zip(s.records, record_anchors(s.records), strict=True):
            key = (r["id"], str(r.get("test", "")))
            titles.setdefault(r["id"], str(r.get("title", "")))
            cells.setdefault((*key, s.name), _cell(s, r, anchor))
    rows = sorted({k[:2] for k in cells}, key=lambda k: claim_order(*k))
    return Matrix(subjects, rows, titles, cells)


def _params(s: SubjectReport) -> str:
    return "?" if s.n_params is None else f"{s.n_params:,}"


def _subject_rows(m: Matrix) -> list[list[str]]:
    """One row per run directory (its page's link first, then SUBJECT_HEADER's columns)."""
    rows = []
    for s in m.subjects:
        run = s.doc.get("run") or {}
        n = len(s.records)
        kept = sum(earlier_run(r, run) for r in s.records)
        note = ("no claim records yet: evidence.json holds none" if n == 0 else
                f"{kept} of {n} records from earlier runs" if kept else "")
        rows.append([s.href, s.name, s.subject_id, "random-init twin" if s.twin else "model", _params(s),
                     str(s.subject.get("weight_hash") or "?")[:16],
                     f"{str(run.get('commit'))[:8]} {run.get('started', '')}".strip(), str(n), note])
    return rows


SUBJECT_HEADER = ["column", "subject", "kind", "parameters", "weights sha256", "latest run",
                  "claim records", "note"]
PUBLISHED_HEADER = ["claims", "quantity", "published subject", "value", "provenance",
                    "this suite at that layer"]
INTRO = (
    "One row per claim test, one column per subject run, ordered by parameter count with each "
    "random-init twin beside its model. A cell: the verdict (with the reason code when "
    "inconclusive), the headline statistic and its 95% interval (\"exact\" when nothing is "
    "sampled), linked to the record in that subject's evidence.html. \"earlier run COMMIT\": "
    "the record was kept from an earlier run than the directory's latest (as in evidence.md); "
    "\"expected\": the verdict recorded for the subject in the registry; \"—\": no record of "
    "that test for the subject. Rebuilt at the end of every claims run, or by: "
    "python -m harness.evidence.report."
)


def published_rows(points: list[trends.PublishedPoint], series: list[trends.Series]) -> list[list[str]]:
    """The published table: each published point, and every subject's value at its layer."""
    panel = {p.quantity: p.key for p in trends.PANELS}
    rows = []
    for p in points:
        ours = "; ".join(f"{s.name} {s.layers[p.layer][panel[p.quantity]]:.3g}" for s in series
                         if panel[p.quantity] in s.layers.get(p.layer, {}))
        rows.append([", ".join(p.claims), p.quantity, p.subject, f"{p.value:g}", p.provenance,
                     ours or "—"])
    return rows


def render_matrix_md(m: Matrix, figure: str | None, published: list[list[str]]) -> str:
    header = ["claim", "test", *(s.name for s in m.subjects if s.records)]
    rows = []
    for cid, test in m.rows:
        row = [cid, test]
        for s in m.subjects:
            if not s.records:
                continue
            c = m.cells.get((cid, test, s.name))
            if c is None:
                row.append("—")
                continue
            marks = "".join(f" ({mk})" for mk in c.marks)
            stat = f"<br>{c.statistic} {c.interval}".rstrip() if c.statistic else ""
            row.append(f"[{c.verdict}]({c.href}){marks}{stat}")
        rows.append(row)
    out = ["# Claims across subjects", "", INTRO, ""]
    out += [markdown_table(header, rows) if len(header) > 2 else "No subject has claim records yet.", ""]
    subjects = [[f"[{name}]({href})", *rest] for href, name, *rest in _subject_rows(m)]
    out += ["## Subjects", "", markdown_table(SUBJECT_HEADER, subjects), ""]
    out += ["## Family W: agreement by layer", ""]
    if figure:
        out += [f"![family W agreement by layer]({figure})", ""]
    else:
        out += ["No subject has family-W per-layer data yet.", ""]
    out += ["The thesis's published numbers (from the registry, with their provenance):", "",
            markdown_table(PUBLISHED_HEADER, published), ""]
    return "\n".join(out)


def _td(c: Cell | None) -> str:
    if c is None:
        return '<td class="none">—</td>'
    marks = "".join(f'<span class="mark">{html.escape(mk)}</span>' for mk in c.marks)
    stat = (f'<span class="stat">{html.escape(c.statistic)}</span>'
            f'<span class="stat">{html.escape(c.interval)}</span>') if c.statistic else ""
    title = ' title="kept from an earlier run than this directory\'s latest"' if c.earlier else ""
    return (f'<td class="{c.css}"{title}><a href="{html.escape(c.href)}">{html.escape(c.verdict)}'
            f"</a>{marks}{stat}</td>")


def _html_table(header: list[str], rows: list[list[str]], *, linked: bool = False) -> str:
    """A table of escaped text; ``linked``: each row's first item is the href of its second."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for r in rows:
        cells = [html.escape(c) for c in r]
        if linked:
            cells = [f'<a href="{cells[0]}">{cells[1]}</a>', *cells[2:]]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>\n")
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{''.join(body)}</tbody>\n</table>"


def render_index_html(m: Matrix, figure: Path | None, published: list[list[str]]) -> str:
    shown = [s for s in m.subjects if s.records]
    head = "".join(f'<th><a href="{html.escape(s.href)}">{html.escape(s.name)}</a>'
                   f'<span class="mark">{"random-init twin" if s.twin else "model"}, '
                   f"{_params(s)} parameters</span></th>" for s in shown)
    body = []
    for cid, test in m.rows:
        tds = "".join(_td(m.cells.get((cid, test, s.name))) for s in shown)
        body.append(f'<tr class="claim-row" data-claim="{html.escape(cid)}" data-test="{html.escape(test)}">'
                    f'<th title="{html.escape(m.titles.get(cid, ""))}">{html.escape(cid)}</th>'
                    f"<td><code>{html.escape(test)}</code></td>{tds}</tr>")
    matrix = (f'<table id="matrix">\n<thead><tr><th>claim</th><th>test</th>{head}</tr></thead>\n'
              "<tbody>\n" + "\n".join(body) + "\n</tbody>\n</table>") if shown else \
        '<p class="note">No subject has claim records yet.</p>'
    fig = (f'<p><img alt="family W agreement by layer" src="{data_uri(figure)}"></p>' if figure
           else '<p class="note">No subject has family-W per-layer data yet.</p>')
    parts = [
        "<h1>Claims across subjects</h1>", f"<p>{html.escape(INTRO)}</p>", matrix,
        "<h2>Subjects</h2>", _html_table(SUBJECT_HEADER, _subject_rows(m), linked=True),
        '<h2 id="trends">Family W: agreement by layer</h2>', fig,
        "<p>The thesis's published numbers (from the registry, with their provenance):</p>",
        _html_table(PUBLISHED_HEADER, published),
    ]
    return page("Claims across subjects", "\n".join(parts))


