"""Measure how far every verdict moves across seeds: SAE training seeds for families S and R,
session seeds (the corpus sample and the bootstraps' draws) for H and W (``--vary
session-seed``, ``nox -s "respread(SUBJECT)"``: steps 2 and 3 below with ``--seed K``).

``python -m harness.statistics.reseed --subject smollm2-135m --seeds 0 1 2`` (``nox -s
"reseed(smollm2-135m)"``):

1. trains the subject's SAEs under every seed from ONE corpus pass (the stored activations
   are shared; only the SAE init and the order of the activation stream change), into the
   content cache the claim runs read;
2. runs families S and R once per seed (``pytest claims -k "family-S or family-R"
   --sae-seed K``), each with its own evidence directory ``<evidence-dir>/<subject>/reseed/
   seed-K/``; a seed's run may fail (that is a measurement, not an error of this tool);
3. writes the spread: per claim test, every seed's verdict (the run's own interval, before any
   recorded spread is applied) and headline estimate, into ``<evidence-dir>/<subject>/reseed/
   spread.md`` and (``--write-fixture``) ``fixtures/seed_spread.yaml``, which the plugin reads
   (:mod:`harness.statistics.seed_spread`).

R1 trains its own SAE on synthetic data (from the session seed), so it is not part of this.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

from harness.evidence.record import run_dir_name
from harness.models.subjects import parse_subject

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = {"sae-seed": "family-S or family-R", "session-seed": "family-H or family-W"}
SEED_OPTION = {"sae-seed": "--sae-seed", "session-seed": "--seed"}
FAMILY_LETTERS = {"sae-seed": "SR", "session-seed": "HW"}


def build_all(subject: str, seeds: list[int], cache_dir: Path) -> float:
    """Every seed's SAEs (and W's harvest) from one corpus pass; seconds."""
    from harness.activations.cache import ContentCache
    from harness.activations.harvest import cached_corpus, mlp_neurons_spec
    from harness.data.corpus import CorpusRecipe
    from harness.models.loaders import load_subject
    from harness.models.subjects import parse_subject
    from harness.saes.sources import default_sae_specs
    from harness.saes.train import get_or_train_saes

    start = time.perf_counter()
    loaded = load_subject(parse_subject(subject, device="cpu", dtype="float32", seed=0))
    cache = ContentCache(cache_dir)
    corpus = cached_corpus(cache, loaded.model.tokenizer, CorpusRecipe(seed=0))
    specs = [s for k in seeds for s in default_sae_specs(loaded.model, seed=k)]
    w = (mlp_neurons_spec(loaded.model.cfg.n_layers),) if loaded.model.cfg.d_mlp else ()
    get_or_train_saes(cache, loaded, corpus, specs, harvest_specs=w)
    return time.perf_counter() - start


def run_seed(subject: str, seed: int, evidence_dir: Path, cache_dir: Path,
             extra: list[str], varied: str = "sae-seed") -> tuple[int, Path]:
    out = evidence_dir / subject / "reseed" / varied / f"seed-{seed}"
    cmd = [sys.executable, "-m", "pytest", "claims", "-k", FAMILIES[varied], f"--subject={subject}",
           f"{SEED_OPTION[varied]}={seed}", f"--evidence-dir={out}", f"--cache-dir={cache_dir}",
           "-p", "no:cacheprovider", "-q", *extra]
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    name = run_dir_name(parse_subject(subject).id, **({"sae_seed": seed} if varied == "sae-seed"
                                                       else {"seed": seed}))
    return rc, out / name / "evidence.json"


def _key(record: dict) -> str:
    test = record.get("test", "")
    variant = test[test.index("[") + 1 : -1] if "[" in test else None
    return f"{record['id']}[{variant}]" if variant else record["id"]


def spreads_from(seed_docs: dict[int, dict], registry_path: Path, varied: str = "sae-seed") -> dict:
    """{key: SeedSpread} from each seed's evidence.json (raw verdicts, headline estimates)."""
    from harness.evidence.registry import Registry
    from harness.statistics.seed_spread import SeedSpread

    registry = Registry.load(registry_path)
    today = datetime.date.today().isoformat()
    by_key: dict[str, dict[int, tuple[str, float | None]]] = {}
    stat_of: dict[str, str] = {}
    dtype_of: dict[str, str] = {}
    for seed, doc in seed_docs.items():
        for r in doc["claims"]:
            if r["id"][0] not in FAMILY_LETTERS[varied]:
                continue  # another kind's claim (a full run's evidence holds every family)
            dtype_of[_key(r)] = (doc.get("provenance") or {}).get("dtype", "float32")
            if r["id"] == "R1" or r.get("verdict") in ("unavailable", "error", None):
                continue
            key = _key(r)
            stat = registry[r["id"]].decision.statistic
            est = (r.get("statistics", {}).get(stat) or {}).get("estimate", {}).get("value")
            verdict = r.get("raw_verdict") or r["verdict"]
            by_key.setdefault(key, {})[seed] = (verdict, None if est in (None, "nan") else float(est))
            stat_of[key] = stat
    out = {}
    for key, per in by_key.items():
        seeds = sorted(per)
        out[key] = SeedSpread(key=key, statistic=stat_of[key], seeds=tuple(seeds),
                              verdicts=tuple(per[s][0] for s in seeds),
                              estimates=tuple(per[s][1] for s in seeds), measured=today,
                              varied=varied, dtype=dtype_of[key])
    return out


def render(subject: str, spreads: dict, seconds: dict) -> str:
    kinds = sorted({s.varied for s in spreads.values()})
    lines = [f"# Seed spread ({', '.join(kinds)}) on {subject}", "",
             "Per claim test: each seed's verdict (its own interval) and headline estimate. "
             "A claim whose verdict differs between seeds is reported as inconclusive "
             "(seed-unstable) by every run on this subject.", "",
             "| claim | statistic | stable | verdicts by seed | estimates by seed | band |",
             "|---|---|---|---|---|---|"]
    for key, s in sorted(spreads.items()):
        band = f"[{s.band[0]:.4g}, {s.band[1]:.4g}]" if s.band else "n/a"
        ests = ", ".join("n/a" if e is None else f"{e:.4g}" for e in s.estimates)
        verdicts = ", ".join(f"{k}: {v}" for k, v in zip(s.seeds, s.verdicts, strict=True))
        lines.append(f"| {key} | {s.statistic} | {'yes' if s.stable else '**no**'} | "
                     f"{verdicts} | {ests} | {band} |")
    lines += ["", "Wall time (s): " + json.dumps(seconds)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.statistics.reseed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subject", default="smollm2-135m")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--evidence-dir", type=Path, default=ROOT / "evidence")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--write-fixture", action="store_true",
                        help="also write the spread into fixtures/seed_spread.yaml")
    parser.add_argument("--vary", choices=sorted(FAMILIES), default="sae-seed",
                        help="sae-seed: families S and R under --sae-seed K (default); "
                        "session-seed: families H and W under --seed K")
    parser.add_argument("--collect", type=Path, nargs="+", default=None,
                        help="build the spread from these evidence.json files (one per seed, "
                        "in --seeds order) instead of running pytest")
    args, extra = parser.parse_known_args(argv)
    if len(set(args.seeds)) < 2:
        parser.error("give at least two distinct --seeds")
    if args.collect and len(args.collect) != len(args.seeds):
        parser.error("--collect takes one evidence.json per --seeds entry, in the same order")
    from harness.models.determinism import pin

    pin()
    from harness.activations.cache import default_cache_dir
    from harness.statistics.seed_spread import DEFAULT_PATH, dump

    cache_dir = args.cache_dir or default_cache_dir()
    seconds: dict = {}
    if args.vary == "sae-seed" and not args.collect:
        seconds["build"] = round(build_all(args.subject, args.seeds, cache_dir), 1)
    docs = {}
    for i, k in enumerate(args.seeds):
        start = time.perf_counter()
        if args.collect:
            rc, path = 0, args.collect[i]
        else:
            rc, path = run_seed(args.subject, k, args.evidence_dir, cache_dir, extra, args.vary)
        seconds[f"seed {k}"] = round(time.perf_counter() - start, 1)
        if not path.exists():
            print(f"error: seed {k}: pytest exited {rc} without evidence at {path}", file=sys.stderr)
            return 2
        docs[k] = json.loads(path.read_text())
    spreads = spreads_from(docs, ROOT / "fixtures" / "claims.yaml", args.vary)
    report = args.evidence_dir / args.subject / "reseed" / args.vary / "spread.md"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(render(args.subject, spreads, seconds), encoding="utf-8")
    print(report.read_text())
    if args.write_fixture:
        dump(DEFAULT_PATH, args.subject, spreads,
             "# Seed spread per subject and claim test (varied: sae-seed for families S and R, "
             "session-seed for H and W),\n# written by `python -m harness.statistics.reseed --write-fixture "
             "[--vary session-seed]` (nox -s reseed / respread);\n# read by the plugin "
             "(harness/statistics/seed_spread.py): the verdict rule and each headline's tolerance band.\n"
             "# Reviewed before commit like the registry.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
