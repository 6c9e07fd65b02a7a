"""Figures for the evidence report: matplotlib with the non-interactive Agg backend, chosen
once here so no claim module sets a backend of its own (a display-less CI has none)."""

from __future__ import annotations

from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (imported lazily: matplotlib is slow to load)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
