"""distillery.stats: the median interval the bench judges its targets with (the t interval is tested
with the reproduction suite, tests/test_reproduce.py)."""

from __future__ import annotations

import math
import random

import pytest

from distillery.stats import median_interval


@pytest.mark.parametrize(("n", "ranks"), [(6, (1, 6)), (9, (2, 8)), (12, (3, 10)), (20, (6, 15)), (40, (14, 27))])
def test_median_interval_uses_the_tabulated_order_statistics(n: int, ranks: tuple[int, int]) -> None:
    """The 95 % ranks of the sign-test interval for the median (standard tables)."""
    values = [float(v) for v in random.Random(n).sample(range(1000), n)]
    got = median_interval(values)
    assert (got.low, got.high) == (sorted(values)[ranks[0] - 1], sorted(values)[ranks[1] - 1])
    k = ranks[0]
    assert got.coverage == pytest.approx(1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n)
    assert got.coverage >= 0.95


def test_median_interval_with_few_values_is_the_range_with_its_true_coverage() -> None:
    got = median_interval([3.0, 1.0, 2.0])
    assert (got.median, got.low, got.high, got.coverage) == (2.0, 1.0, 3.0, 0.75)
    assert median_interval([1.0, 2.0, 4.0, 5.0]).median == 3.0
    with pytest.raises(ValueError, match="at least one"):
        median_interval([])


def test_median_interval_covers_the_median_as_often_as_it_claims() -> None:
    """Skewed (exponential) samples of 12: the true median ln 2 falls inside ≥ 95 % of the time."""
    rng = random.Random(0)
    trials = 4000
    inside = 0
    for _ in range(trials):
        got = median_interval([rng.expovariate(1.0) for _ in range(12)])
        inside += got.low <= math.log(2) <= got.high
    assert inside / trials > 0.95
