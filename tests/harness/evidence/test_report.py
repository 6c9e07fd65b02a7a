"""The cross-subject report (harness.evidence.report), on small evidence directories built here.

Each run directory is written the way the plugin writes one: an ``evidence.json`` document and
the ``evidence.md`` that ``render_markdown`` makes of it, with real (tiny) PNG figures. The
browser test opens the result in a real headless Chromium (tests/chromium.py) and checks what
a reader sees.
"""

from __future__ import annotations

import json
import os
import re
import struct
import zlib
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from harness.evidence import trends
from harness.evidence.html import ReportError, claim_anchor
from harness.evidence.record import SCHEMA_VERSION, render_markdown
from harness.evidence.registry import Registry
from harness.evidence.report import INDEX_HTML, MATRIX_MD, main, write_report
from harness.evidence.runs import load_subjects, order_subjects
from harness.evidence.trends import PANELS, published_points
from tests.chromium import Chromium, find_chromium
from tests.standins import H1_REGISTRY

pytest_plugins = ["pytester"]

REGISTRY = H1_REGISTRY + """\
  W2:
    family: W
    title: agreement falls with depth
    source: a test source
    statement: Agreement falls with depth.
    definition: slope
    decision: {statistic: slope, direction: below, threshold: 0.0, against: {none: a test claim}}
    published:
      - {quantity: mean Jaccard, value: 0.0291, subject: solu-2l L0, provenance: a test table}
      - {quantity: mean Jaccard, value: 0.0162, subject: solu-2l L1, provenance: a test table}
      - {quantity: neurons with overlap > 0, value: 0.3981, subject: solu-2l L0, provenance: a test table}
"""

NOW = {"id": "now000000000", "commit": "c0ffee0000000000", "dirty": False, "started": "2026-12-05T10:00:00Z"}
OLD = {"id": "old000000000", "commit": "0dd0dd1111111111", "dirty": False, "started": "2026-12-01T10:00:00Z"}


def _png(width: int = 6, height: int = 4) -> bytes:
    """A valid RGB PNG, built by hand (no image library needed)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = b"".join(b"\x00" + b"\x20\x80\xc0" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _rec(cid: str, test: str, verdict: str = "supported", value: float = 0.8, *, run: dict = NOW,
         code: str | None = None, figures: tuple[str, ...] = (), per_layer: list | None = None,
         method: str = "bootstrap-percentile") -> dict:
    stats = {"r": {"estimate": {"value": value, "ci_low": value - 0.1, "ci_high": value + 0.1,
                                "n": 50, "method": method, "confidence": 0.95},
                   "description": "r", "threshold": 0.5, "direction": "above"}}
    if per_layer is not None:
        stats["table"] = {"estimate": {"value": 0.0, "ci_low": "nan", "ci_high": "nan", "n": 2,
                                       "method": "difference", "confidence": 0.95},
                          "description": "per-layer table", "per_layer": per_layer}
    return {"id": cid, "title": f"claim {cid}", "statement": f"{cid} holds.", "verdict": verdict,
            "reason_code": code, "statistics": stats, "notes": [], "figures": list(figures),
            "data": [], "published": [], "inputs": {}, "reason": "", "expected": False,
            "test": test, "nodeid": f"claims/test_x.py::{test}", "run": run}


def _run_dir(root: Path, name: str, records: list[dict], *, n_params: int | None = None,
             run: dict = NOW, card: dict | None = None, subject_id: str | None = None) -> Path:
    """A run directory as the plugin leaves it: evidence.json, evidence.md, the figures."""
    subject_id = subject_id or name
    d = root / name
    subject = {"id": subject_id, "random_init": subject_id.endswith(":random"),
               "weight_hash": "ab" * 32}
    if n_params is not None:
        subject["n_params"] = n_params
    if card is not None:
        subject["model_card"] = card
    doc = {"schema_version": SCHEMA_VERSION, "subject_id": subject_id,
           "provenance": {"git": {"commit": run["commit"]}, "device": "cpu", "dtype": "float32",
                          "seed": 0, "subject": subject},
           "run": run, "claims": records, "timings": None}
    d.mkdir(parents=True)
    for r in records:
        for f in r["figures"]:
            (d / f).parent.mkdir(exist_ok=True)
            (d / f).write_bytes(_png() if f.endswith(".png") else b"<p>tokens</p>")
    (d / "evidence.json").write_text(json.dumps(doc, indent=1), encoding="utf-8")
    (d / "evidence.md").write_text(render_markdown(doc), encoding="utf-8")
    return d


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    path = tmp_path / "claims.yaml"
    path.write_text(REGISTRY, encoding="utf-8")
    return Registry.load(path)


LAYERS = [{"layer": 0, "overlap_any": 0.5, "jaccard": 0.05, "share_dtr_1": 0.1},
          {"layer": 1, "overlap_any": 0.2, "jaccard": 0.02, "share_dtr_1": 0.05}]


def _evidence(root: Path) -> Path:
    """Three models (one unsized), two twins, one run variant and a directory with no records."""
    ev = root / "evidence"
    _run_dir(ev, "big", [_rec("N1", "test_n"), _rec("H1", "test_h[b]"), _rec("H1", "test_h[a]"),
                         _rec("W2", "test_w", per_layer=LAYERS, figures=("figures/W2_by_layer.png",)),
                         _rec("S1", "test_s", "inconclusive", 0.55, code="seed-unstable", run=OLD)],
             n_params=5000)
    _run_dir(ev, "big:random", [_rec("H1", "test_h[a]", "refuted", 0.1), _rec("R2", "test_r")],
             n_params=5000)
    _run_dir(ev, "ladder:tiny", [_rec("H10", "test_h10", figures=("figures/H10_view.html",)),
                                 _rec("W2", "test_w", per_layer=LAYERS[:1])],
             card={"n_params": 300})
    _run_dir(ev, "ladder:tiny:random", [_rec("H10", "test_h10", method="exact")], n_params=300)
    _run_dir(ev, "ladder:tiny@float64-seed1", [_rec("H2", "test_h2")], n_params=300,
             subject_id="ladder:tiny")
    _run_dir(ev, "custom", [_rec("H1", "test_h[a]")])
    _run_dir(ev, "empty", [])
    (ev / "not-a-run").mkdir()  # holds no report: skipped
    return ev


ORDER = ["ladder:tiny", "ladder:tiny:random", "ladder:tiny@float64-seed1", "big", "big:random",
         "custom", "empty"]
ROWS = [("H1", "test_h[a]"), ("H1", "test_h[b]"), ("H2", "test_h2"), ("H10", "test_h10"),
        ("W2", "test_w"), ("S1", "test_s"), ("R2", "test_r"), ("N1", "test_n")]


def _table_rows(md: str) -> list[list[str]]:
    lines = md.split("\n## ")[0].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| claim |"))
    return [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines[start:]
            if line.startswith("|")]


def test_subjects_by_size_twin_beside_model(tmp_path: Path) -> None:
    subjects = order_subjects(load_subjects(_evidence(tmp_path)))
    assert [s.name for s in subjects] == ORDER
    assert [s.n_params for s in subjects] == [300, 300, 300, 5000, 5000, None, None]


def test_matrix_rows_columns_cells(tmp_path: Path, registry: Registry) -> None:
    ev = _evidence(tmp_path)
    written = write_report(ev, registry)
    assert {ev / MATRIX_MD, ev / INDEX_HTML, ev / "big" / "evidence.html"} <= set(written)
    table = _table_rows((ev / MATRIX_MD).read_text(encoding="utf-8"))
    assert table[0] == ["claim", "test", *ORDER[:-1]]  # the run with no records is no column
    assert [tuple(r[:2]) for r in table[2:]] == ROWS
    cells = {(r[0], r[1]): dict(zip(ORDER, r[2:], strict=False)) for r in table[2:]}
    assert cells[("H1", "test_h[a]")]["big:random"] == (
        "[refuted](./big:random/evidence.html#H1-test_h-a)<br>r = 0.1 [0, 0.2]")
    assert cells[("H10", "test_h10")]["ladder:tiny:random"].endswith("<br>r = 0.8 exact")
    assert cells[("H1", "test_h[b]")]["big:random"] == "—"
    s1 = cells[("S1", "test_s")]["big"]  # inconclusive with its code; kept from an earlier run
    assert s1.startswith("[inconclusive/seed-unstable](./big/evidence.html#S1-test_s) "
                         "(earlier run 0dd0dd11)")
    assert "earlier run" not in cells[("N1", "test_n")]["big"]
    md = (ev / MATRIX_MD).read_text(encoding="utf-8")
    assert re.search(r"\| \[empty\]\(\./empty/evidence.html\) \| empty \| model \| \? \|.*\| 0 \| "
                     "no claim records yet", md)
    assert "| [big](./big/evidence.html) | big | model | 5,000 |" in md and "1 of 5 records from earlier runs" in md

    index = (ev / INDEX_HTML).read_text(encoding="utf-8")
    assert re.findall(r'data-claim="([^"]+)" data-test="([^"]+)"', index) == ROWS
    assert index.index(">big<") < index.index(">big:random<") < index.index(">custom<")
    assert re.search(r'<td class="v-inconclusive earlier"[^>]*><a href="./big/evidence.html#S1-test_s">'
                     r"inconclusive/seed-unstable</a><span class=\"mark\">earlier run 0dd0dd11", index)


def test_links_resolve_to_anchors(tmp_path: Path, registry: Registry) -> None:
    ev = _evidence(tmp_path)
    write_report(ev, registry)
    md_links = re.findall(r"\]\((\./[^)]+)\)", (ev / MATRIX_MD).read_text(encoding="utf-8"))
    html_links = re.findall(r'href="(\./[^"]+)"', (ev / INDEX_HTML).read_text(encoding="utf-8"))
    cells = [link for link in md_links if "#" in link]  # the subjects table links to pages
    assert len(cells) == 12 and {link for link in html_links if "#" in link} == set(cells)
    assert {link for link in md_links if "#" not in link} == {f"./{n}/evidence.html" for n in ORDER}
    for link in md_links + html_links:
        path, _, anchor = link.partition("#")
        target = ev / unquote(path)
        assert target.is_file(), link
        if anchor:
            assert f'id="{anchor}"' in target.read_text(encoding="utf-8"), link


def test_subject_page_is_self_contained(tmp_path: Path, registry: Registry) -> None:
    ev = _evidence(tmp_path)
    write_report(ev, registry)
    page = (ev / "big" / "evidence.html").read_text(encoding="utf-8")
    assert "<script" not in page and "<link" not in page and "@import" not in page
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert len(srcs) == 1 and srcs[0].startswith("data:image/png;base64,")
    records = json.loads((ev / "big" / "evidence.json").read_text())["claims"]
    for r in records:  # a section per record, and the summary row linking to it
        anchor = claim_anchor(r)
        assert f'<h2 id="{anchor}">{r["id"]}: claim {r["id"]} ({r["verdict"]})</h2>' in page
        assert f'<td><a href="#{anchor}">{r["id"]}</a></td>' in page
    assert "(earlier run, 0dd0dd11)" in page and "(kept from an earlier run)" in page  # as evidence.md
    assert '<a href="../index.html">' in page
    tiny = (ev / "ladder:tiny" / "evidence.html").read_text(encoding="utf-8")
    assert '<a href="figures/H10_view.html">' in tiny  # attachments stay links


def test_trend_figure_and_published_table_come_from_the_registry(tmp_path: Path,
                                                                 registry: Registry) -> None:
    ev = _evidence(tmp_path)
    write_report(ev, registry)
    figure = ev / "trends" / "W_agreement_by_layer.png"
    assert figure.read_bytes().startswith(b"\x89PNG")
    md = (ev / MATRIX_MD).read_text(encoding="utf-8")
    assert "![family W agreement by layer](trends/W_agreement_by_layer.png)" in md
    assert ("| W2 | mean Jaccard | solu-2l L1 | 0.0162 | a test table | big 0.02 |") in md
    assert ("| W2 | neurons with overlap > 0 | solu-2l L0 | 0.3981 | a test table | "
            "ladder:tiny 0.5; big 0.5 |") in md
    assert "data:image/png;base64," in (ev / INDEX_HTML).read_text(encoding="utf-8")


def test_the_project_registry_gives_every_panel_its_published_points() -> None:
    """The figure's panels name the registry's quantities verbatim: a reworded quantity (or a
    subject without its layer) would silently drop the thesis's points from the figure."""
    registry = Registry.load(Path(__file__).parents[3] / "fixtures" / "claims.yaml")
    points = published_points(registry)
    assert {p.quantity for p in points} == {panel.quantity for panel in PANELS}
    listed = [(c.id, p.quantity, p.subject) for c in registry.claims.values() if c.family == "W"
              for p in c.published if p.quantity in {panel.quantity for panel in PANELS}]
    assert sum(len(p.claims) for p in points) == len(listed)  # none dropped, duplicates merged


@pytest.mark.parametrize("breakage, message", [
    (lambda d: (d / "evidence.json").write_text("{not json"), "not valid JSON"),
    (lambda d: (d / "evidence.json").write_text('{"schema_version": "0.9"}'), "schema_version '0.9'"),
    (lambda d: (d / "evidence.json").write_text(
        json.dumps({"schema_version": SCHEMA_VERSION, "subject_id": "big", "claims": [{}]})),
     "claim record 0 has no id"),
    (lambda d: (d / "evidence.json").unlink(), "missing, although"),
    (lambda d: (d / "evidence.md").unlink(), "cannot read the subject's Markdown report"),
    (lambda d: (d / "figures" / "W2_by_layer.png").unlink(), "shows the figure figures/W2_by_layer.png"),
], ids=["bad-json", "schema", "no-id", "no-json", "no-md", "no-figure"])
def test_bad_or_missing_evidence_is_a_clear_error(tmp_path: Path, registry: Registry, breakage,
                                                  message: str) -> None:
    ev = _evidence(tmp_path)
    breakage(ev / "big")
    with pytest.raises(ReportError, match=re.escape(message)) as info:
        write_report(ev, registry)
    assert str(ev / "big") in str(info.value)  # names the file at fault


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "claims.yaml").write_text(REGISTRY, encoding="utf-8")
    args = ["--registry", str(tmp_path / "claims.yaml"), "--evidence-dir"]
    assert main([*args, str(tmp_path / "nowhere")]) == 1
    assert f"error: {tmp_path / 'nowhere'}: no such evidence directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([*args, str(tmp_path / "empty")]) == 1
    assert "holds no */evidence.json" in capsys.readouterr().err
    ev = _evidence(tmp_path)
    assert main([*args, str(ev)]) == 0
    assert str(ev / INDEX_HTML) in capsys.readouterr().out.splitlines()


# --- the plugin writes it at the end of a session -----------------------------------------

CLAIM = """
import pytest
from harness.statistics.stats import Estimate

@pytest.mark.claim(id="H1")
def test_big(evidence):
    evidence.record("r", Estimate(0.8, 0.7, 0.9, 50, "bootstrap-percentile"), description="r")
    evidence.judge()
"""


def test_plugin_refreshes_the_report_and_fails_loudly_when_it_cannot(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\n")
    (pytester.path / "fixtures").mkdir()
    (pytester.path / "fixtures" / "claims.yaml").write_text(H1_REGISTRY, encoding="utf-8")
    pytester.makeconftest('pytest_plugins = ["harness.evidence.plugin"]\n')
    pytester.makepyfile(test_claims=CLAIM)
    ev = pytester.path / "ev"
    quiet = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest", f"--evidence-dir={ev}")
    result = pytester.runpytest(*quiet)
    result.assert_outcomes(passed=1)
    assert result.ret == 0
    assert 'href="./smollm2-135m/evidence.html#H1-test_big"' in (ev / INDEX_HTML).read_text()
    assert (ev / "smollm2-135m" / "evidence.html").is_file()
    result.stdout.fnmatch_lines([f"cross-subject report: {ev / INDEX_HTML}*"])

    broken = ev / "other"  # another subject's report without its evidence.json
    broken.mkdir()
    (broken / "evidence.md").write_text("# Evidence: other\n")
    result = pytester.runpytest(*quiet)
    result.assert_outcomes(passed=1)  # the claim's own outcome stands
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*H1*test_big*supported*", "*evidence report FAILED*",
                                 f"*the cross-subject report was not written: {broken / 'evidence.json'}: "
                                 "missing*"])


# --- what a reader sees, in a real browser ------------------------------------------------

REQUIRE_BROWSER = "INTERP_CLAIMS_REQUIRE_BROWSER"
"""Set to 1 by .ci/run: there a missing Chromium fails this test instead of skipping it."""


@pytest.fixture
def chromium() -> str:
    binary = find_chromium()
    if binary is None:
        if os.environ.get(REQUIRE_BROWSER) == "1":
            pytest.fail(f"{REQUIRE_BROWSER}=1 but no Chromium on PATH: install it "
                        "(apt-get install chromium); .ci/run does")
        pytest.skip("Chromium is not installed (apt-get install chromium): the report's browser "
                    "test needs a real browser")
    return binary


@pytest.mark.browser
def test_a_reader_sees_every_row_figure_and_link(tmp_path: Path, registry: Registry,
                                                 chromium: str) -> None:
    ev = _evidence(tmp_path)
    write_report(ev, registry)
    visits = {}
    with Chromium(chromium, tmp_path / "profile") as browser:
        pending = [(ev / INDEX_HTML).as_uri()]
        while pending:  # the index, then every page it (or a page it opened) links to
            url = pending.pop()
            visit = visits[url] = browser.visit(url)
            assert visit.errors == [], f"{url}: {visit.errors}"
            for link in visit.seen["links"]:
                page = link.partition("#")[0]
                if page.endswith(("/evidence.html", f"/{INDEX_HTML}")) and page not in visits \
                        and page not in pending:
                    pending.append(page)

    index = visits[(ev / INDEX_HTML).as_uri()].seen
    assert [tuple(r[:2]) for r in index["rows"]] == ROWS
    assert {r[2] for r in index["rows"]} == {len(ORDER) - 1}  # a cell per subject with records
    assert "no claim records yet" in index["text"]
    pages = {url: v for url, v in visits.items() if url.endswith("/evidence.html")}
    assert len(pages) == len(ORDER)
    for url, visit in pages.items():
        records = json.loads((Path(unquote(urlparse(url).path)).parent / "evidence.json").read_text())
        assert visit.seen["headings"] == [claim_anchor(r) for r in records["claims"]], url
    for url, visit in visits.items():
        seen = visit.seen
        assert seen["images"] or url.endswith("/evidence.html"), f"{url}: no image"
        for img in seen["images"]:
            assert img["complete"] and img["naturalWidth"] > 0, f"{url}: undecoded image {img}"
            assert img["src"].startswith("data:image/png;base64,"), f"{url}: not inlined: {img}"
        for link in seen["links"]:
            parsed = urlparse(link)
            assert parsed.scheme == "file", f"{url}: a link leaves the disk: {link}"
            target = Path(unquote(parsed.path))
            assert target.is_file(), f"{url}: broken link {link}"
            if parsed.fragment:
                ids = visits[parsed._replace(fragment="").geturl()].seen["ids"]
                assert parsed.fragment in ids, f"{url}: no anchor for {link}"


def test_two_runs_rewriting_the_trend_figure_at_once_both_succeed(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs sharing an evidence directory (two subjects at a time) both rewrite the trend
    figure at their end. Here a second writer runs to completion between the first's savefig
    and its os.replace: with one fixed temporary name the second consumed the first's file and
    the first's os.replace raised FileNotFoundError."""
    series = [trends.Series("ladder:a", 0, False, {0: {"overlap_any": 0.4, "jaccard": 0.02}})]
    path = tmp_path / "trends" / trends.FIGURE
    real_replace = os.replace
    interleaved = []

    def replace_after_another_writer(src, dst):
        if not interleaved:
            interleaved.append(src)
            monkeypatch.setattr(os, "replace", real_replace)
            trends.agreement_figure(series, [], path)  # the other run, start to finish
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_after_another_writer)
    trends.agreement_figure(series, [], path)
    assert interleaved, "the figure was not written through os.replace"
    assert path.read_bytes().startswith(b"\x89PNG")
    assert [p.name for p in path.parent.iterdir()] == [trends.FIGURE]  # no temporary file left
