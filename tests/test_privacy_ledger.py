"""The privacy ledger, its mirror in the signed audit log, noise calibration and sampling."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from builders import own_entries
from twinfed.governance.layout import open_audit
from twinfed.governance.node_state import init_node
from twinfed.ledger_file import LEDGER_FILE, LedgerError, Segment
from twinfed.privacy.calibrate import noise_for_budget, sample_rate
from twinfed.privacy.ledger import BudgetExhausted, PrivacyLedger, epsilon_of, rebuild_from_log

DELTA = 1e-5
PLAN = "ab" * 32


def seg(q=0.1, sigma=1.5, steps=50, round=1, **kw) -> Segment:
    return Segment(sample_rate=q, noise_multiplier=sigma, steps=steps, plan_sha256=PLAN, round=round, **kw)


class Node:
    """A node state with its audit log, and the ledger opened as the gate opens it."""

    def __init__(self, root):
        self.root = root
        init_node(root, site_name="a")
        self.audit = open_audit(root)

    def entries(self):
        return own_entries(self.root)

    def ledger(self, budget=3.0, accountant="rdp") -> PrivacyLedger:
        return PrivacyLedger.open(self.root, self.audit, self.entries(), epsilon_budget=budget,
                                  accountant=accountant)

    def events(self, name):
        return [e for e in self.entries() if e.event == name]


@pytest.fixture
def node(tmp_path):
    return Node(tmp_path / "state")


def test_a_new_ledger_audits_its_budget_first_and_keeps_it_for_later_plans(node):
    ledger = node.ledger(budget=3.0)
    assert ledger.spent(DELTA) == 0.0 and ledger.budget == 3.0
    assert [e.details["epsilon_budget"] for e in node.events("privacy_budget_set")] == [3.0]
    ledger.reserve(seg(), DELTA, node.audit)
    again = node.ledger(budget=99.0)  # a later plan cannot raise the site's budget
    assert again.budget == 3.0 and again.segments[0].steps == 50


def test_every_spend_is_in_the_signed_log_before_the_ledger(node):
    ledger = node.ledger(budget=10.0)
    after = ledger.reserve(seg(0.2, 1.1, 30, round=4), DELTA, node.audit)
    (spent,) = node.events("privacy_spent")
    assert spent.details | {"epsilon_after": None} == {
        "round": 4, "plan_sha256": PLAN, "mechanism": "dp-sgd", "sample_rate": 0.2,
        "noise_multiplier": 1.1, "steps": 30, "delta": DELTA, "epsilon_after": None}
    assert spent.details["epsilon_after"] == pytest.approx(after) == pytest.approx(ledger.spent(DELTA))


def test_segments_compose_like_one_opacus_accountant(node):
    ledger = node.ledger(budget=50.0)
    for s in (seg(0.1, 1.2, 30), seg(0.2, 2.0, 40), seg(0.1, 1.2, 10)):
        ledger.reserve(s, DELTA, node.audit)
    acc = RDPAccountant()
    for q, sigma, n in ((0.1, 1.2, 30), (0.2, 2.0, 40), (0.1, 1.2, 10)):
        for _ in range(n):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    assert ledger.spent(DELTA) == pytest.approx(acc.get_epsilon(delta=DELTA), rel=1e-9)


def test_a_study_evaluates_the_sites_history_at_its_own_delta(node):
    ledger = node.ledger(budget=50.0)
    ledger.reserve(seg(0.1, 1.2, 100), DELTA, node.audit)
    # A plan approved at delta 1e-8 (e.g. 500,000 patients) is charged more for the same history.
    assert ledger.spent(1e-8) > ledger.spent(DELTA) * 1.2


def test_ledger_epsilon_agrees_with_the_rdp_formula_computed_independently():
    segments = [seg(0.05, 1.1, 200), seg(0.3, 3.0, 25)]
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    rdp = sum(compute_rdp(q=s.sample_rate, noise_multiplier=s.noise_multiplier, steps=s.steps, orders=orders)
              for s in segments)
    eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=DELTA)
    assert epsilon_of(segments, DELTA) == pytest.approx(eps, rel=1e-9)
    # The PRV accountant is tighter than RDP, never looser, on the same segments.
    assert epsilon_of(segments, DELTA, "prv") <= eps * 1.01


def test_a_release_over_budget_is_refused_and_nothing_is_recorded(node):
    ledger = node.ledger(budget=1.0)
    with pytest.raises(BudgetExhausted, match="privacy budget exhausted: epsilon 0.000 of 1 spent"):
        ledger.reserve(seg(0.5, 0.6, 500), DELTA, node.audit)
    assert ledger.segments == [] and node.events("privacy_spent") == []
    assert json.loads((node.root / LEDGER_FILE).read_text())["segments"] == []


def test_a_crash_between_log_and_ledger_over_counts_and_stops_the_node(node, monkeypatch):
    ledger = node.ledger(budget=10.0)
    ledger.reserve(seg(), DELTA, node.audit)
    before = (node.root / LEDGER_FILE).read_bytes()

    def crash(*_a, **_k):
        raise OSError("disk died mid-write")

    monkeypatch.setattr("twinfed.atomic.os.replace", crash)
    with pytest.raises(OSError):
        ledger.reserve(seg(steps=7), DELTA, node.audit)
    monkeypatch.undo()
    assert (node.root / LEDGER_FILE).read_bytes() == before  # atomic: the old ledger, whole
    assert not [p for p in node.root.iterdir() if p.name.startswith(f".{LEDGER_FILE}")]
    # The log has the spend, the ledger not: the node refuses until the ledger is rebuilt.
    with pytest.raises(LedgerError, match="holds 1 spending.*the audit log 2"):
        node.ledger()
    rebuilt = rebuild_from_log(node.root, node.entries())
    assert [s.steps for s in rebuilt.segments] == [50, 7]


@pytest.mark.parametrize("edit, message", [
    (lambda d: d | {"segments": []}, "holds 0 spending"),
    (lambda d: d | {"epsilon_budget": 1000.0}, "budget 1000"),
    (None, "is missing"),
])
def test_a_ledger_emptied_raised_or_deleted_by_hand_is_refused(node, edit, message):
    ledger = node.ledger(budget=3.0)
    ledger.reserve(seg(), DELTA, node.audit)
    path = node.root / LEDGER_FILE
    if edit is None:
        path.unlink()
    else:
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(LedgerError, match=message):
        node.ledger()


def test_a_corrupt_ledger_is_an_error_not_a_fresh_budget(node):
    (node.root / LEDGER_FILE).write_text('{"version": 2, "epsilon_budget": 3')
    with pytest.raises(LedgerError, match="not a valid privacy ledger"):
        node.ledger()


def test_a_version_one_ledger_is_adopted_into_the_log_once(node):
    (node.root / LEDGER_FILE).write_text(json.dumps({
        "version": 1, "accountant": "rdp", "epsilon_budget": 3.0, "delta": DELTA,
        "segments": [{"sample_rate": 0.25, "noise_multiplier": 5.0, "steps": 10, "plan_sha256": PLAN,
                      "round": 1, "recorded_at": ""}]}))
    ledger = node.ledger(budget=8.0)
    assert ledger.budget == 3.0 and len(ledger.segments) == 1
    assert len(node.events("privacy_spent")) == 1 and len(node.events("privacy_budget_set")) == 1
    assert node.ledger().segments == ledger.segments  # now it agrees with the log


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


def test_the_sample_rate_comes_from_the_released_count_and_the_plans_batch():
    assert sample_rate(1000, 128) == 0.128
    assert sample_rate(1003, 128) == pytest.approx(128 / 1003)  # no rounding to whole batches
    assert sample_rate(50, 128) == 1.0 and sample_rate(0, 128) == 1.0
