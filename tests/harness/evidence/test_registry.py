"""The claim registry: the real fixtures/claims.yaml, and every way a registry can be wrong."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from harness.evidence.registry import Claim, Decision, Expected, Published, Registry, RegistryError

GOOD = """\
schema_version: 1
claims:
  H1:
    family: H
    title: an identity
    source: a paper, section 2
    statement: >
      The two things
      are equal.
    definition: max |a - b|
    decision:
      statistic: max_err
      direction: below
      threshold: {float32: 1.0e-4, float64: 1.0e-10}
      against: {none: a test claim}
    published:
      - {quantity: max err, value: 0.0, subject: gpt2-small L8, provenance: paper table 1}
    expected: {smollm2-135m: refuted, 'smollm2-135m[scale-free]': inconclusive/interval}
  W1:
    family: W
    title: a range
    source: a thesis, chapter 3
    statement: near zero
    definition: mean r
    decision: {statistic: mean_r, direction: between, bounds: [-0.1, 0.1], against: {none: a test claim}}
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "claims.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def real(pytestconfig: pytest.Config) -> Registry:
    return Registry.load(pytestconfig.rootpath / pytestconfig.getini("claims_registry"))


def test_real_registry_holds_the_hook_math_claims(real: Registry) -> None:
    assert {"H1", "H2", "H3", "H4", "H5"} <= set(real.claims)
    assert real.schema_version == 1
    for cid, claim in real.claims.items():
        assert isinstance(claim, Claim) and claim.id == cid and cid.startswith(claim.family)
        assert isinstance(claim.decision, Decision)
        assert claim.statement and claim.definition and claim.source
        if claim.decision.direction == "between":
            low, high = claim.decision.bounds
            assert low < high
        else:  # every dtype the suite runs in has a threshold
            for dtype in ("float32", "float64", "bfloat16", "float16"):
                assert isinstance(claim.decision.threshold_for(dtype), float)


def test_real_registry_published_numbers_carry_provenance(real: Registry) -> None:
    for cid in ("H1", "H2", "H5"):
        assert real[cid].published, f"{cid} lists no published numbers"
    for claim in real.claims.values():
        for p in claim.published:
            assert isinstance(p, Published)
            assert isinstance(p.value, (int, float))
            assert p.quantity.strip() and p.subject.strip() and p.provenance.strip()


def test_real_registry_expected_verdicts_are_verdicts(real: Registry) -> None:
    for claim in real.claims.values():
        for e in claim.expected.values():
            assert e.verdict in {"supported", "refuted", "inconclusive", "unavailable"}
            assert (e.code is not None) == (e.verdict == "inconclusive")


def test_good_registry_loads_into_frozen_objects(tmp_path: Path) -> None:
    reg = Registry.load(_write(tmp_path, GOOD))
    h1 = reg["H1"]
    assert list(reg.claims) == ["H1", "W1"]
    assert h1.statement == "The two things are equal."  # folded and whitespace-normalised
    assert h1.decision.threshold_for("float64") == 1e-10
    assert h1.published == (Published("max err", 0.0, "gpt2-small L8", "paper table 1"),)
    assert h1.expected_verdict("smollm2-135m") == Expected("refuted")
    assert h1.expected_verdict("gpt2-small") is None
    assert h1.expected_verdict("smollm2-135m", "source-5.0") == Expected("refuted")  # falls back to the subject
    assert h1.expected_verdict("smollm2-135m", "scale-free") == Expected("inconclusive", "interval")
    assert h1.expected_verdict("gpt2-small", "scale-free") is None
    assert reg["W1"].decision.bounds == (-0.1, 0.1)
    with pytest.raises(AttributeError):
        h1.title = "changed"  # type: ignore[misc]
    with pytest.raises(TypeError):
        h1.expected["gpt2-small"] = "supported"  # type: ignore[index]


def test_unknown_id_lists_the_known_ids(tmp_path: Path) -> None:
    reg = Registry.load(_write(tmp_path, GOOD))
    assert "H9" not in reg
    with pytest.raises(RegistryError, match=r"unknown claim id 'H9' .*knows H1, W1"):
        reg["H9"]


def test_threshold_for_a_missing_dtype_raises(tmp_path: Path) -> None:
    reg = Registry.load(_write(tmp_path, GOOD))
    with pytest.raises(RegistryError, match=r"no threshold for dtype 'bfloat16'.*float32"):
        reg["H1"].decision.threshold_for("bfloat16")
    with pytest.raises(RegistryError, match="bounds, not a threshold"):
        reg["W1"].decision.threshold_for("float32")


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        pytest.param("    title: an identity\n", "", r"missing keys \['title'\]", id="missing-key"),
        pytest.param("    title: an identity\n", "    title: x\n    tolerance: 3\n",
                     r"unknown keys \['tolerance'\]", id="unknown-key"),
        pytest.param("    family: H\n", "    family: W\n", "family 'W' does not match",
                     id="id-family-mismatch"),
        pytest.param("    family: H\n", "    family: Q\n", "family 'Q' does not match",
                     id="unknown-family"),
        pytest.param("  W1:\n", "  w1:\n", "not of the form", id="bad-id"),
        pytest.param("{smollm2-135m: refuted,", "{smollm2-135m: wrong,",
                     "smollm2-135m: expected verdict 'wrong'", id="bad-verdict"),
        pytest.param("{smollm2-135m: refuted,", "{smollm2-135m: refuted/interval,",
                     "only inconclusive takes a /CODE", id="code-on-refuted"),
        pytest.param("inconclusive/interval}", "inconclusive/because}",
                     "inconclusive/CODE with CODE one of", id="unknown-code"),
        pytest.param("direction: below", "direction: sideways",
                     "claim H1: direction must be one of",
                     id="bad-direction"),
        pytest.param(", bounds: [-0.1, 0.1]", "", "claim W1: direction 'between' needs bounds",
                     id="between-no-bounds"),
        pytest.param("bounds: [-0.1, 0.1]", "bounds: [0.1, -0.1]", "low < high",
                     id="between-inverted-bounds"),
        pytest.param("      threshold: {float32: 1.0e-4, float64: 1.0e-10}\n", "",
                     "'below' needs a threshold", id="below-no-threshold"),
        pytest.param("direction: below", "direction: below\n      tolerance: 1",
                     "unexpected keyword argument 'tolerance'", id="unknown-decision-key"),
        pytest.param("provenance: paper table 1", "source: paper table 1",
                     "unexpected keyword argument 'source'", id="published-without-provenance"),
        pytest.param("schema_version: 1", "schema_version: 2", "schema_version 2", id="schema"),
        pytest.param("schema_version: 1\n", "schema_version: 1\nextra: 1\n",
                     "exactly schema_version and claims", id="top-level-key"),
        pytest.param("  W1:\n", "  H1:\n", "found duplicate key 'H1' at line 19, column 3",
                     id="duplicate-id"),
        pytest.param("    title: a range\n", "    title: a range\n    title: again\n",
                     "found duplicate key 'title'", id="duplicate-field"),
        pytest.param("    statement: near zero\n", "    statement: [near zero\n",
                     "not valid YAML", id="yaml-syntax"),
    ],
)
def test_malformed_registry_raises(tmp_path: Path, old: str, new: str, message: str) -> None:
    assert old in GOOD, "the test's edit must apply"
    with pytest.raises(RegistryError, match=message):
        Registry.load(_write(tmp_path, GOOD.replace(old, new, 1)))


@pytest.mark.parametrize("claims", ["", "[H1, H2]", "H1"])
def test_claims_must_be_a_mapping(tmp_path: Path, claims: str) -> None:
    with pytest.raises(RegistryError, match="claims must be a mapping"):
        Registry.load(_write(tmp_path, f"schema_version: 1\nclaims: {claims}\n"))


def test_missing_registry_file_raises(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="does not exist"):
        Registry.load(tmp_path / "nope.yaml")


def test_yaml_merge_keys_may_be_overridden(tmp_path: Path) -> None:
    """Duplicate detection must not reject a '<<' merge whose key is then overridden."""
    text = GOOD.replace(
        "    decision: {statistic: mean_r, direction: between, bounds: [-0.1, 0.1], against: {none: a test claim}}",
        "    decision:\n      <<: {statistic: other, direction: between, bounds: [-0.1, 0.1]}\n"
        "      statistic: mean_r\n      against: {none: a test claim}",
    )
    assert Registry.load(_write(tmp_path, text))["W1"].decision.statistic == "mean_r"


def test_published_numbers_live_only_in_the_registry(real: Registry) -> None:
    """No claim module spells a published number (``published = 0.9112`` and the notes'
    "source: 12.89/22.60/..." did): they are read through Claim.published_value(s)."""
    root = Path(__file__).resolve().parents[3] / "claims"
    sources = {p.name: p.read_text(encoding="utf-8") for p in root.glob("*.py")}
    found = []
    for claim in real.claims.values():
        for p in claim.published:
            if len(f"{p.value:g}".replace("-", "").replace(".", "").lstrip("0")) < 3:
                continue  # 0, 5, 0.25, 0.3: too common to attribute to a source
            spellings = {repr(float(p.value)), f"{p.value:g}", f"{100 * p.value:.2f}".rstrip("0")}
            for name, text in sources.items():
                for s in spellings:
                    if re.search(rf"(?<![\w.]){re.escape(s)}(?![\w])", text):
                        found.append((claim.id, p.quantity, s, name))
    assert not found, found


def test_published_value_lookup(real: Registry) -> None:
    r2 = real["R2"]
    assert r2.published_value("reconstruction accuracy").value == 0.9112
    with pytest.raises(RegistryError, match="no published quantity 'accuracy'"):
        r2.published_value("accuracy")
    with pytest.raises(RegistryError, match="4 published values"):
        real["S3"].published_value("most-frequent feature coverage")
    assert [p.value for p in real["S3"].published_values("most-frequent feature coverage")] == [
        0.514, 0.457, 0.4, 0.3]
