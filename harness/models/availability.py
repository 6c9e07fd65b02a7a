"""Whether subjects can be loaded here, asked without loading them:
``python -m harness.models.availability NAME [NAME ...]``.

``nox -s sweep`` runs the claims on every subject of its list and asks this first, so a subject
whose weights this machine cannot reach (a hub model, offline, not in the HF cache) costs one
line instead of a pytest run whose every test skips. The check is the one the loaders make
before touching weights (:func:`harness.models.loaders.check_available`), so its answer and the
plugin's skip reason are the same text.

Prints one line per subject, ``NAME: available`` or ``NAME: unavailable: REASON`` (or ``NAME:
error: ...`` for a name that is not a subject); exits 0 when every subject is available, 3 when
some are unavailable and none is an error, 2 on an error.
"""

from __future__ import annotations

import argparse
import sys

AVAILABLE, UNAVAILABLE, ERROR = 0, 3, 2
"""Exit codes."""


def status(name: str) -> tuple[int, str]:
    """(exit code, one line) for one ``--subject`` value."""
    from harness.models.loaders import check_available
    from harness.models.subjects import SubjectError, SubjectUnavailable, parse_subject

    try:
        check_available(parse_subject(name))
    except SubjectUnavailable as exc:
        return UNAVAILABLE, f"{name}: unavailable: {exc}"
    except SubjectError as exc:
        return ERROR, f"{name}: error: {exc}"
    return AVAILABLE, f"{name}: available"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.models.availability",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("subjects", nargs="+", metavar="NAME", help="--subject values")
    args = parser.parse_args(argv)
    from harness.models.determinism import pin

    pin()  # before anything imports torch, as every entry point (see harness.models.determinism)
    codes = []
    for name in args.subjects:
        code, line = status(name)
        codes.append(code)
        print(line, flush=True)
    return ERROR if ERROR in codes else UNAVAILABLE if UNAVAILABLE in codes else AVAILABLE


if __name__ == "__main__":
    sys.exit(main())
