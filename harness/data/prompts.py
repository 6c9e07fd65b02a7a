"""Texts the hook-math claims run on: a fixed batch of varied real text and seeded synthetic
sentences from the template vocabulary in ``fixtures/sentences.yaml``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


def hook_batch(path: Path = FIXTURES / "texts" / "hook_batch.txt") -> list[str]:
    """One text per line (``\\n`` escapes become newlines); blank lines are an error."""
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            raise ValueError(f"{path}:{i}: empty line")
    return [line.replace("\\n", "\n") for line in lines]


@dataclass(frozen=True)
class SentenceTemplates:
    """Parts of "<opener> <subject> <verb> <object> <place>."."""

    openers: tuple[str, ...]
    subjects: tuple[str, ...]
    verbs: tuple[str, ...]
    objects: tuple[str, ...]
    places: tuple[str, ...]

    @classmethod
    def load(cls, path: Path = FIXTURES / "sentences.yaml") -> SentenceTemplates:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        return cls(**{k: tuple(raw[k]) for k in ("openers", "subjects", "verbs", "objects", "places")})

    @property
    def capacity(self) -> int:
        return len(self.openers) * len(self.subjects) * len(self.verbs) * len(self.objects) * len(self.places)

    def sample(self, n: int, rng: np.random.Generator) -> list[str]:
        """``n`` distinct sentences, drawn without replacement from all combinations."""
        if not 0 < n <= self.capacity:
            raise ValueError(f"n must be in 1..{self.capacity}, got {n}")
        sizes = [len(self.openers), len(self.subjects), len(self.verbs), len(self.objects), len(self.places)]
        flat = rng.choice(self.capacity, size=n, replace=False)
        out = []
        for idx in flat:
            o, s, v, ob, p = np.unravel_index(int(idx), sizes)
            opener = self.openers[o]
            subj = self.subjects[s]
            text = f"{opener} {subj}" if opener else subj[0].upper() + subj[1:]
            out.append(f"{text} {self.verbs[v]} {self.objects[ob]} {self.places[p]}.")
        return out
