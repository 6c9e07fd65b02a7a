"""The harness's own failures, kept apart from scientific verdicts.

A claim ends in a verdict (supported, refuted, inconclusive, unavailable) only through
``evidence.judge()``, ``evidence.inconclusive(...)`` or a skip for a missing network, file or
package. Anything else that stops a claim test (a NaN headline, a test that never judged, a
plain ``assert``, a TransformerLens bug) is a :class:`HarnessError` or another exception: the
plugin records it as ``error`` and the run fails.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


class HarnessError(Exception):
    """The harness (or a claim test) failed to measure what it set out to: an error that
    fails the run, never a scientific verdict."""


def unavailable_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "a network, file or package is missing", and nothing else.

    A loader turns exactly these into ``SubjectUnavailable``; a ``RuntimeError`` (a state-dict
    mismatch), a ``ValueError`` or a ``KeyError`` (a TransformerLens or sae-lens bug, a wrong
    name) propagates as an error. ``OSError`` covers ``ConnectionError``, ``TimeoutError``,
    ``FileNotFoundError``, requests' and huggingface_hub's HTTP errors and its offline mode.
    """
    errors: list[type[BaseException]] = [OSError, ImportError]
    try:
        from huggingface_hub.errors import EntryNotFoundError  # not an OSError
        errors.append(EntryNotFoundError)
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        pass
    try:
        import httpx  # huggingface_hub >= 1.0 talks through httpx

        errors.append(httpx.TransportError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def finite_max(values: Iterable[tuple[str, float]], what: str) -> float:
    """max over (label, value) pairs that refuses a NaN (Python's ``max`` drops one unless it
    comes first; numpy's ``max`` would hide where it came from): raises HarnessError naming
    the first label whose value is NaN."""
    best = -math.inf
    seen = False
    for label, value in values:
        value = float(value)
        if math.isnan(value):
            raise HarnessError(f"{what}: NaN at {label}")
        seen = True
        best = max(best, value)
    if not seen:
        raise HarnessError(f"{what}: nothing to take the maximum of")
    return best
