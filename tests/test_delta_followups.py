"""The budget's delta, followed through: 'audit verify' flags a spend recorded at a larger delta
than the budget in force (or past its epsilon), a release refused for its delta is audited like an
exhausted budget, and a round's figures name the delta its site totals are at, so the
coordinator's breakdown of a site's spend sums to its total."""

import json

import pytest

from audit_builders import PLAN_SHA, Clock
from builders import audit_events, new_node, open_ledger, own_entries, refusal_code, small_plan, trial_plan
from test_node_gate import _serve
from twinfed import events as ev
from twinfed.cli.main import main
from twinfed.governance.approvals import approve_plan
from twinfed.governance.layout import open_audit
from twinfed.governance.node_state import init_node
from twinfed.governance.verify import verify_path
from twinfed.ledger_file import LEDGER_FILE, LedgerState, Segment
from twinfed.privacy.ledger import SLACK, epsilon_of

# A trial's Gaussian sum: rate 1, one step.
TRIAL_SEG = dict(sample_rate=1.0, noise_multiplier=2.0, steps=1, plan_sha256=PLAN_SHA, round=1,
                 mechanism="gaussian-sum")


def _node_state(root, events: list, *, epsilon=3.0, delta=1e-5):
    """A node whose log holds ``events`` (budgets and spends) and whose ledger file agrees with it."""
    init_node(root, site_name="a")
    log = open_audit(root, clock=Clock())
    for e in events:
        log.append(*e) if isinstance(e, tuple) else log.append(e)
    segments = tuple(Segment(**TRIAL_SEG) for e in events if isinstance(e, ev.PrivacySpent))
    (root / LEDGER_FILE).write_text(LedgerState(epsilon_budget=epsilon, delta_budget=delta,
                                                segments=segments).model_dump_json())
    return root


def _spent(delta: float, epsilon_after: float) -> ev.PrivacySpent:
    return ev.PrivacySpent(**TRIAL_SEG, delta=delta, epsilon_after=epsilon_after)


def _reasons(root) -> list[tuple[int | None, str]]:
    return [(i.seq, i.reason) for i in verify_path(root).issues]


def test_verify_flags_a_spend_recorded_at_a_larger_delta_than_the_budget_in_force(tmp_path, capsys):
    root = _node_state(tmp_path / "s", [
        ev.PrivacyBudgetSet(epsilon_budget=3.0, delta_budget=1e-5, accountant="rdp"),  # seq 1
        _spent(1e-5, 1.0),  # seq 2: at the budget's delta
        _spent(1e-2, 2.0),  # seq 3: the old trial's delta, 1000 times the budget's
        _spent(1e-7, 2.5),  # seq 4: a smaller delta is always allowed
    ])
    (issue,) = _reasons(root)
    assert issue[0] == 3
    assert issue[1] == ("a spend was recorded at delta 0.01, larger than the budget's delta 1e-05 "
                        "(set at seq 1): its epsilon is not at the budget's delta")
    assert main(["audit", "verify", str(root)]) != 0
    out = capsys.readouterr()
    assert "seq 3: a spend was recorded at delta 0.01" in out.out + out.err


def test_the_budget_in_force_is_the_latest_set_before_the_spend(tmp_path):
    root = _node_state(tmp_path / "s", [
        ev.PrivacyBudgetSet(epsilon_budget=3.0, delta_budget=1e-5, accountant="rdp"),  # seq 1
        _spent(1e-3, 1.0),  # seq 2: over the delta in force then
        ev.PrivacyBudgetSet(epsilon_budget=5.0, delta_budget=1e-3, accountant="rdp"),  # seq 3
        _spent(1e-3, 4.0),  # seq 4: within the new budget, epsilon and delta alike
    ], epsilon=5.0, delta=1e-3)
    assert [seq for seq, _ in _reasons(root)] == [2]


def test_an_old_budget_event_without_delta_reads_as_1e_5(tmp_path, monkeypatch):
    monkeypatch.delitem(ev.EVENTS, "privacy_budget_set")  # the old event had no delta_budget
    root = _node_state(tmp_path / "s", [
        ("privacy_budget_set", {"epsilon_budget": 3.0, "accountant": "rdp"}),  # seq 1
        _spent(1e-5, 1.0),  # seq 2
        _spent(1e-4, 2.0),  # seq 3
    ])
    monkeypatch.undo()
    assert _reasons(root) == [(3, "a spend was recorded at delta 0.0001, larger than the budget's "
                                  "delta 1e-05 (set at seq 1): its epsilon is not at the budget's delta")]


def test_verify_flags_a_spend_past_the_budgets_epsilon_by_more_than_the_ledgers_slack(tmp_path):
    root = _node_state(tmp_path / "s", [
        ev.PrivacyBudgetSet(epsilon_budget=3.0, delta_budget=1e-5, accountant="rdp"),  # seq 1
        _spent(1e-5, 3.0 * (1 + SLACK / 2)),  # seq 2: float noise of a round landing on the budget
        _spent(1e-5, 3.0 * (1 + 3 * SLACK)),  # seq 3: over it
    ])
    (issue,) = _reasons(root)
    assert issue[0] == 3 and issue[1].startswith("a spend took the site to epsilon 3.000, over its budget "
                                                 "epsilon 3 at delta 1e-05 (set at seq 1)")


def test_a_release_refused_for_its_delta_is_audited_like_an_exhausted_budget(tmp_path):
    node = new_node(tmp_path, budget=(3.0, 1e-5))
    loose = small_plan(epsilon=1.0, delta=1e-2)
    approve_plan(node.state_dir, loose, actor="officer:test")
    assert refusal_code(_serve(node, loose)) == "delta_exceeds_budget"
    last = audit_events(node)[-2:]
    assert [e["event"] for e in last] == ["budget_exhausted", "round_refused"]
    assert [e["details"]["refusal"]["code"] for e in last] == ["delta_exceeds_budget"] * 2
    assert not [e for e in audit_events(node) if e["event"] == "privacy_spent"]


# --- a round's figures name the budget's delta -------------------------------------------------

STUDY_DELTA, BUDGET_DELTA = 1e-7, 1e-5


def _study_segments(plan):
    count = Segment(sample_rate=1.0, noise_multiplier=plan.privacy.count_noise, steps=1,
                    plan_sha256=plan.sha256(), round=0, mechanism="gaussian-count")
    rounds = [Segment(sample_rate=0.2, noise_multiplier=1.1, steps=2, plan_sha256=plan.sha256(), round=r)
              for r in (1, 2)]
    return [count, *rounds]


def _reply(plan, earlier: list[Segment]):
    """A node's ok reply after two rounds of a study at delta 1e-7 on a site budgeted at 1e-5,
    built by hand as the node computes it."""
    from twinfed.wire import DPPrivacy, DPSegment, NodeReply, Released

    mine = _study_segments(plan)
    privacy = DPPrivacy(
        epsilon=epsilon_of(mine, STUDY_DELTA), delta=STUDY_DELTA, accountant="rdp", noise_multiplier=1.1,
        sample_rate=0.2, clipping_norm=plan.privacy.clipping_norm,
        segments=tuple(DPSegment(sample_rate=s.sample_rate, noise_multiplier=s.noise_multiplier,
                                 steps=s.steps) for s in mine),
        site_epsilon_spent=epsilon_of([*earlier, *mine], BUDGET_DELTA), site_epsilon_budget=10.0,
        site_delta=BUDGET_DELTA)
    return NodeReply(site="a", status="ok", released=Released(steps=2, privacy=privacy))


@pytest.mark.parametrize("earlier", [[], [Segment(**TRIAL_SEG)]], ids=["first-study", "after-a-trial"])
def test_the_coordinators_breakdown_of_a_rounds_figures_sums_to_the_total_at_the_budgets_delta(earlier):
    from twinfed.server.app import released_spend

    plan = small_plan(epsilon=1.0, delta=STUDY_DELTA)
    reply = _reply(plan, earlier)
    spend = released_spend(plan, json.loads(reply.released.privacy.model_dump_json()), None)
    total = epsilon_of([*earlier, *_study_segments(plan)], BUDGET_DELTA)
    assert spend.epsilon == pytest.approx(total) and spend.delta == BUDGET_DELTA
    assert sum(p.epsilon for p in spend.by_kind) == pytest.approx(total, rel=1e-9)
    parts = {p.kind: p.epsilon for p in spend.by_kind}
    assert parts["count"] == pytest.approx(epsilon_of(_study_segments(plan)[:1], BUDGET_DELTA))
    if earlier:  # what the site's total holds beyond this study's releases, all at the budget's delta
        assert parts["earlier"] == pytest.approx(total - epsilon_of(_study_segments(plan), BUDGET_DELTA))
    else:
        assert "earlier" not in parts  # nothing made up from the gap between two deltas
    assert f"at delta {BUDGET_DELTA:.2g}" in spend.label()


def test_a_reply_from_a_node_that_does_not_name_its_budgets_delta_still_reads():
    from twinfed.server.app import released_spend

    plan = small_plan(epsilon=1.0, delta=STUDY_DELTA)
    privacy = json.loads(_reply(plan, []).released.privacy.model_dump_json())
    del privacy["site_delta"]
    assert released_spend(plan, privacy, None).delta == STUDY_DELTA  # as before: the study's


def test_the_site_delta_is_on_the_wire_allow_list_as_declared():
    from twinfed.wire import DECLARED, RELEASE

    assert RELEASE["released.privacy.site_delta"] == DECLARED
    assert RELEASE["released.aggregate.site_delta"] == DECLARED


def test_a_nodes_round_and_trial_figures_name_the_budgets_delta(tmp_path):
    from builders import charge_trial
    from twinfed.privacy.ledger import PrivacyLedger
    from twinfed.privacy.study import StudyPrivacy, released_privacy

    root = tmp_path / "s"
    plan = small_plan(epsilon=1.0, delta=STUDY_DELTA)
    ledger = open_ledger(root, epsilon=10.0, delta=BUDGET_DELTA)
    for seg in _study_segments(plan):
        ledger.reserve(seg, STUDY_DELTA, open_audit(root))
    study = StudyPrivacy(plan_sha256=plan.sha256(), released_used=50, released_excluded=0, count_noise=1.0,
                         n_released=50, sample_rate=0.2, expected_batch=10, noise_multiplier=1.1,
                         delta=STUDY_DELTA, target_epsilon=1.0, planned_steps=4, calibrated_at="")
    ledger = PrivacyLedger.open(root, open_audit(root), own_entries(root), epsilon_budget=10.0)
    privacy = released_privacy(ledger, study, plan)
    assert (privacy.delta, privacy.site_delta) == (STUDY_DELTA, BUDGET_DELTA)
    assert privacy.site_epsilon_spent == pytest.approx(epsilon_of(_study_segments(plan), BUDGET_DELTA))

    node = new_node(tmp_path / "n", budget=(3.0, 1e-5))
    _, aggregate = charge_trial(node, trial_plan(1e-5))
    assert aggregate.site_delta == 1e-5
