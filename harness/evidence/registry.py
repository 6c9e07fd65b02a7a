"""The claim registry: ``fixtures/claims.yaml`` loaded once into frozen, validated objects.

Published numbers, thresholds and expected verdicts live here as data with provenance, never in
test bodies. Every lookup of a missing key raises (no silent defaults).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import yaml

SCHEMA_VERSION = 1
VERDICTS = ("supported", "refuted", "inconclusive", "unavailable")
DIRECTIONS = ("above", "below", "between")
INCONCLUSIVE_CODES = {
    "interval": "the headline's interval straddles the threshold",
    "seed-unstable": "the verdict differs between SAE training seeds (harness.statistics.seed_spread)",
    "too-few-texts": "a category has fewer texts than the claim needs",
    "missing-category": "the texts lack a category the claim is about",
    "too-few-units": "too few features, neurons or tokens qualify to compute the statistic",
    "no-specialists": "no specialist feature at any depth: nothing to inspect",
    "below-detection-bound": "the measuring instrument is too weak to decide (e.g. an SAE "
                             "below the detector's bound)",
    "not-applicable": "the claim's definition cannot apply to this subject (e.g. its relative "
                      "depths collapse onto too few layers)",
    "null": "the headline passes its threshold but not its null: the interval does not lie "
            "beyond the null's range (or, for a 'between' claim, is distinguishable from it)",
}
"""Why a claim ended inconclusive: every ``ClaimInconclusive`` carries one of these codes, and
an expected inconclusive in the registry names the code it expects (``inconclusive/interval``),
so an early exit does not satisfy an expected interval."""
ID_PATTERN = re.compile(r"^[A-Z][0-9]+$")
FAMILIES = {
    "H": "hook math",
    "W": "weight-decoded tokens vs maximally activating inputs",
    "S": "SAE category specialists",
    "R": "sparse autoencoders on MLP activations",
    "N": "one neuron, clamped and projected",
}


class RegistryError(ValueError):
    """The registry file is malformed, or a lookup names something it does not hold."""


@dataclass(frozen=True)
class Published:
    """A number a source published, with where it comes from."""

    quantity: str
    """What was measured, in the source's words."""
    value: float
    """The number as published."""
    subject: str
    """Model and site it was measured on (e.g. 'gpt2-small L8 n481')."""
    provenance: str
    """Where exactly it is published (file, section, run)."""


@dataclass(frozen=True)
class Decision:
    """How a claim's headline statistic is compared with its threshold.

    ``above``: supported iff the whole interval lies above ``threshold``; refuted iff it lies
    entirely at or below; otherwise inconclusive. ``below`` mirrors it. ``between``: supported
    iff the interval lies inside ``bounds``, refuted iff it lies entirely outside.
    """

    statistic: str
    """Name of the statistic the verdict rests on (as recorded through the evidence fixture)."""
    direction: Literal["above", "below", "between"]
    """Which side of the threshold the claim asserts."""
    threshold: Mapping[str, float] | float | None = None
    """One number, or one per dtype (numerical identities need a dtype-aware tolerance)."""
    bounds: tuple[float, float] | None = None
    """(low, high) for ``between``."""
    rationale: str = ""
    """Why this threshold: what the claim's words ('far from 1', 'well') are taken to mean."""
    against: Mapping[str, str] | None = None
    """The null or control the claim is judged against besides its threshold, exactly one of:
    ``{from: headline}`` (the null recorded with the headline statistic),
    ``{statistic: NAME}`` (another recorded statistic is the null), or
    ``{none: WHY}`` (why no null applies, e.g. an identity, or a headline that is already an
    excess over its null). A threshold-supported claim whose interval does not lie beyond its
    null's range (for 'between': overlaps it) ends inconclusive with code 'null'."""

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise RegistryError(f"direction must be one of {DIRECTIONS}, not {self.direction!r}")
        if self.direction == "between":
            if self.bounds is None or len(self.bounds) != 2 or self.bounds[0] >= self.bounds[1]:
                raise RegistryError("direction 'between' needs bounds [low, high] with low < high")
        elif self.threshold is None:
            raise RegistryError(f"direction {self.direction!r} needs a threshold")
        a = self.against
        if a is None:  # built in code (tests); a registry entry must state it (_claim_from)
            return
        if not isinstance(a, Mapping) or len(a) != 1 or next(iter(a)) not in ("from", "statistic", "none") \
                or not str(next(iter(a.values()))).strip() or a.get("from", "headline") != "headline":
            raise RegistryError(
                "decision needs against: exactly one of {from: headline}, {statistic: NAME} or "
                f"{{none: WHY}} (the null or control the claim is judged against), got {a!r}")

    def threshold_for(self, dtype: str) -> float:
        """The threshold in force for ``dtype``; raises when a per-dtype table lacks it."""
        if isinstance(self.threshold, Mapping):
            if dtype not in self.threshold:
                raise RegistryError(
                    f"no threshold for dtype {dtype!r} (have {sorted(self.threshold)})"
                )
            return float(self.threshold[dtype])
        if self.threshold is None:
            raise RegistryError("this decision has bounds, not a threshold")
        return float(self.threshold)


@dataclass(frozen=True)
class Expected:
    """A verdict measured and reviewed for one subject (and test variant)."""

    verdict: str
    code: str | None = None
    """For 'inconclusive': the INCONCLUSIVE_CODES key it must end with; None otherwise."""
    why: str = field(default="", compare=False)
    """Why this verdict is a result, not a defect (what was measured, when); goes into
    claims/QUARANTINE.md, which is generated from the registry (harness.evidence.quarantine)."""
    revisit: str = field(default="", compare=False)
    """When to measure again (what change would make the record stale)."""

    @classmethod
    def parse(cls, raw: Any, where: str) -> Expected:
        """``VERDICT``, ``inconclusive/CODE``, or a mapping {verdict, why[, revisit]} with the
        verdict in one of those forms."""
        if isinstance(raw, Mapping):
            unknown = set(raw) - {"verdict", "why", "revisit"}
            if unknown or "verdict" not in raw or not str(raw.get("why", "")).strip():
                raise RegistryError(f"{where}: an expectation mapping holds verdict and why "
                                    f"(and optionally revisit); got {sorted(raw)}")
            base = cls.parse(raw["verdict"], where)
            return cls(base.verdict, base.code, " ".join(str(raw["why"]).split()),
                       " ".join(str(raw.get("revisit", "")).split()))
        text = raw
        verdict, _, code = str(text).partition("/")
        if verdict not in VERDICTS:
            raise RegistryError(f"{where}: expected verdict {text!r}: {verdict!r} not in {VERDICTS}")
        if verdict == "inconclusive":
            if code not in INCONCLUSIVE_CODES:
                raise RegistryError(
                    f"{where}: expected {text!r}: an expected inconclusive names its reason, "
                    f"inconclusive/CODE with CODE one of {sorted(INCONCLUSIVE_CODES)}")
            return cls(verdict, code)
        if code:
            raise RegistryError(f"{where}: expected {text!r}: only inconclusive takes a /CODE")
        return cls(verdict)

    def __str__(self) -> str:
        return f"{self.verdict}/{self.code}" if self.code else self.verdict


@dataclass(frozen=True)
class Claim:
    """One claim of CLAIMS.md."""

    id: str
    family: str
    title: str
    source: str
    statement: str
    definition: str
    decision: Decision
    published: tuple[Published, ...] = ()
    expected: Mapping[str, Expected] = field(default_factory=lambda: MappingProxyType({}))
    """subject id (or ``subject id[test parameter id]``) -> verdict measured and reviewed for
    it; the plugin turns an expected 'refuted' or 'inconclusive' into a strict xfail."""
    notes: str = ""
    about_training: str = ""
    """Non-empty when the claim is about what training put in the weights (why, in words): its
    evidence then carries the trained-minus-random-twin contrast (harness.evidence.record.
    training_contrast), and the report says "also holds at random init" where it does."""

    def published_values(self, quantity: str) -> tuple[Published, ...]:
        """The published numbers for ``quantity`` (exact text, in registry order): the one way
        a claim test reads a source's number. Raises when the registry holds none."""
        found = tuple(p for p in self.published if p.quantity == quantity)
        if not found:
            raise RegistryError(
                f"claim {self.id}: no published quantity {quantity!r} (the registry has "
                f"{sorted({p.quantity for p in self.published})})")
        return found

    def published_value(self, quantity: str) -> Published:
        """The single published number for ``quantity``; raises unless there is exactly one."""
        found = self.published_values(quantity)
        if len(found) != 1:
            raise RegistryError(f"claim {self.id}: {len(found)} published values for {quantity!r}")
        return found[0]

    def expected_verdict(self, subject_id: str, variant: str | None = None) -> Expected | None:
        """The recorded verdict for ``subject_id``; a parametrized test's variant (its pytest
        parameter id, e.g. ``source-5.0``) may have its own entry ``"SUBJECT[VARIANT]"``,
        which wins over the subject-wide one."""
        if variant is not None and f"{subject_id}[{variant}]" in self.expected:
            return self.expected[f"{subject_id}[{variant}]"]
        return self.expected.get(subject_id)


_CLAIM_KEYS = {"family", "title", "source", "statement", "definition", "decision", "published",
               "expected", "notes", "about_training"}
_REQUIRED = {"family", "title", "source", "statement", "definition", "decision"}


def _claim_from(cid: str, raw: Any, where: str) -> Claim:
    if not ID_PATTERN.match(cid):
        raise RegistryError(f"{where}: claim id {cid!r} is not of the form H1, W2, ...")
    if not isinstance(raw, Mapping):
        raise RegistryError(f"{where}: claim {cid} must be a mapping")
    unknown = set(raw) - _CLAIM_KEYS
    missing = _REQUIRED - set(raw)
    if unknown or missing:
        raise RegistryError(
            f"{where}: claim {cid}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}"
        )
    if raw["family"] not in FAMILIES or not cid.startswith(raw["family"]):
        raise RegistryError(f"{where}: claim {cid}: family {raw['family']!r} does not match")
    try:
        dec = dict(raw["decision"])
        if "bounds" in dec:
            dec["bounds"] = tuple(float(b) for b in dec["bounds"])
        if "against" not in dec:
            raise RegistryError("decision needs against: {from: headline}, {statistic: NAME} or "
                                "{none: WHY} (the null or control the claim is judged against)")
        if isinstance(dec.get("against"), Mapping):
            dec["against"] = MappingProxyType({str(k): " ".join(str(v).split())
                                               for k, v in dec["against"].items()})
        decision = Decision(**dec)
        published = tuple(Published(**p) for p in raw.get("published") or ())
    except (TypeError, RegistryError) as exc:
        raise RegistryError(f"{where}: claim {cid}: {exc}") from None
    expected = {str(k): Expected.parse(v, f"{where}: claim {cid}: {k}")
                for k, v in (raw.get("expected") or {}).items()}
    return Claim(
        id=cid,
        family=raw["family"],
        title=raw["title"],
        source=raw["source"],
        statement=" ".join(str(raw["statement"]).split()),
        definition=" ".join(str(raw["definition"]).split()),
        decision=decision,
        published=published,
        expected=MappingProxyType(expected),
        notes=" ".join(str(raw.get("notes", "")).split()),
        about_training=" ".join(str(raw.get("about_training", "")).split()),
    )


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key repeated within one mapping (``safe_load`` silently keeps
    the last, so a second ``H1:`` entry would replace the first without a word)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # '<<' merges may be overridden
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:  # unhashable key: construct_mapping reports it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                f"found duplicate key {key!r}", key_node.start_mark,
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


@dataclass(frozen=True)
class Registry:
    """All claims, by id."""

    claims: Mapping[str, Claim]
    path: str
    schema_version: int

    def __getitem__(self, cid: str) -> Claim:
        try:
            return self.claims[cid]
        except KeyError:
            raise RegistryError(
                f"unknown claim id {cid!r} (registry {self.path} knows {', '.join(self.claims)})"
            ) from None

    def __contains__(self, cid: object) -> bool:
        return cid in self.claims

    @classmethod
    def load(cls, path: str | Path) -> Registry:
        path = Path(path)
        try:
            raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
        except FileNotFoundError:
            raise RegistryError(f"claim registry {path} does not exist") from None
        except yaml.YAMLError as exc:  # one line: what is wrong and where
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or exc
            raise RegistryError(f"claim registry {path} is not valid YAML: {problem}{at}") from None
        if not isinstance(raw, Mapping) or set(raw) != {"schema_version", "claims"}:
            raise RegistryError(f"{path}: top level must hold exactly schema_version and claims")
        if raw["schema_version"] != SCHEMA_VERSION:
            raise RegistryError(
                f"{path}: schema_version {raw['schema_version']!r}, this code reads {SCHEMA_VERSION}"
            )
        if not isinstance(raw["claims"], Mapping):
            raise RegistryError(f"{path}: claims must be a mapping from claim id to claim")
        claims = {str(cid): _claim_from(str(cid), c, str(path)) for cid, c in raw["claims"].items()}
        return cls(claims=MappingProxyType(claims), path=str(path), schema_version=SCHEMA_VERSION)
