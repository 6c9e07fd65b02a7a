"""Family W's positive control end to end: on the planted subject (neurons wired to tokens)
the W1 claim tests must pass, through the real plugin, fixtures and evidence report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_w1_passes_on_the_planted_control(tmp_path):
    evidence = tmp_path / "evidence"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "claims/test_weight_tokens.py", "-k", "W1 or agreement_beats",
         "--subject", "planted-tokens", "--corpus-contexts", "512", "--corpus-context-len", "64",
         "--evidence-dir", str(evidence), "--cache-dir", str(tmp_path / "cache"),
         "-p", "no:cacheprovider", "-q"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    doc = json.loads((evidence / "planted-tokens" / "evidence.json").read_text())
    w1 = [c for c in doc["claims"] if c["id"] == "W1"]
    assert len(w1) == 4 and all(c["verdict"] == "supported" for c in w1)
    assert doc["provenance"]["subject"]["planted"]  # the wiring is in the evidence
