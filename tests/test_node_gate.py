"""The node's governance gate, round by round, without the Flower engine."""

import json

import pytest

from builders import write_site
from twinfed.client.gate import serve_round
from twinfed.client.node import NodeConfig
from twinfed.governance.approvals import approve_plan
from twinfed.governance.node_state import init_node
from twinfed.models.plan import ModelConfig, PrivacyConfig, TrainingConfig, TrainingPlan
from twinfed.models.spec import load_spec
from twinfed.models.surrogate import build_surrogate, get_weights

COORD = {"seq": 4, "hash": "ab" * 32}


def _plan(**privacy) -> TrainingPlan:
    return TrainingPlan(spec=load_spec("glucose"), rounds=2, model=ModelConfig(hidden=8),
                        training=TrainingConfig(local_steps=2, batch_size=4),
                        privacy=PrivacyConfig(**privacy))


@pytest.fixture()
def node(tmp_path):
    site = write_site(tmp_path / "site", n_patients=5, n_steps=60)
    init_node(tmp_path / "state", site_name="a", site_data=site)
    return NodeConfig(site_name="a", site_data=site, state_dir=tmp_path / "state")


def _events(node) -> list[dict]:
    return [json.loads(x) for x in (node.state_dir / "audit.jsonl").read_text().splitlines()]


def _serve(node, plan, *, masked=True):
    weights = get_weights(build_surrogate(plan.spec, plan.model, seed=plan.seed))
    return serve_round(node, plan.canonical_json(), weights, 1, masked=masked, coordinator=COORD)


def test_an_unapproved_plan_is_refused_before_any_patient_data_is_read(node):
    (node.site_data / "timeseries.csv").write_text("not,a,valid,export\n")  # never reached
    reply = _serve(node, _plan())
    assert reply.outcome is None and "not approved" in reply.reason
    events = [e["event"] for e in _events(node)]
    assert events[-3:] == ["model_received", "plan_refused", "round_refused"]
    assert reply.audit_head == {"seq": _events(node)[-1]["seq"], "hash": _events(node)[-1]["hash"]}
    assert _events(node)[-1]["details"]["coordinator"] == COORD


def test_a_plan_requiring_secure_aggregation_is_refused_in_an_unmasked_round(node):
    plan = _plan()
    approve_plan(node.state_dir, plan, actor="officer:test")
    reply = _serve(node, plan, masked=False)
    assert reply.outcome is None and "not SecAgg+" in reply.reason
    assert not (node.state_dir / "privacy_ledger.json").exists()


def test_an_approved_round_trains_records_its_spend_and_sends_only_the_update(node):
    plan = _plan()
    approve_plan(node.state_dir, plan, actor="officer:test")
    reply = _serve(node, plan)
    assert reply.outcome is not None and reply.outcome.patients_used == 5
    joined = next(e for e in _events(node) if e["event"] == "round_joined")["details"]
    assert 0 < joined["epsilon_spent"] <= joined["epsilon_budget"] == 3.0
    assert joined["coordinator"] == COORD and _events(node)[-1]["event"] == "model_sent"
    ledger = json.loads((node.state_dir / "privacy_ledger.json").read_text())
    assert len(ledger["segments"]) == 1 and ledger["segments"][0]["steps"] == 2


def test_a_round_over_budget_is_refused_and_the_exhaustion_is_audited(node):
    plan = _plan(epsilon=0.5)
    approve_plan(node.state_dir, plan, actor="officer:test")
    assert _serve(node, plan).outcome is not None
    bigger = _plan(epsilon=0.6)  # a second study on a site whose 0.5 is nearly spent
    approve_plan(node.state_dir, bigger, actor="officer:test")
    reply = _serve(node, bigger)
    assert reply.outcome is None and reply.reason.startswith("privacy budget exhausted")
    assert [e["event"] for e in _events(node)][-2:] == ["budget_exhausted", "round_refused"]


def test_an_uninitialised_node_refuses_with_the_command_to_run(tmp_path):
    site = write_site(tmp_path / "site", n_patients=3, n_steps=60)
    node = NodeConfig(site_name="a", site_data=site, state_dir=tmp_path / "state")
    reply = _serve(node, _plan())
    assert reply.outcome is None and reply.audit_head is None and "twinfed node init" in reply.reason
