"""Self-contained HTML pages of the evidence: a subject's ``evidence.md`` rendered as
``evidence.html`` beside it, readable from disk without a server or a network.

Self-contained means every figure is inlined as a base64 ``data:`` URI and the page carries its
own CSS (no external stylesheet, script or font): the file can be mailed, attached to a review
or opened from an archive and still show everything. Links to other files of the run directory
(``data/*.csv``, the S5 token pages) stay relative links, which resolve from disk.

The page is the Markdown the writer produced (harness.evidence.record.render_markdown), parsed
by markdown-it-py (CommonMark plus tables; raw HTML in the Markdown is escaped, not passed
through), with one anchor per claim record (:func:`claim_anchor`) so the cross-subject matrix
can link to a row.
"""

from __future__ import annotations

import base64
import html
import mimetypes
import re
from pathlib import Path

from harness.evidence.errors import HarnessError

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em auto;
       max-width: 78em; padding: 0 1em; color: #1b1b1b; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 13px; }
th, td { border: 1px solid #c8c8c8; padding: 3px 6px; vertical-align: top; text-align: left; }
th { background: #f0f0f0; position: sticky; top: 0; }
code { background: #f4f4f4; padding: 0 3px; }
img { max-width: 100%; height: auto; border: 1px solid #e0e0e0; }
h2 { border-top: 1px solid #d0d0d0; padding-top: 0.6em; margin-top: 1.6em; }
:target { background: #fff6c8; }
.v-supported { background: #e3f4e1; } .v-refuted { background: #fbe0de; }
.v-inconclusive { background: #fdf1d6; } .v-unavailable { background: #ececec; }
.v-error { background: #f3c6f0; } .none { color: #999; text-align: center; }
.earlier { background-image: repeating-linear-gradient(135deg, transparent 0 6px,
           rgba(0,0,0,0.06) 6px 8px); }
.mark { display: block; font-size: 11px; color: #555; }
.stat { display: block; font-family: ui-monospace, monospace; font-size: 12px; }
.note { color: #555; }
nav { font-size: 13px; margin-bottom: 1em; }
"""
"""One stylesheet for every page of the report (inline in each)."""


class ReportError(HarnessError):
    """The report could not be written: the message names the file at fault and what is wrong
    with it. A harness failure, never a verdict: it fails the run that tried to write it."""


def claim_anchor(record: dict) -> str:
    """The HTML id of a claim record's section: its id and test, e.g.
    ``H1-test_pre_activation_identity-unfolded`` (the claim id alone is not unique: one claim
    has several tests or parameters)."""
    raw = f"{record.get('id', '')}-{record.get('test', '')}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", raw).strip("-")


def record_anchors(records: list[dict]) -> list[str]:
    """:func:`claim_anchor` of each record, made unique within one page (a repeated id/test
    pair, e.g. the same test name in two modules, gets ``-2``, ``-3``...)."""
    seen: dict[str, int] = {}
    out = []
    for r in records:
        base = claim_anchor(r)
        seen[base] = seen.get(base, 0) + 1
        out.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return out


def data_uri(path: Path) -> str:
    """The file as a base64 ``data:`` URI (its type from the suffix)."""
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def page(title: str, body: str) -> str:
    """A complete HTML document with the report's inline stylesheet and nothing external."""
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            f"{body}\n</body>\n</html>\n")


def _markdown():
    from markdown_it import MarkdownIt

    # CommonMark + GFM tables; html False: text from a claim (a note with "<") is escaped.
    return MarkdownIt("commonmark", {"html": False}).enable("table")


def render_subject_page(run_dir: Path, doc: dict, *, index_href: str | None = None) -> str:
    """``evidence.html`` of one run directory: its ``evidence.md`` rendered, each claim
    section with the id :func:`record_anchors` gives it, each summary-table row linked to its
    section, every image inlined. ``doc`` is the directory's ``evidence.json``, whose claim
    order the Markdown follows (render_markdown writes both in one flush).

    Raises ReportError (naming the file) when evidence.md is missing, when a claim record has
    no section in it (the two files disagree) or when an image it shows is missing."""
    from markdown_it.token import Token

    md_path = run_dir / "evidence.md"
    try:
        text = md_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ReportError(f"{md_path}: cannot read the subject's Markdown report ({exc.strerror or exc})"
                          ) from None
    records = doc.get("claims") or []
    anchors = record_anchors(records)
    md = _markdown()
    tokens = md.parse(text)

    # Claim sections: "## ID: TITLE (VERDICT)" in the records' order (render_markdown).
    pending = 0
    for i, tok in enumerate(tokens):
        if tok.type == "heading_open" and tok.tag == "h2" and pending < len(records):
            r = records[pending]
            if tokens[i + 1].content == f"{r['id']}: {r.get('title', '')} ({r.get('verdict')})":
                tok.attrSet("id", anchors[pending])
                pending += 1
    if pending < len(records):
        r = records[pending]
        raise ReportError(f"{md_path}: no section for claim {r.get('id')} ({r.get('test')}) of "
                          f"{run_dir / 'evidence.json'}: the two files disagree (rerun the claims "
                          "to rewrite both)")

    # The summary table (the first table): link each row's claim cell to its section.
    row = -1
    in_body = False
    for i, tok in enumerate(tokens):
        if tok.type == "table_close":
            break
        if tok.type == "tbody_open":
            in_body = True
        elif in_body and tok.type == "tr_open":
            row += 1
            cell = tokens[i + 2]  # tr_open, td_open, inline
            if row < len(anchors) and cell.type == "inline" and cell.children is not None:
                cell.children = [Token("link_open", "a", 1, attrs={"href": f"#{anchors[row]}"}),
                                 *cell.children, Token("link_close", "a", -1)]

    for tok in tokens:
        for child in tok.children or ():
            if child.type == "image":
                src = str(child.attrGet("src") or "")
                path = run_dir / src
                if not path.is_file():
                    raise ReportError(f"{md_path} shows the figure {src}, which does not exist "
                                      f"({path})")
                child.attrSet("src", data_uri(path))

    nav = (f'<nav><a href="{html.escape(index_href)}">all subjects: the cross-subject matrix</a></nav>\n'
           if index_href else "")
    return page(f"Evidence: {doc.get('subject_id', run_dir.name)}",
                nav + md.renderer.render(tokens, md.options, {}))
