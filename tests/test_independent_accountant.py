"""The ledger's epsilon, checked by an accountant twinfed does not use: Google's ``dp_accounting``.

For every kind of release a node makes (DP-SGD rounds: the Poisson-subsampled Gaussian for
``steps`` steps; the count release and a vector of sums: one Gaussian at rate 1) and for a mixed
ledger of all of them, at the site's budget delta:
- the ledger's epsilon (``epsilon_of``, ``PrivacyLedger.spent`` and each ``privacy_spent`` event's
  ``epsilon_after``) is never below the PLD accountant's figure, which is close to the true
  epsilon of the composition (less a small tolerance: PLD's discretisation);
- it agrees with dp_accounting's RDP accountant (a different order grid and code, the same bound)
  to within 2%.
"""

import functools
import warnings

import pytest

dp_accounting = pytest.importorskip("dp_accounting")
from dp_accounting.pld import PLDAccountant  # noqa: E402
from dp_accounting.rdp import RdpAccountant  # noqa: E402

from builders import own_entries  # noqa: E402
from twinfed.governance.layout import open_audit  # noqa: E402
from twinfed.governance.node_state import init_node  # noqa: E402
from twinfed.ledger_file import Segment  # noqa: E402
from twinfed.privacy.ledger import PrivacyLedger, epsilon_of  # noqa: E402

PLAN = "ef" * 32
# PLD's loss discretisation; its estimates are pessimistic (rounded up), so a coarser grid only
# raises the PLD figure the ledger must not fall below.
PLD_DISCRETISATION = 1e-3
PLD_TOLERANCE = 0.01  # epsilon: the PLD accountant's own numerical error
RDP_AGREEMENT = 0.02  # relative

RELEASES = {  # kind -> a typical segment of it
    "dp-sgd": Segment(sample_rate=0.128, noise_multiplier=1.6, steps=200, plan_sha256=PLAN, round=1),
    "dp-sgd, a small site (rate 1)": Segment(sample_rate=1.0, noise_multiplier=8.0, steps=20,
                                             plan_sha256=PLAN, round=2),
    "gaussian-count": Segment(sample_rate=1.0, noise_multiplier=5.0, steps=1, plan_sha256=PLAN,
                              mechanism="gaussian-count"),
    "gaussian-sum": Segment(sample_rate=1.0, noise_multiplier=2.0, steps=1, plan_sha256=PLAN, round=3,
                            mechanism="gaussian-sum"),
}


def _event(s: Segment):
    """The segment as dp_accounting describes it, from the mechanism's definition."""
    gaussian = dp_accounting.GaussianDpEvent(s.noise_multiplier)
    if s.mechanism == "dp-sgd":
        step = dp_accounting.PoissonSampledDpEvent(s.sample_rate, gaussian)
        return dp_accounting.SelfComposedDpEvent(step, s.steps)
    assert s.sample_rate == 1.0 and s.steps == 1  # a Gaussian release of the whole site, once
    return gaussian


@functools.lru_cache(maxsize=None)
def _independent(segments: tuple[Segment, ...], delta: float) -> tuple[float, float]:
    """(RDP, PLD) epsilon of ``segments`` at ``delta`` by dp_accounting."""
    rdp, pld = RdpAccountant(), PLDAccountant(value_discretization_interval=PLD_DISCRETISATION)
    for s in segments:
        rdp.compose(_event(s))
        pld.compose(_event(s))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return rdp.get_epsilon(delta), pld.get_epsilon(delta)


def _check(stated: float, segments, delta: float) -> None:
    rdp, pld = _independent(tuple(segments), delta)
    assert stated >= pld - PLD_TOLERANCE, f"the ledger states {stated:.4f}, PLD says {pld:.4f}"
    assert stated == pytest.approx(rdp, rel=RDP_AGREEMENT)


def _ledger(root, delta: float) -> PrivacyLedger:
    init_node(root, site_name="a")
    return PrivacyLedger.open(root, open_audit(root), own_entries(root), epsilon_budget=100.0,
                              delta_budget=delta)


@pytest.mark.parametrize("kind", sorted(RELEASES))
@pytest.mark.parametrize("delta", [1e-5, 1e-7])
def test_each_kind_of_release_is_charged_no_less_than_an_independent_accountant_says(kind, delta, tmp_path):
    segment = RELEASES[kind]
    _check(epsilon_of([segment], delta), [segment], delta)
    ledger = _ledger(tmp_path / "s", delta)
    after = ledger.reserve(segment, delta, open_audit(tmp_path / "s"))
    _check(after, [segment], delta)
    _check(ledger.spent(), [segment], delta)  # at the budget's delta, by default
    (spent,) = [e.details for e in own_entries(tmp_path / "s") if e.event == "privacy_spent"]
    assert spent["delta"] == delta
    _check(spent["epsilon_after"], [segment], delta)


def test_a_mixed_ledger_of_every_kind_composes_as_the_independent_accountant_composes_it(tmp_path):
    delta = 1e-5
    ledger = _ledger(tmp_path / "s", delta)
    order = ["gaussian-count", "dp-sgd", "dp-sgd, a small site (rate 1)", "dp-sgd", "gaussian-sum"]
    for kind in order:
        ledger.reserve(RELEASES[kind], delta, open_audit(tmp_path / "s"))
    spends = [e.details for e in own_entries(tmp_path / "s") if e.event == "privacy_spent"]
    for i, spent in enumerate(spends):
        _check(spent["epsilon_after"], [RELEASES[k] for k in order[: i + 1]], delta)
    _check(ledger.spent(), [RELEASES[k] for k in order], delta)
    # The accountant's merging of equal segments changes nothing: the same figure either way.
    assert ledger.spent() == pytest.approx(epsilon_of([RELEASES[k] for k in order], delta), rel=1e-12)
