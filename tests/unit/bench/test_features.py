"""bench features: which variants run, and in what order each round."""

from __future__ import annotations

import pytest

from bench.features import BASELINE_VARIANTS, VARIANTS, choose_variants, in_round


def test_all_variants_by_default_and_the_baselines_only_with_a_baseline() -> None:
    assert choose_variants(False, None) == VARIANTS
    assert choose_variants(True, None) == VARIANTS + BASELINE_VARIANTS
    chosen = choose_variants(True, "v1_baseline_unary,unary")
    assert [name for name, _, _, _ in chosen] == ["unary", "v1_baseline_unary"]


def test_an_unknown_variant_is_refused_by_name() -> None:
    with pytest.raises(SystemExit, match="baseline_unary"):
        choose_variants(False, "unary,baseline_unary")


def test_every_variant_takes_every_place_once_over_as_many_rounds() -> None:
    variants = VARIANTS[:4]
    orders = [in_round(variants, r) for r in range(len(variants))]
    for order in orders:
        assert sorted(order) == sorted(variants)
    for place in range(len(variants)):
        assert {order[place] for order in orders} == set(variants)
    assert in_round(variants, len(variants)) == variants
