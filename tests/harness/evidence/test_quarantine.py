"""claims/QUARANTINE.md and the registry agree by construction: the claim tables are generated
from fixtures/claims.yaml and fixtures/seed_spread.yaml, and the registry agrees with the
spread (a seed-unstable claim test is recorded as such)."""

from __future__ import annotations

from harness.evidence.quarantine import (
    QUARANTINE,
    REGISTRY,
    SPREAD_PATH,
    claims_section,
    inconsistencies,
    main,
    render,
)
from harness.evidence.registry import Registry
from harness.statistics.seed_spread import SeedSpread, load


def test_quarantine_md_is_generated_from_the_registry() -> None:
    assert main(["--check"]) == 0, "run: python -m harness.evidence.quarantine"


def test_every_non_supported_expectation_has_a_row_with_its_why() -> None:
    registry = Registry.load(REGISTRY)
    section = claims_section(registry, load(SPREAD_PATH))
    for claim in registry.claims.values():
        for key, e in claim.expected.items():
            if e.verdict != "supported":
                assert f"**{e}**" in section and e.why[:40] in section, (claim.id, key)
    assert render(QUARANTINE.read_text(), section) == QUARANTINE.read_text()


def test_registry_and_seed_spread_disagreements_are_found() -> None:
    registry = Registry.load(REGISTRY)
    flip = SeedSpread(key="R2", statistic="fve", seeds=(0, 1), verdicts=("refuted", "supported"),
                      estimates=(0.6, 0.95))
    stable = SeedSpread(key="R4", statistic="s", seeds=(0, 1), verdicts=("supported", "supported"),
                        estimates=(0.1, 0.1))
    calm = SeedSpread(key="S2[source-5.0]", statistic="s", seeds=(0, 1), verdicts=("inconclusive",) * 2,
                      estimates=(0.1, 0.1))
    problems = inconsistencies(registry, {"smollm2-135m": {"R2": flip, "R4": stable, "S2[source-5.0]": calm}})
    assert len(problems) == 3
    assert "record the seed-0 run's reason code" in problems[2]
    assert "verdicts differ between seeds (refuted, supported) but the registry records refuted" in problems[0]
    assert "every seed gave supported, the registry records refuted" in problems[1]
    assert inconsistencies(registry, load(SPREAD_PATH)) == []
