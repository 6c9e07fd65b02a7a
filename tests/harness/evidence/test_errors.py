"""harness.evidence.errors: which exceptions mean 'unavailable', and a maximum that refuses NaN."""

from __future__ import annotations

import math

import pytest

from harness.evidence.errors import HarnessError, finite_max, unavailable_errors


def test_finite_max_known_answer() -> None:
    assert finite_max([("a", 1.0), ("b", 3.0), ("c", 2.0)], "err") == 3.0
    assert finite_max([("a", -math.inf), ("b", -1.0)], "err") == -1.0


@pytest.mark.parametrize("at", [0, 1, 2])
def test_finite_max_names_the_nan_wherever_it_is(at: int) -> None:
    values = [(f"layer {i}", 1.0) for i in range(3)]
    values[at] = (f"layer {at}", math.nan)
    assert max(v for _, v in values) == 1.0 or at == 0  # what Python's max did: NaN dropped
    with pytest.raises(HarnessError, match=f"max_rel_error: NaN at layer {at}"):
        finite_max(values, "max_rel_error")


def test_finite_max_of_nothing_is_an_error() -> None:
    with pytest.raises(HarnessError, match="nothing"):
        finite_max([], "err")


def test_unavailable_errors_are_only_missing_things() -> None:
    errors = unavailable_errors()
    assert OSError in errors and ImportError in errors
    for exc in (RuntimeError("state_dict"), ValueError("bug"), KeyError("k"), TypeError("t")):
        assert not isinstance(exc, errors), exc
