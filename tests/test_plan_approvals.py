"""Plan approval: only an approved, unrevoked plan passes the gate; every change is audited."""

import json

import pytest

from twinfed.errors import PlanError, PlanNotApproved
from twinfed.governance.approvals import (approve_plan, find_approval, is_approved, list_approvals,
                                          load_plan_file, require_approved, revoke_plan,
                                          standing_approvals)
from twinfed.governance.audit_log import verify_log_entries
from twinfed.governance.keys import load_public_key
from twinfed.governance.layout import state_paths
from twinfed.governance.node_state import init_node
from twinfed.governance.verify import verify_path
from twinfed.models.plan import TrainingPlan
from twinfed.models.spec import load_spec


@pytest.fixture
def state(tmp_path):
    init_node(tmp_path / "state", site_name="a")
    return tmp_path / "state"


def _plan(rounds: int = 3) -> TrainingPlan:
    return TrainingPlan(spec=load_spec("glucose"), rounds=rounds)


def _events(state):
    return [json.loads(line)["event"] for line in state_paths(state).audit.read_text().splitlines()]


def test_an_unknown_plan_is_refused(state):
    approve_plan(state, _plan(3), actor="officer:o")
    other = _plan(4).sha256()
    assert not is_approved(state, other)
    with pytest.raises(PlanNotApproved, match="is not approved at this node.*twinfed plan approve"):
        require_approved(state, other)


def test_an_approved_plan_passes_the_gate_byte_for_byte(state):
    plan = _plan()
    a = approve_plan(state, plan, actor="officer:o")
    assert a.sha256 == plan.sha256() and a.plan_json == plan.canonical_json()
    assert require_approved(state, plan.sha256()) == plan
    assert _events(state)[-1] == "plan_approved"


def test_a_revoked_plan_is_refused_and_the_revocation_audited(state):
    plan = _plan()
    approve_plan(state, plan, actor="officer:o")
    revoke_plan(state, plan.sha256()[:12], actor="officer:o")
    with pytest.raises(PlanNotApproved, match="was revoked"):
        require_approved(state, plan.sha256())
    assert _events(state)[-2:] == ["plan_approved", "plan_revoked"]
    assert [a.active for a in list_approvals(state)] == [False]


def test_revoking_a_plan_never_approved_is_an_error(state):
    with pytest.raises(PlanNotApproved, match="no plan deadbeef was ever approved"):
        revoke_plan(state, "deadbeef", actor="officer:o")
    with pytest.raises(PlanError, match="not a plan hash"):
        find_approval(state, "xyz")


def test_an_edited_approvals_file_is_rejected(state):
    plan = _plan()
    approve_plan(state, plan, actor="officer:o")
    path = state_paths(state).approvals
    data = json.loads(path.read_text())
    data["plans"][plan.sha256()]["plan_json"] = _plan(50).canonical_json()
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError, match="does not hash to its key"):
        is_approved(state, plan.sha256())


def _hand_add(state, approved: TrainingPlan, sneaky: TrainingPlan) -> None:
    """Copy ``sneaky`` into approvals.json under its own valid hash, as someone editing the file would."""
    path = state_paths(state).approvals
    data = json.loads(path.read_text())
    entry = dict(data["plans"][approved.sha256()], sha256=sneaky.sha256(),
                 plan_json=sneaky.canonical_json())
    data["plans"][sneaky.sha256()] = entry
    path.write_text(json.dumps(data))


def test_verify_flags_an_approval_made_outside_twinfed(state, tmp_path):
    plan = _plan()
    approve_plan(state, plan, actor="officer:o")
    _hand_add(state, plan, _plan(99))
    report = verify_path(state)
    assert not report.ok
    assert any("no standing plan_approved event" in i.reason for i in report.issues)


def test_a_plan_file_is_read_from_a_model_directory(tmp_path):
    (tmp_path / "run" / "model").mkdir(parents=True)
    (tmp_path / "run" / "model" / "plan.json").write_text(_plan().canonical_json())
    assert load_plan_file(tmp_path / "run") == _plan()
    (tmp_path / "bad.json").write_text('{"rounds": 3, "colour": "red"}')
    with pytest.raises(PlanError, match="bad.json: not a valid training plan"):
        load_plan_file(tmp_path / "bad.json")


def test_a_hand_added_approval_is_refused_by_the_gate(state):
    plan, sneaky = _plan(), _plan(99)
    approve_plan(state, plan, actor="officer:o")
    _hand_add(state, plan, sneaky)
    assert is_approved(state, sneaky.sha256())  # the file alone says so
    with pytest.raises(PlanNotApproved) as exc:
        require_approved(state, sneaky.sha256())
    assert str(exc.value) == (f"plan {sneaky.sha256()[:16]}... is in approvals.json but the node's audit "
                              "log has no standing plan_approved event for it (an approval not made "
                              "through twinfed); the privacy officer must run 'twinfed audit verify' and "
                              "'twinfed plan approve'")
    assert require_approved(state, plan.sha256()) == plan


def test_a_plan_revoked_in_the_log_but_active_in_the_file_is_refused(state):
    plan = _plan()
    approve_plan(state, plan, actor="officer:o")
    saved = state_paths(state).approvals.read_bytes()
    revoke_plan(state, plan.sha256(), actor="officer:o")
    state_paths(state).approvals.write_bytes(saved)  # the revocation undone by restoring the file
    with pytest.raises(PlanNotApproved, match="no standing plan_approved event"):
        require_approved(state, plan.sha256())


def test_the_gate_refuses_when_the_audit_log_does_not_verify(state):
    plan = _plan()
    approve_plan(state, plan, actor="officer:o")
    log = state_paths(state).audit
    log.write_bytes(log.read_bytes().replace(b'"rounds":3', b'"rounds":4'))
    with pytest.raises(PlanNotApproved) as exc:
        require_approved(state, plan.sha256())
    assert str(exc.value) == (f"plan {plan.sha256()[:16]}... cannot be checked: this node's audit log "
                              "does not verify; the privacy officer must run 'twinfed audit verify' on "
                              "the node's state")


@pytest.mark.parametrize("remove", ["audit", "public_key"])
def test_the_gate_refuses_without_an_audit_log_or_its_key(state, remove):
    plan = _plan()
    approve_plan(state, plan, actor="officer:o")
    getattr(state_paths(state), remove).unlink()
    with pytest.raises(PlanNotApproved, match="cannot be checked.*'twinfed audit verify'"):
        require_approved(state, plan.sha256())


def test_gate_refusals_never_name_the_state_directory(state):
    plan, sneaky, other = _plan(), _plan(99), _plan(7)
    approve_plan(state, plan, actor="officer:o")
    _hand_add(state, plan, sneaky)
    revoked = _plan(5)
    approve_plan(state, revoked, actor="officer:o")
    revoke_plan(state, revoked.sha256(), actor="officer:o")
    messages = []
    for sha in (sneaky.sha256(), other.sha256(), revoked.sha256()):
        with pytest.raises(PlanNotApproved) as exc:
            require_approved(state, sha)
        messages.append(str(exc.value))
    state_paths(state).audit.write_bytes(b"")
    with pytest.raises(PlanNotApproved) as exc:
        require_approved(state, plan.sha256())
    messages.append(str(exc.value))
    assert all(str(state.parent) not in m for m in messages), messages


def test_the_gate_accepts_entries_the_caller_already_verified(state):
    plan, sneaky = _plan(), _plan(99)
    approve_plan(state, plan, actor="officer:o")
    _hand_add(state, plan, sneaky)
    p = state_paths(state)
    result, entries = verify_log_entries(p.audit, load_public_key(p.public_key))
    assert result.ok
    assert require_approved(state, plan.sha256(), entries=entries) == plan
    with pytest.raises(PlanNotApproved, match="no standing plan_approved event"):
        require_approved(state, sneaky.sha256(), entries=entries)


def test_standing_approvals_follow_each_plans_latest_event(state):
    a, b, c = _plan(1), _plan(2), _plan(3)
    for plan in (a, b, c):
        approve_plan(state, plan, actor="officer:o")
    revoke_plan(state, a.sha256(), actor="officer:o")
    revoke_plan(state, b.sha256(), actor="officer:o")
    approve_plan(state, b, actor="officer:o")
    p = state_paths(state)
    _, entries = verify_log_entries(p.audit, load_public_key(p.public_key))
    assert standing_approvals(entries) == {b.sha256(), c.sha256()}
    assert require_approved(state, b.sha256()) == b
