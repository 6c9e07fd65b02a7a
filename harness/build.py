"""Build the cached artifacts a claim run needs, outside pytest: ``python -m harness.build saes``.

The pytest fixtures build the same artifacts on first use (same cache keys), so this is only a
way to pay the cold cost up front (``nox -s "build(smollm2-135m)"``) and to time it.

- ``saes``: the subject's SAEs (and the corpus pass that feeds them);
- ``corpus``: the background corpus tokenized for the subject;
- ``model``: the subject itself: for a size-ladder subject (``--subject ladder:solu-1l``) its
  training, then its model card; other subjects are only loaded;
- ``ladder``: every size-ladder subject (or those named with ``--subject``), ``--jobs`` at a
  time in child processes (each trains on one thread, so two jobs fill two cores).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    """The command line; ``--cache-dir`` defaults to the plugin's default (the user's cache
    directory, :func:`harness.activations.cache.default_cache_dir`), so both fill the same cache."""
    from harness.activations.cache import default_cache_dir

    parser = argparse.ArgumentParser(prog="python -m harness.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["saes", "corpus", "model", "ladder"],
                        help="artifact to build")
    parser.add_argument("--subject", action="append", default=None,
                        help="subject name (default smollm2-135m; for 'ladder': every ladder "
                        "subject); 'ladder' takes it several times")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2,
                        help="'ladder' only: subjects trained at once (default %(default)s)")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                        help="content-addressed cache (default: %(default)s)")
    return parser


def build_ladder(names: list[str], cache_dir: Path, jobs: int) -> int:
    """Train the named ladder subjects, ``jobs`` child processes at a time, deepest first (the
    longest jobs start first, so the workers finish together); prints one JSON report."""
    from harness.models.ladder import LADDER

    unknown = sorted(set(names) - set(LADDER))
    if unknown or jobs < 1:
        print(f"error: not ladder subjects: {unknown}; known: {sorted(LADDER)}" if unknown
              else "error: --jobs must be >= 1", file=sys.stderr)
        return 2
    from concurrent.futures import ThreadPoolExecutor

    def run(name: str) -> tuple[str, int, str, float]:
        began = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "harness.build", "model", f"--subject={name}",
                               f"--cache-dir={cache_dir}"], stdout=subprocess.PIPE, text=True)
        return name, proc.returncode, proc.stdout, time.perf_counter() - began

    start = time.perf_counter()
    report: dict = {"cache_dir": str(cache_dir), "jobs": jobs, "subjects": {}}
    with ThreadPoolExecutor(max_workers=jobs) as pool:  # each job is a child process
        results = list(pool.map(run, sorted(names, key=lambda n: -LADDER[n].n_layers)))
    for name, code, out, seconds in results:
        result = json.loads(out) if code == 0 else {"error": f"exit status {code}"}
        report["subjects"][name] = {**result, "process_seconds": round(seconds, 1)}
    report["wall_seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(report, indent=1))
    return 1 if any(code != 0 for _, code, _, _ in results) else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from harness.models.determinism import pin

    pin()  # before any torch op (see harness.models.determinism)

    if args.what == "ladder":
        from harness.models.ladder import LADDER

        return build_ladder(args.subject or list(LADDER), args.cache_dir, args.jobs)
    if args.subject and len(args.subject) > 1:
        print(f"error: '{args.what}' builds one subject; got {args.subject}", file=sys.stderr)
        return 2

    from harness.activations.cache import ContentCache
    from harness.activations.harvest import cached_corpus
    from harness.data.corpus import CorpusRecipe
    from harness.evidence.stages import CORPUS, MODEL_LOAD, SAE_BUILD, recorder, stage
    from harness.models.loaders import load_subject
    from harness.models.subjects import SubjectError, SubjectUnavailable, parse_subject

    subject = args.subject[0] if args.subject else "smollm2-135m"
    start = time.perf_counter()
    try:
        spec = parse_subject(subject, device=args.device, dtype="float32", seed=args.seed)
        with stage(MODEL_LOAD):
            loaded = load_subject(spec, cache_dir=args.cache_dir)
    except (SubjectError, SubjectUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report: dict = {"subject": spec.id, "cache_dir": str(args.cache_dir),
                    "weight_hash": loaded.weight_hash}
    if args.what == "model":
        report["model_card"] = loaded.card
    cache = ContentCache(args.cache_dir)
    if args.what in ("saes", "corpus"):
        with stage(CORPUS):
            corpus = cached_corpus(cache, loaded.model.tokenizer, CorpusRecipe(seed=args.seed))
        report["corpus_sha256"] = corpus.sha256
    if args.what == "saes":
        from harness.saes.train import subject_saes

        try:
            with stage(SAE_BUILD):
                saes = subject_saes(cache, loaded, corpus)
        except (SubjectError, SubjectUnavailable) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        report["saes"] = [{"hook": s.hook_name, "d_sae": s.sae.cfg.d_sae, "origin": s.origin,
                           "train_seconds": s.source.get("train_seconds"),
                           **{k: round(v, 4) if isinstance(v, float) else v
                              for k, v in s.quality.items()}} for s in saes]
    report["wall_seconds"] = round(time.perf_counter() - start, 1)
    report["stage_seconds"] = {k: round(v, 1) for k, v in recorder().totals().items()}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
