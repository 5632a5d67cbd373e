"""The site's privacy budget is an (epsilon, delta) pair: every release is checked and reported
at the budget's delta, and a release asking for a larger delta is refused, by code."""

import json

import pytest

from builders import audit_events, new_node, open_ledger, own_entries, refusal_code, small_plan, trial_plan
from test_node_gate import _serve
from twinfed.cli.main import main
from twinfed.client.refusals import refusal_for
from twinfed.governance.approvals import approve_plan
from twinfed.governance.layout import open_audit
from twinfed.governance.node_state import init_node
from twinfed.ledger_file import LEDGER_FILE, Segment, read_ledger
from twinfed.models.trial_plan import TrialPrivacy
from twinfed.privacy.ledger import DeltaExceedsBudget, epsilon_of, set_budget
from twinfed.wire import RefusalCode

PLAN = "cd" * 32


def _seg(steps=50, **kw) -> Segment:
    return Segment(sample_rate=0.1, noise_multiplier=1.5, steps=steps, plan_sha256=PLAN, round=1, **kw)


def _budget_events(root) -> list[dict]:
    return [e.details for e in own_entries(root) if e.event == "privacy_budget_set"]


def test_a_new_ledger_keeps_the_first_plans_epsilon_and_delta_in_the_file_and_the_log(tmp_path):
    ledger = open_ledger(tmp_path / "s", epsilon=3.0, delta=1e-6)
    assert (ledger.budget, ledger.delta) == (3.0, 1e-6)
    assert json.loads((tmp_path / "s" / LEDGER_FILE).read_text())["delta_budget"] == 1e-6
    assert _budget_events(tmp_path / "s") == [{"epsilon_budget": 3.0, "delta_budget": 1e-6, "accountant": "rdp"}]
    # A later plan changes neither.
    assert open_ledger(tmp_path / "s", epsilon=9.0, delta=1e-2).delta == 1e-6


def test_a_release_asking_a_larger_delta_than_the_budgets_is_refused_with_its_own_code(tmp_path):
    ledger = open_ledger(tmp_path / "s", epsilon=3.0, delta=1e-5)
    with pytest.raises(DeltaExceedsBudget, match="delta 0.01.*budget is epsilon 3 at delta 1e-05"):
        ledger.reserve(_seg(), 1e-2, open_audit(tmp_path / "s"))
    assert ledger.segments == [] and not [e for e in own_entries(tmp_path / "s") if e.event == "privacy_spent"]
    with pytest.raises(DeltaExceedsBudget) as caught:
        ledger.check(_seg(), 1e-2)
    assert refusal_for(caught.value).code == RefusalCode.DELTA_EXCEEDS_BUDGET


def test_spending_is_checked_and_recorded_at_the_budgets_delta_whatever_the_release_asks(tmp_path):
    root = tmp_path / "s"
    ledger = open_ledger(root, epsilon=50.0, delta=1e-3)
    after = ledger.reserve(_seg(), 1e-7, open_audit(root))  # a stricter release is accepted...
    # ...and, like every other, counted at the budget's delta.
    assert after == pytest.approx(epsilon_of([_seg()], 1e-3)) == pytest.approx(ledger.spent())
    (spent,) = [e.details for e in own_entries(root) if e.event == "privacy_spent"]
    assert spent["delta"] == 1e-3 and spent["epsilon_after"] == pytest.approx(after)
    assert ledger.remaining() == pytest.approx(50.0 - after)


def test_the_case_of_the_issue_a_site_at_2_99_of_3_cannot_spend_more_by_asking_delta_1e_2(tmp_path):
    root = tmp_path / "s"
    ledger = open_ledger(root, epsilon=3.0, delta=1e-5)
    big = Segment(sample_rate=0.05, noise_multiplier=1.6, steps=300, plan_sha256=PLAN, round=1)  # 2.89
    ledger.reserve(big, 1e-5, open_audit(root))
    assert 2.8 < ledger.spent() <= 3.0
    trial = Segment(sample_rate=1.0, noise_multiplier=2.0, steps=1, plan_sha256=PLAN, round=1,
                    mechanism="gaussian-sum")
    assert epsilon_of([big, trial], 1e-2) < 3.0 < epsilon_of([big, trial], 1e-5)  # what the old check let through
    with pytest.raises(DeltaExceedsBudget):
        ledger.reserve(trial, 1e-2, open_audit(root))
    assert ledger.spent() <= 3.0


def test_a_ledger_and_a_log_written_before_delta_was_part_of_the_budget_read_as_delta_1e_5(
        tmp_path, monkeypatch):
    from twinfed import events

    root = tmp_path / "s"
    init_node(root, site_name="a")
    monkeypatch.delitem(events.EVENTS, "privacy_budget_set")  # the old event had no delta_budget
    open_audit(root).append("privacy_budget_set", {"epsilon_budget": 3.0, "accountant": "rdp"})
    monkeypatch.undo()
    (root / LEDGER_FILE).write_text(json.dumps({"version": 2, "accountant": "rdp", "epsilon_budget": 3.0,
                                                "segments": []}))
    assert read_ledger(root).delta_budget == 1e-5
    ledger = open_ledger(root, epsilon=7.0, delta=1e-3)  # file and log agree; the plan sets nothing
    assert (ledger.budget, ledger.delta) == (3.0, 1e-5)


def test_set_budget_sets_epsilon_and_delta_together_and_keeps_the_delta_when_not_given(tmp_path):
    root = tmp_path / "s"
    open_ledger(root, epsilon=3.0, delta=1e-5).reserve(_seg(), 1e-5, open_audit(root))
    state = set_budget(root, 5.0, actor="officer:t", delta=1e-6)
    assert (state.epsilon_budget, state.delta_budget) == (5.0, 1e-6)
    assert _budget_events(root)[-1] == {"epsilon_budget": 5.0, "delta_budget": 1e-6, "accountant": "rdp"}
    state = set_budget(root, 6.0, actor="officer:t")
    assert (state.epsilon_budget, state.delta_budget) == (6.0, 1e-6)
    assert open_ledger(root).delta == 1e-6  # the node opens what the officer set


def test_ledger_set_budget_and_show_on_the_command_line_carry_the_delta(tmp_path, capsys):
    root = tmp_path / "s"
    open_ledger(root, epsilon=3.0, delta=1e-5).reserve(_seg(), 1e-5, open_audit(root))
    assert main(["ledger", "set-budget", "--state", str(root), "--epsilon", "4", "--delta", "1e-6",
                 "--actor", "officer:t"]) == 0
    assert "delta 1e-06" in capsys.readouterr().out
    assert main(["ledger", "show", "--state", str(root)]) == 0
    out = capsys.readouterr().out
    assert "budget: epsilon 4 at delta 1e-06 (rdp)" in out
    assert main(["ledger", "show", "--state", str(root), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["delta_budget"] == 1e-6 and data["delta"] == 1e-6
    assert data["epsilon_spent"] == pytest.approx(epsilon_of([_seg()], 1e-6))
    assert main(["ledger", "set-budget", "--state", str(root), "--epsilon", "4", "--delta", "2",
                 "--actor", "officer:t"]) == 1


def test_a_study_asking_a_larger_delta_than_the_sites_budget_is_refused_before_anything_is_charged(tmp_path):
    node = new_node(tmp_path, budget=(3.0, 1e-5))
    loose = small_plan(epsilon=1.0, delta=1e-2)
    approve_plan(node.state_dir, loose, actor="officer:test")
    assert refusal_code(_serve(node, loose)) == "delta_exceeds_budget"
    assert not [e for e in audit_events(node) if e["event"] == "privacy_spent"]


def test_the_first_dp_plan_sets_the_budget_to_its_epsilon_and_delta(tmp_path):
    node = new_node(tmp_path)
    plan = small_plan(epsilon=1.0, delta=1e-6)
    approve_plan(node.state_dir, plan, actor="officer:test")
    result = _serve(node, plan)
    assert result.reply.status == "ok"
    state = read_ledger(node.state_dir)
    assert (state.epsilon_budget, state.delta_budget) == (1.0, 1e-6)
    assert {e["details"]["delta"] for e in audit_events(node) if e["event"] == "privacy_spent"} == {1e-6}
    assert result.reply.released.privacy.site_epsilon_spent == pytest.approx(
        epsilon_of(state.segments, 1e-6))


def test_a_trials_delta_is_capped_at_one_over_the_sites_released_count():
    assert TrialPrivacy(delta=0.1).delta_for(50) == pytest.approx(1 / 50)
    assert TrialPrivacy(delta=1e-5).delta_for(50) == 1e-5
    assert TrialPrivacy(delta=0.1).delta_for(0) == 0.1  # at least one patient


def test_a_trial_asking_delta_1e_2_at_a_site_budgeted_at_1e_5_is_refused_by_the_node(tmp_path):
    from builders import charge_trial

    node = new_node(tmp_path, budget=(3.0, 1e-5))
    audit = open_audit(node.state_dir)
    with pytest.raises(DeltaExceedsBudget):
        charge_trial(node, trial_plan(1e-2), audit=audit)
    assert not [e for e in audit_events(node) if e["event"] == "privacy_spent"]
    # At the budget's delta it runs, and its figures are the budget's.
    _, aggregate = charge_trial(node, trial_plan(1e-5), audit=audit)
    assert aggregate.delta == 1e-5 and aggregate.epsilon <= 0.5 + 1e-6
    ledger = read_ledger(node.state_dir)
    assert aggregate.site_epsilon_spent == pytest.approx(epsilon_of(ledger.segments, 1e-5))
