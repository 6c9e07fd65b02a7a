"""Known answers of harness/models/depth.py: the one relative-depth rule (families S and H)."""

from __future__ import annotations

import pytest

from harness.models.depth import relative_layer, relative_layers

SOURCE = (6, 8, 10, 11)  # family S's SAE layers of GPT-2 small's 12


def test_the_source_depths_on_12_and_30_layers_by_hand() -> None:
    # 12 layers: the identity. 30 layers: 6/12*30 = 15, 8/12*30 = 20, 10/12*30 = 25,
    # 11/12*30 = 27.5 -> half up -> 28.
    assert relative_layers(SOURCE, 12, 12) == (6, 8, 10, 11)
    assert relative_layers(SOURCE, 12, 30) == (15, 20, 25, 28)
    # family H's layer 8 of 12: 8 on GPT-2 itself, 20 on SmolLM2
    assert relative_layer(8, 12, 12) == 8 and relative_layer(8, 12, 30) == 20


def test_halves_round_up_and_the_last_layer_caps() -> None:
    assert relative_layer(6, 12, 5) == 3  # 2.5 -> 3 (Python's round would give 2)
    assert relative_layer(11, 12, 2) == 1  # 1.83 -> 2, capped at the last layer 1
    assert relative_layers(SOURCE, 12, 2) == (1,)  # four depths collapse onto one layer
    assert relative_layers(SOURCE, 12, 4) == (2, 3)


def test_the_integer_rule_equals_both_former_float_rules_on_1_to_200_layers() -> None:
    """Family S's former rule (int(d / 12 * n + 0.5)) and family H's (round(8 / 12 * n)) agree
    with the integer rule wherever they were used: no subject's layer moved."""
    for n in range(1, 201):
        for d in SOURCE:
            assert relative_layer(d, 12, n) == min(int(d / 12 * n + 0.5), n - 1), (d, n)
        assert relative_layer(8, 12, n) == min(n - 1, round(8 / 12 * n)), n


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="not a layer"):
        relative_layer(12, 12, 30)
    with pytest.raises(ValueError, match="n_layers"):
        relative_layer(6, 12, 0)
