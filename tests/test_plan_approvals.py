"""Plan approval: only an approved, unrevoked plan passes the gate; every change is audited."""

import json

import pytest

from twinfed.errors import PlanError, PlanNotApproved
from twinfed.governance.approvals import (approve_plan, find_approval, is_approved, list_approvals,
                                          load_plan_file, require_approved, revoke_plan)
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


def test_verify_flags_an_approval_made_outside_twinfed(state, tmp_path):
    plan = _plan()
    approve_plan(state, plan, actor="officer:o")
    sneaky = _plan(99)
    path = state_paths(state).approvals
    data = json.loads(path.read_text())
    entry = dict(data["plans"][plan.sha256()], sha256=sneaky.sha256(), plan_json=sneaky.canonical_json())
    data["plans"][sneaky.sha256()] = entry
    path.write_text(json.dumps(data))
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
