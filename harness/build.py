"""Build the cached artifacts a claim run needs, outside pytest: ``python -m harness.build saes``.

The pytest fixtures build the same artifacts on first use (same cache keys), so this is only a
way to pay the cold cost up front (``nox -s "build(smollm2-135m)"``) and to time it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    """The command line; ``--cache-dir`` defaults to the plugin's default (the user's cache
    directory, :func:`harness.activations.cache.default_cache_dir`), so both fill the same cache."""
    from harness.activations.cache import default_cache_dir

    parser = argparse.ArgumentParser(prog="python -m harness.build", description=__doc__)
    parser.add_argument("what", choices=["saes", "corpus"], help="artifact to build")
    parser.add_argument("--subject", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                        help="content-addressed cache (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from harness.models.determinism import pin

    pin()  # before any torch op (see harness.models.determinism)

    from harness.activations.cache import ContentCache
    from harness.activations.harvest import cached_corpus
    from harness.data.corpus import CorpusRecipe
    from harness.evidence.stages import CORPUS, MODEL_LOAD, SAE_BUILD, recorder, stage
    from harness.models.loaders import load_subject
    from harness.models.subjects import SubjectError, SubjectUnavailable, parse_subject

    try:
        spec = parse_subject(args.subject, device=args.device, dtype="float32", seed=args.seed)
        with stage(MODEL_LOAD):
            loaded = load_subject(spec)
    except (SubjectError, SubjectUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cache = ContentCache(args.cache_dir)
    start = time.perf_counter()
    with stage(CORPUS):
        corpus = cached_corpus(cache, loaded.model.tokenizer, CorpusRecipe(seed=args.seed))
    report: dict = {"subject": spec.id, "cache_dir": str(args.cache_dir),
                    "corpus_sha256": corpus.sha256}
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
