"""A source's layer at the same relative depth of another subject: the one rule for every family.

The sources name layers of their own model (GPT-2 small: 12 layers; family S's SAEs at 6, 8,
10, 11, family H's "neuron 481, layer 8"). On a subject of ``n_layers`` the suite uses

    layer = min(floor(source_layer / source_n_layers * n_layers + 1/2), n_layers - 1)

(round half up, capped at the last layer), computed in integers so that no float rounding of
``source_layer / source_n_layers`` can move a layer across a half: SmolLM2's 30 layers put 6,
8, 10, 11 of 12 at 15, 20, 25, 28. Family S used this rule in floats and family H Python's
``round`` (half to even); on every depth either source uses they agree with the integer rule
for 1-200 layers (tests/harness/models/test_depth.py), so no subject's layer moved.
"""

from __future__ import annotations

from collections.abc import Sequence


def relative_layer(source_layer: int, source_n_layers: int, n_layers: int) -> int:
    """``source_layer`` of a ``source_n_layers``-layer model mapped onto ``n_layers`` layers by
    the module docstring's rule."""
    if not 0 <= source_layer < source_n_layers:
        raise ValueError(f"source layer {source_layer} is not a layer of a {source_n_layers}-layer model")
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    # floor(d / N * n + 1/2) = floor((2 d n + N) / (2 N)), exact in integers
    return min((2 * source_layer * n_layers + source_n_layers) // (2 * source_n_layers), n_layers - 1)


def relative_layers(source_layers: Sequence[int], source_n_layers: int, n_layers: int) -> tuple[int, ...]:
    """:func:`relative_layer` of each source layer, in order, duplicates dropped (the source's
    depths collapse onto fewer layers of a shallow subject)."""
    out: list[int] = []
    for d in source_layers:
        layer = relative_layer(d, source_n_layers, n_layers)
        if layer not in out:
            out.append(layer)
    return tuple(out)
