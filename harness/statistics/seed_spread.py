"""How far an SAE-based verdict moves when only the SAE training seed changes.

An SAE-based verdict is about SAEs trained by a procedure, not about one bit pattern (the
same procedure on another CPU model gives other bits, which is just another draw; see
:mod:`harness.models.determinism`). ``nox -s "reseed(SUBJECT)"`` (:mod:`harness.statistics.reseed`) trains the
subject's SAEs under K seeds from one corpus pass, runs families S and R once per seed and
writes, per claim test, the verdict and headline estimate of every seed into
``fixtures/seed_spread.yaml``, in the spirit of SAEBench's reseeding check. The plugin reads it:

- a claim whose verdict differs between seeds is *inconclusive (seed-unstable)* whatever this
  run's own seed says: its recorded expectation is inconclusive, never a confident refutation
  or support;
- a claim stable across the seeds keeps its verdict, and the report gives the seed band
  [min, max] of its headline beside this run's estimate.

Keys are ``ID`` or ``ID[variant]`` (the parametrisation id, as in the registry's
``expected``); the file holds one mapping per subject id.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DEFAULT_PATH = Path(__file__).resolve().parents[2] / "fixtures" / "seed_spread.yaml"


VARIED = {
    "sae-seed": "SAE training seed (--sae-seed): families S and R",
    "session-seed": "session seed (--seed: the background corpus sample, the bootstraps' draws): "
                    "families H and W",
}
ROUNDING_ULPS = 8
"""The band's floor, in units of the dtype's machine epsilon times max(1, |estimate|): a
numerical-identity headline (H1's 1e-7) moves by rounding between machines, and a band of
width 0 would call that drift."""


@dataclass(frozen=True)
class SeedSpread:
    """One claim test's verdicts and headline estimates across seeds (SAE training seeds for
    the SAE-based claims, session seeds for the others: ``varied``)."""

    key: str
    statistic: str
    seeds: tuple[int, ...]
    verdicts: tuple[str, ...]
    estimates: tuple[float | None, ...]
    measured: str = ""
    varied: str = "sae-seed"
    dtype: str = "float32"
    """The dtype the seeds were run in; the band applies to runs in that dtype only."""

    def __post_init__(self) -> None:
        if not (len(self.seeds) == len(self.verdicts) == len(self.estimates)) or not self.seeds:
            raise ValueError(f"seed spread {self.key}: seeds, verdicts and estimates must be "
                             f"equally long and non-empty")

    @property
    def stable(self) -> bool:
        """Every seed gave the same verdict."""
        return len(set(self.verdicts)) == 1

    @property
    def band(self) -> tuple[float, float] | None:
        vals = [e for e in self.estimates if e is not None]
        return (min(vals), max(vals)) if vals else None

    def tolerance(self, estimate: Any, dtype: str) -> tuple[float, float] | None:
        """The band a run's headline must fall in: the seeds' [min, max] widened on each side
        by m = max(the seeds' range, this run's own interval half-width, ROUNDING_ULPS x eps).

        With three seeds the range alone would call a fourth draw drift about half the time;
        widening by the range (and never by less than the run's own uncertainty) keeps a
        recorded expectation a statement about the procedure, while a move of more than a
        spread's worth fails the run (``drift``)."""
        band = self.band
        if band is None or dtype != self.dtype:
            return None
        import torch  # eps of the dtype

        value = float(estimate.value)
        half = (float(estimate.ci_high) - float(estimate.ci_low)) / 2
        eps = torch.finfo(getattr(torch, dtype)).eps
        m = max(band[1] - band[0], half, ROUNDING_ULPS * eps * max(1.0, abs(value)))
        return band[0] - m, band[1] + m

    def drift(self, estimate: Any, dtype: str) -> float:
        """How far ``estimate.value`` lies outside :meth:`tolerance` (0 inside or when no band
        applies; signed: negative below, positive above)."""
        tol = self.tolerance(estimate, dtype)
        if tol is None:
            return 0.0
        value = float(estimate.value)
        return value - tol[1] if value > tol[1] else value - tol[0] if value < tol[0] else 0.0

    def describe(self) -> str:
        per = ", ".join(f"seed {s}: {v}" + (f" ({e:.4g})" if e is not None else "")
                        for s, v, e in zip(self.seeds, self.verdicts, self.estimates, strict=True))
        what = "SAE training seeds" if self.varied == "sae-seed" else "session seeds"
        return f"{self.statistic} across {len(self.seeds)} {what}: {per}"

    def to_dict(self) -> dict[str, Any]:
        return {"statistic": self.statistic, "seeds": list(self.seeds),
                "verdicts": list(self.verdicts), "estimates": list(self.estimates),
                "stable": self.stable, "band": list(self.band) if self.band else None,
                "measured": self.measured, "varied": self.varied, "dtype": self.dtype}


def load(path: Path = DEFAULT_PATH) -> dict[str, dict[str, SeedSpread]]:
    """{subject id: {key: SeedSpread}}; {} when the file does not exist."""
    if not path.exists():
        return {}
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path}: top level must map subject ids to claim keys")
    out: dict[str, dict[str, SeedSpread]] = {}
    for subject, claims in raw.items():
        if not isinstance(claims, Mapping):
            raise ValueError(f"{path}: {subject}: must map claim keys to spreads")
        out[str(subject)] = {
            str(k): SeedSpread(key=str(k), statistic=str(v["statistic"]),
                               seeds=tuple(int(s) for s in v["seeds"]),
                               verdicts=tuple(str(x) for x in v["verdicts"]),
                               estimates=tuple(None if e is None else float(e)
                                               for e in v["estimates"]),
                               measured=str(v.get("measured", "")),
                               varied=str(v.get("varied", "sae-seed")),
                               dtype=str(v.get("dtype", "float32")))
            for k, v in claims.items()
        }
    return out


def lookup(spreads: Mapping[str, Mapping[str, SeedSpread]], subject_id: str, claim_id: str,
           variant: str | None) -> SeedSpread | None:
    by_key = spreads.get(subject_id, {})
    if variant is not None and f"{claim_id}[{variant}]" in by_key:
        return by_key[f"{claim_id}[{variant}]"]
    return by_key.get(claim_id)


def dump(path: Path, subject_id: str, spreads: Mapping[str, SeedSpread], header: str) -> None:
    """Replace ``subject_id``'s entries of the kind ``spreads`` vary (SAE seed or session
    seed) in ``path``; other subjects and the other kind are kept."""
    existing = yaml.safe_load(path.read_text(encoding="utf-8")) if path.exists() else None
    doc = dict(existing or {})
    kinds = {s.varied for s in spreads.values()}
    kept = {k: v for k, v in (doc.get(subject_id) or {}).items()
            if v.get("varied", "sae-seed") not in kinds and k not in spreads}
    new = {k: {kk: vv for kk, vv in s.to_dict().items() if kk not in ("stable", "band")}
           for k, s in spreads.items()}
    doc[subject_id] = dict(sorted({**kept, **new}.items()))
    body = yaml.safe_dump(doc, sort_keys=True, width=100)
    path.write_text(header.rstrip() + "\n" + body, encoding="utf-8")
