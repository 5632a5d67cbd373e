"""SecAgg+ neighbourhoods of O(log n): the parameter analysis, checked against brute force."""

import itertools
import math
from fractions import Fraction

import pytest
from pydantic import ValidationError

from twinfed.errors import TwinfedError
from twinfed.models.plan import SecAggConfig
from twinfed.privacy.neighbourhood import (Assumptions, correctness_failure, effective_shares,
                                           hypergeometric_tail, neighbourhood, privacy_failure,
                                           ring_split_bound)

DEFAULT = Assumptions(0.1, 0.1, 40, 20)


def _ring_neighbours(order: tuple, node, k: int) -> set:
    """Flower's ring: the nodes at offsets -k//2..k//2 of ``node`` in the shuffled order."""
    i, n = order.index(node), len(order)
    return {order[(i + off) % n] for off in range(-(k // 2), k // 2 + 1)}


def test_the_hypergeometric_tail_is_the_count_over_every_draw():
    population, marked = range(9), {0, 1, 2}
    draws = list(itertools.combinations(population, 4))
    for at_least in range(0, 5):
        hits = sum(len(marked & set(d)) >= at_least for d in draws)
        assert hypergeometric_tail(9, 3, 4, at_least) == Fraction(hits, len(draws))


def test_a_nodes_neighbours_in_a_shuffled_ring_are_a_draw_without_replacement():
    # Every ordering of 7 nodes, k = 5: corrupt neighbours of one honest node, exactly.
    nodes, corrupt, k = range(7), {5, 6}, 5
    orders = list(itertools.permutations(nodes))
    for t in (1, 2, 3):
        exposed = sum(len(_ring_neighbours(o, 0, k) & corrupt) >= t for o in orders)
        assert Fraction(exposed, len(orders)) == hypergeometric_tail(6, 2, k - 1, t)


def _split(n: int, half: int, removed: set) -> bool:
    left = [p for p in range(n) if p not in removed]
    if len(left) <= 1:
        return False
    seen, todo = {left[0]}, [left[0]]
    while todo:
        p = todo.pop()
        for off in range(-half, half + 1):
            q = (p + off) % n
            if q not in removed and q not in seen:
                seen.add(q)
                todo.append(q)
    return len(seen) < len(left)


@pytest.mark.parametrize("n,half,s", [(9, 2, 4), (10, 2, 5), (11, 2, 6), (12, 3, 7), (10, 1, 3)])
def test_the_ring_split_bound_is_at_least_the_true_chance_of_a_split(n, half, s):
    subsets = list(itertools.combinations(range(n), s))
    exact = Fraction(sum(_split(n, half, set(r)) for r in subsets), len(subsets))
    bound = ring_split_bound(n, half, s)
    assert 0 < exact <= bound
    assert ring_split_bound(n, half, 2 * half - 1) == 0 and _split(n, half, set(range(2 * half - 1))) is False


def test_small_consortia_are_all_to_all_with_a_majority_threshold():
    for n in (3, 4, 5):
        chosen = neighbourhood(n, DEFAULT)
        assert (chosen.shares, chosen.threshold) == (n, n // 2 + 1) and chosen.all_to_all


def test_the_neighbourhood_is_odd_below_n_and_grows_like_log_n():
    for n in [*range(3, 60), 100, 300, 1000, 3000]:
        c = neighbourhood(n, DEFAULT)
        assert c.shares == n or (c.shares % 2 == 1 and c.shares < n)
        assert effective_shares(n, c.shares) == c.shares  # what Flower builds is what it was sent
        assert 2 <= c.threshold < c.shares
        assert c.privacy_failure <= Fraction(1, 2**40) and c.correctness_failure <= Fraction(1, 2**20)
    k = {n: neighbourhood(n, DEFAULT).shares for n in (10, 100, 1000, 3000)}
    assert k[100] < 100 / 4 and k[1000] < 1000 / 20 and k[3000] - k[1000] < k[1000] - k[100]


def test_the_chosen_neighbourhood_is_the_smallest_that_meets_both_bounds():
    for n in (10, 30, 100, 1000):
        chosen = neighbourhood(n, DEFAULT)
        smaller = chosen.shares - 2
        assert not any(privacy_failure(n, smaller, t, DEFAULT) <= Fraction(1, 2**40)
                       and correctness_failure(n, smaller, t, DEFAULT) <= Fraction(1, 2**20)
                       for t in range(2, smaller))


def test_stronger_assumptions_never_give_a_smaller_neighbourhood_or_threshold():
    for n in (10, 100, 1000):
        by_corrupt = [neighbourhood(n, Assumptions(g, 0.1, 40, 20)) for g in (0, 0.05, 0.1, 0.2, 0.3)]
        assert [c.shares for c in by_corrupt] == sorted(c.shares for c in by_corrupt)
        assert [c.threshold for c in by_corrupt] == sorted(c.threshold for c in by_corrupt)
        by_bits = [neighbourhood(n, Assumptions(0.1, 0.1, s, 20)).shares for s in (20, 40, 64, 128)]
        assert by_bits == sorted(by_bits)
        by_dropout = [neighbourhood(n, Assumptions(0.1, d, 40, 20)).shares for d in (0, 0.1, 0.2)]
        assert by_dropout == sorted(by_dropout)


def test_privacy_is_exact_for_all_to_all_a_threshold_above_the_corrupt_count():
    # 1,000 sampled, 100 corrupt: all-to-all with threshold 100 lets them unmask anyone, 101 not;
    # more shares with the threshold of a small neighbourhood is weaker, not stronger.
    assert privacy_failure(1000, 1000, 100, DEFAULT) == 1
    assert privacy_failure(1000, 1000, 101, DEFAULT) == 0
    chosen = neighbourhood(1000, DEFAULT)
    assert privacy_failure(1000, 1001 - 2, chosen.threshold, DEFAULT) == 1


def test_the_union_bounds_match_an_independent_sum():
    n, k, t = 40, 7, 4
    c, d = DEFAULT.corrupt(n), DEFAULT.dropped(n)  # 4 and 4
    h = k // 2
    total = math.comb(n - 1, k - 1)

    def tail(marked, at_least):
        return Fraction(sum(math.comb(marked, j) * math.comb(n - 1 - marked, k - 1 - j)
                            for j in range(at_least, min(marked, k - 1) + 1)), total)

    split = Fraction(n * (n - 2 * h + 1) // 2 * math.comb(n - 2 * h, c + d - 2 * h), math.comb(n, c + d))
    assert privacy_failure(n, k, t, DEFAULT) == (n - c) * tail(c, t) + split > 0
    assert correctness_failure(n, k, t, DEFAULT) == (n - d) * tail(d, k - t + 1) + d * tail(d - 1, k - t) > 0


def test_no_setup_under_impossible_assumptions_is_one_line_naming_what_to_relax():
    with pytest.raises(TwinfedError) as e:
        neighbourhood(10, Assumptions(0.5, 0.5, 40, 20))
    msg = str(e.value)
    assert "\n" not in msg and "corrupt_fraction" in msg and "dropout_fraction" in msg and "10 sampled" in msg


@pytest.mark.parametrize("field,value", [("corrupt_fraction", float("nan")), ("corrupt_fraction", 0.6),
                                         ("dropout_fraction", -0.1), ("dropout_fraction", float("inf")),
                                         ("security_bits", 8), ("correctness_bits", 0)])
def test_the_plans_secagg_assumptions_are_validated(field, value):
    with pytest.raises(ValidationError):
        SecAggConfig(**{field: value})
