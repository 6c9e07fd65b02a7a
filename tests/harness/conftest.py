"""Fixtures shared by the harness's own tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def heavy_imports() -> None:
    """Import what the inner runs import BEFORE pytester snapshots sys.modules (requested ahead
    of ``pytester``): pytester drops modules an inner run imported, and importing ``datasets``
    (through sae-lens) a second time fails on pyarrow's extension-type registry."""
    import datasets  # noqa: F401
    import matplotlib.pyplot  # noqa: F401
    import sae_lens  # noqa: F401
    import transformer_lens  # noqa: F401

    import harness.saes.specialists  # noqa: F401
    import harness.saes.train  # noqa: F401
