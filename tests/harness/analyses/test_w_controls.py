"""Family W's positive control end to end: on the planted subject (neurons wired to tokens)
the W1 claim tests must pass, through the real plugin, fixtures and evidence report.

Runs in an in-process pytest session (pytester) with this session's cache: the planted
subject's corpus and harvest are content-addressed, so a warm run reuses them (a child
process cost ~10 s of imports on top)."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_w1_passes_on_the_planted_control(heavy_imports, pytester: pytest.Pytester, run_state):
    evidence = pytester.path / "evidence"
    result = pytester.runpytest(
        str(ROOT / "claims" / "test_weight_tokens.py"), f"--rootdir={ROOT}", "-c", str(ROOT / "pyproject.toml"),
        "-k", "W1 or agreement_beats", "--subject", "planted-tokens",
        "--corpus-contexts", "512", "--corpus-context-len", "64",
        "--evidence-dir", str(evidence),
        f"--cache-dir={run_state.cache_dir}",  # pytester points HOME at a temporary directory
        "-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-q",
    )
    assert result.ret == 0, "\n".join(result.outlines[-60:])
    doc = json.loads((evidence / "planted-tokens" / "evidence.json").read_text())
    w1 = [c for c in doc["claims"] if c["id"] == "W1"]
    assert len(w1) == 4 and all(c["verdict"] == "supported" for c in w1)
    # The headline recomputed from the per-neuron file alone, without the model.
    for c in w1:
        [data] = c["data"]
        path = evidence / "planted-tokens" / data["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == data["sha256"]
        excess = np.array([float(r["excess"]) for r in csv.DictReader(path.open())])
        headline = c["statistics"]["excess_over_null"]["estimate"]["value"]
        assert np.nanmean(excess) == pytest.approx(headline, rel=1e-12), c["test"]
    assert doc["provenance"]["subject"]["planted"]  # the wiring is in the evidence
