"""SecAgg+ neighbourhoods of O(log n): the shares and threshold a round of n sampled nodes needs.

The parameter analysis of Bell, Bonawitz, Gascon, Lepoint and Raykova, "Secure Single-Server
Aggregation with (Poly)Logarithmic Overhead" (CCS 2020), applied to the graph Flower builds, and
computed exactly (integer arithmetic, no floating point). Pure Python, no Flower: the coordinator
chooses its set-up with :func:`neighbourhood` and every node checks the set-up it is asked to
join with :func:`privacy_failure`, against the assumptions its officer approved in the plan.

**Flower's graph.** ``SecAggPlusWorkflow`` shuffles the k-of-n sampled nodes into a random ring;
a node's *neighbours* are the k ring positions at offsets -k//2..k//2, itself included (k odd;
k = n is all-to-all). A node Shamir-shares its mask seed ``b`` and its key ``sk1`` among its
neighbours (one share it keeps) with threshold t; it masks its update with ``b`` and with one
pairwise mask per other neighbour. At unmasking the coordinator asks each surviving node for
shares of ``b`` of the surviving neighbours and of ``sk1`` of the dropped ones, and rebuilds
every sampled node's secret from t shares.

**Assumptions** (the plan's ``privacy.secagg``): at most ``ceil(corrupt_fraction * n)`` of the
sampled nodes are corrupt (they pool what they hold with an honest-but-curious coordinator) and
at most ``ceil(dropout_fraction * n)`` drop out during the round; both sets are fixed before the
coordinator shuffles the ring. Rounding up means a consortium of 3 already assumes one corrupt
node and one dropout.

**Privacy fails** (probability at most ``2^-security_bits``, union bound) only if
  (a) some honest node has >= t corrupt neighbours: their shares of its ``sk1``, with the ``b``
      the coordinator legitimately rebuilds, remove all its masks. Its k-1 other neighbours are a
      uniform draw without replacement from the n-1 others, so the count is hypergeometric; or
  (b) the honest surviving nodes' masking graph splits, so the coordinator learns the sum of one
      part. On the ring (edges between positions at most h = k//2 apart) removing the corrupt
      and dropped nodes splits the rest only if the removed positions hold two separate runs of
      h consecutive positions; bounded by the number of pairs of disjoint windows times the
      chance that 2h given positions are all removed (exact for a uniform removed set).
**Correctness fails** (a round does not complete; probability at most ``2^-correctness_bits``)
  only if some node keeps fewer than t surviving share holders: a surviving node holds its own
  share, a dropped node's k-1 others must supply all t.

:func:`neighbourhood` picks the smallest odd k < n for which a threshold meets both bounds, else
all-to-all (k = n, where both conditions are deterministic: t > corrupt and t <= n - dropped),
and raises a one-line error when even that fails. Among the thresholds meeting both bounds it
takes the middle one, a margin both for more corruption and for more dropouts than assumed;
for an all-to-all round of a small consortium that is the majority n // 2 + 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

from twinfed.errors import TwinfedError

MIN_SHARES = 3  # Flower: num_shares as an integer must be > 2
MIN_THRESHOLD = 2  # Flower reads a threshold of 1 as "all shares"


@dataclass(frozen=True)
class Assumptions:
    """What the officers approved about a round's nodes (the plan's ``privacy.secagg``)."""

    corrupt_fraction: float
    dropout_fraction: float
    security_bits: int
    correctness_bits: int

    @classmethod
    def of(cls, plan) -> Assumptions:
        s = plan.privacy.secagg
        return cls(s.corrupt_fraction, s.dropout_fraction, s.security_bits, s.correctness_bits)

    def corrupt(self, n: int) -> int:
        return _ceil_fraction(self.corrupt_fraction, n)

    def dropped(self, n: int) -> int:
        return _ceil_fraction(self.dropout_fraction, n)


@dataclass(frozen=True)
class Neighbourhood:
    """A round's SecAgg+ set-up: ``shares`` (Flower's ``num_shares``, the node itself included)
    and ``threshold`` for ``sampled`` nodes, with the failure probabilities it was chosen for."""

    sampled: int
    shares: int
    threshold: int
    privacy_failure: Fraction
    correctness_failure: Fraction

    @property
    def all_to_all(self) -> bool:
        return self.shares == self.sampled


def _ceil_fraction(fraction: float, n: int) -> int:
    # Exact: 0.1 * 30 is 3.0000000000000004 in floating point, and must give 3.
    return math.ceil(Fraction(repr(fraction)) * n)


def effective_shares(sampled: int, shares: int) -> int:
    """The neighbourhood Flower actually builds for ``shares``: an even count below the sampled
    number becomes the next odd one (after the configuration is sent), and a ring cannot hold
    more nodes than were sampled."""
    if shares < sampled and shares % 2 == 0:
        shares += 1
    return min(shares, sampled)


def hypergeometric_tail(population: int, marked: int, draws: int, at_least: int) -> Fraction:
    """P(X >= at_least), X the marked items among ``draws`` drawn without replacement from
    ``population`` holding ``marked`` (exact)."""
    if at_least <= 0:
        return Fraction(1)
    hits = sum(math.comb(marked, j) * math.comb(population - marked, draws - j)
               for j in range(at_least, min(marked, draws) + 1))
    return Fraction(hits, math.comb(population, draws))


def ring_split_bound(n: int, half: int, removed: int) -> Fraction:
    """Upper bound on P(removing ``removed`` uniformly random positions of an n-ring whose edges
    join positions at most ``half`` apart leaves a disconnected graph)."""
    if 2 * half + 1 >= n:  # every remaining pair is joined: the graph is complete
        return Fraction(0)
    if removed < 2 * half:
        return Fraction(0)
    window_pairs = n * (n - 2 * half + 1) // 2  # unordered pairs of disjoint h-windows
    p = Fraction(math.comb(n - 2 * half, removed - 2 * half), math.comb(n, removed))
    return min(Fraction(1), window_pairs * p)


def privacy_failure(sampled: int, shares: int, threshold: int, a: Assumptions) -> Fraction:
    """Union bound on the probability that some honest node's update is exposed beyond the sum,
    for the set-up Flower builds from (sampled, shares, threshold)."""
    n, k = sampled, effective_shares(sampled, shares)
    c, d = a.corrupt(n), a.dropped(n)
    if c >= n:
        return Fraction(1)
    exposed = (n - c) * hypergeometric_tail(n - 1, c, k - 1, threshold)
    return min(Fraction(1), exposed + ring_split_bound(n, k // 2, min(n, c + d)))


def correctness_failure(sampled: int, shares: int, threshold: int, a: Assumptions) -> Fraction:
    """Union bound on the probability that some node's secret cannot be rebuilt (the round
    fails) when ``ceil(dropout_fraction * n)`` nodes drop out."""
    n, k = sampled, effective_shares(sampled, shares)
    d = min(a.dropped(n), n)
    # A survivor keeps its own share: it fails with more than k - t dropped among its k-1 others.
    survivors = (n - d) * hypergeometric_tail(n - 1, d, k - 1, k - threshold + 1)
    # A dropped node's k-1 others hold d-1 of the other dropped nodes and must supply all t.
    dropped = d * hypergeometric_tail(n - 1, d - 1, k - 1, k - threshold) if d else Fraction(0)
    return min(Fraction(1), survivors + dropped)


def _thresholds(n: int, k: int, a: Assumptions) -> tuple[int, int] | None:
    """The lowest threshold meeting the privacy bound and the highest meeting correctness."""
    safe, sure = Fraction(1, 2**a.security_bits), Fraction(1, 2**a.correctness_bits)
    top = k - 1  # Flower: the threshold must be below num_shares
    low = next((t for t in range(MIN_THRESHOLD, top + 1) if privacy_failure(n, k, t, a) <= safe), None)
    if low is None or correctness_failure(n, k, low, a) > sure:
        return None
    high = low
    while high < top and correctness_failure(n, k, high + 1, a) <= sure:
        high += 1
    return low, high


@lru_cache(maxsize=256)
def _neighbourhood(n: int, a: Assumptions) -> Neighbourhood:
    if n < MIN_SHARES:
        raise TwinfedError(f"SecAgg+ needs at least {MIN_SHARES} sampled nodes, this round has {n}")
    for k in [*range(MIN_SHARES, n, 2), n]:
        found = _thresholds(n, k, a)
        if found:
            t = (found[0] + found[1] + 1) // 2
            return Neighbourhood(n, k, t, privacy_failure(n, k, t, a), correctness_failure(n, k, t, a))
    c, d = a.corrupt(n), a.dropped(n)
    raise TwinfedError(
        f"no SecAgg+ set-up protects {n} sampled sites under the plan's assumptions ({c} corrupt "
        f"and {d} dropped, rounded up from corrupt_fraction {a.corrupt_fraction:g} and "
        f"dropout_fraction {a.dropout_fraction:g}): even all-to-all needs a threshold above {c} "
        f"and at most {min(n - d, n - 1)}; lower privacy.secagg.corrupt_fraction or "
        "dropout_fraction, or sample more sites")


def neighbourhood(sampled: int, a: Assumptions) -> Neighbourhood:
    """The set-up for a round of ``sampled`` nodes: the smallest odd neighbourhood (or all) and
    the middle threshold that meet both bounds. Raises :class:`TwinfedError` when none does."""
    return _neighbourhood(int(sampled), a)
