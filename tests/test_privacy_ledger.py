"""The privacy ledger, noise calibration and patient-level sampling."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from twinfed.privacy.calibrate import noise_for_budget, sample_rate
from twinfed.privacy.ledger import LEDGER_FILE, BudgetExhausted, LedgerError, PrivacyLedger, Segment, epsilon_of

DELTA = 1e-5


def seg(q=0.1, sigma=1.5, steps=50, **kw) -> Segment:
    return Segment(sample_rate=q, noise_multiplier=sigma, steps=steps, **kw)


def test_a_new_ledger_has_spent_nothing_and_keeps_its_budget(tmp_path):
    ledger = PrivacyLedger.open(tmp_path, epsilon_budget=3.0, delta=DELTA)
    assert ledger.spent() == 0.0 and ledger.remaining() == 3.0
    ledger.record(seg())
    again = PrivacyLedger.open(tmp_path, epsilon_budget=99.0, delta=0.1)
    assert again.budget == 3.0 and again.delta == DELTA  # the first budget stays the site's
    assert again.segments[0].steps == 50


def test_segments_compose_like_one_opacus_accountant(tmp_path):
    ledger = PrivacyLedger.open(tmp_path, epsilon_budget=50.0, delta=DELTA)
    for s in (seg(0.1, 1.2, 30), seg(0.2, 2.0, 40), seg(0.1, 1.2, 10)):
        ledger.record(s)
    acc = RDPAccountant()
    for q, sigma, n in ((0.1, 1.2, 30), (0.2, 2.0, 40), (0.1, 1.2, 10)):
        for _ in range(n):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    assert ledger.spent() == pytest.approx(acc.get_epsilon(delta=DELTA), rel=1e-9)


def test_ledger_epsilon_agrees_with_the_rdp_formula_computed_independently(tmp_path):
    segments = [seg(0.05, 1.1, 200), seg(0.3, 3.0, 25)]
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    rdp = sum(compute_rdp(q=s.sample_rate, noise_multiplier=s.noise_multiplier, steps=s.steps, orders=orders)
              for s in segments)
    eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=DELTA)
    assert epsilon_of(segments, DELTA) == pytest.approx(eps, rel=1e-9)
    # The PRV accountant is tighter than RDP, never looser, on the same segments.
    assert epsilon_of(segments, DELTA, "prv") <= eps * 1.01


def test_a_round_over_budget_is_refused_and_nothing_is_recorded(tmp_path):
    ledger = PrivacyLedger.open(tmp_path, epsilon_budget=1.0, delta=DELTA)
    with pytest.raises(BudgetExhausted, match="privacy budget exhausted: epsilon 0.000 of 1 spent"):
        ledger.record(seg(0.5, 0.6, 500))
    assert ledger.segments == [] and not (tmp_path / LEDGER_FILE).exists()


def test_a_crash_while_writing_leaves_the_previous_ledger(tmp_path, monkeypatch):
    ledger = PrivacyLedger.open(tmp_path, epsilon_budget=10.0, delta=DELTA)
    ledger.record(seg())
    before = (tmp_path / LEDGER_FILE).read_bytes()

    def crash(*_a, **_k):
        raise OSError("disk died mid-write")

    monkeypatch.setattr("twinfed.atomic.os.replace", crash)
    with pytest.raises(OSError):
        ledger.record(seg(steps=7))
    assert (tmp_path / LEDGER_FILE).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [LEDGER_FILE]  # no temporary file left behind
    assert len(PrivacyLedger.open(tmp_path, epsilon_budget=10.0, delta=DELTA).segments) == 1


def test_a_corrupt_ledger_is_an_error_not_a_fresh_budget(tmp_path):
    (tmp_path / LEDGER_FILE).write_text('{"version": 1, "epsilon_budget": 3')
    with pytest.raises(LedgerError, match="unreadable privacy ledger"):
        PrivacyLedger.open(tmp_path, epsilon_budget=3.0, delta=DELTA)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.floats(0.01, 0.5), st.floats(0.5, 5.0), st.integers(1, 200)),
                min_size=1, max_size=6))
def test_epsilon_never_decreases_as_segments_are_added(parts):
    segments = [seg(q, s, n) for q, s, n in parts]
    eps = [epsilon_of(segments[: i + 1], DELTA) for i in range(len(segments))]
    assert all(b >= a - 1e-9 for a, b in zip(eps, eps[1:]))


@pytest.mark.parametrize("target, q, steps", [(1.0, 0.05, 400), (3.0, 0.128, 200), (8.0, 0.25, 1000),
                                              (3.0, 0.5, 50)])
def test_calibrated_noise_lands_within_budget_and_close_to_it(target, q, steps):
    sigma = noise_for_budget(target_epsilon=target, delta=DELTA, sample_rate=q, steps=steps)
    eps = epsilon_of([seg(q, sigma, steps)], DELTA)
    assert target - 0.01 <= eps <= target


def test_calibration_composes_with_what_the_site_already_spent():
    spent = [seg(0.1, 1.0, 100)]
    first = epsilon_of(spent, DELTA)
    sigma = noise_for_budget(target_epsilon=first + 2.0, delta=DELTA, sample_rate=0.1, steps=100, spent=spent)
    total = epsilon_of([*spent, seg(0.1, sigma, 100)], DELTA)
    assert first + 2.0 - 0.01 <= total <= first + 2.0


def test_the_sample_rate_matches_opacus_poisson_loader():
    assert sample_rate(1000, 128) == 1 / 8
    assert sample_rate(300, 128) == 1 / 3
    assert sample_rate(50, 128) == 1.0
