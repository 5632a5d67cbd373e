"""A plan has one identity: the SHA-256 of its canonical JSON. A node audits every instruction it
refuses, a malformed one included; it trains only a plan whose canonical hash is the hash the
instruction names, and logs and charges under that one hash. A signed plan's fields are strictly
typed (a "5" is not a 5, a "yes" is not true), and it names only what is implemented."""

from __future__ import annotations

import json

import pytest

from builders import write_site
from twinfed.client.gate import serve
from twinfed.client.node import NodeConfig
from twinfed.governance.approvals import approve_plan
from twinfed.governance.layout import state_paths
from twinfed.governance.node_state import init_node
from twinfed.models.plan import ModelConfig, TrainingConfig, TrainingPlan, parse_any_plan
from twinfed.models.spec import load_spec
from twinfed.models.surrogate import build_surrogate, get_weights
from twinfed.privacy.secagg import SecAggView, required_setup
from twinfed.wire import INSTRUCTION_KEY, LogHead, RoundInstruction

COORD = LogHead(seq=4, hash="ab" * 32)


def _plan() -> TrainingPlan:
    return TrainingPlan(spec=load_spec("glucose"), rounds=2, model=ModelConfig(hidden=8),
                        training=TrainingConfig(local_steps=2, batch_size=4))


@pytest.fixture()
def node(tmp_path) -> NodeConfig:
    site = write_site(tmp_path / "site", n_patients=5, n_steps=60)
    init_node(tmp_path / "state", site_name="a", site_data=site)
    return NodeConfig(site_name="a", site_data=site, state_dir=tmp_path / "state")


def _events(node) -> list[dict]:
    return [json.loads(x) for x in state_paths(node.state_dir).audit.read_text().splitlines()]


def _serve(node, plan, config):
    shares, threshold = required_setup(3, plan)
    weights = get_weights(build_surrogate(plan.spec, plan.model, seed=plan.seed))
    return serve(node, config, weights,
                       secagg=SecAggView(masked=True, sampled=3, shares=shares, threshold=threshold))


def _raw_instruction(plan_json: str, plan_sha256: str) -> dict:
    """An instruction as a coordinator could put it on the wire, unchecked."""
    return {INSTRUCTION_KEY: json.dumps({"plan_json": plan_json, "plan_sha256": plan_sha256, "round": 1,
                                         "coordinator": COORD.model_dump()})}


def test_an_instruction_whose_plan_does_not_hash_to_its_hash_is_refused_and_audited(node):
    plan = _plan()
    approve_plan(node.state_dir, plan, actor="officer:test")
    result = _serve(node, plan, _raw_instruction(plan.canonical_json(), "cd" * 32))
    assert result.reply.refusal.code.value == "plan_malformed"
    assert result.reply.audit_head is not None  # the refusal is in the node's log
    refused = [e["details"] for e in _events(node) if e["event"] == "round_refused"]
    assert [(r["plan_sha256"], r["round"], r["refusal"]["code"]) for r in refused] == \
        [("cd" * 32, 1, "plan_malformed")]
    assert not (node.state_dir / "privacy_ledger.json").exists()


def test_an_instruction_that_does_not_parse_is_audited_under_no_plan(node):
    plan = _plan()
    result = _serve(node, plan, {INSTRUCTION_KEY: "{not json"})
    assert result.reply.refusal.code.value == "plan_malformed" and result.reply.audit_head is not None
    refused = [e["details"] for e in _events(node) if e["event"] == "round_refused"]
    assert [(r["plan_sha256"], r["round"]) for r in refused] == [("0" * 64, 0)]


def test_a_re_serialised_approved_plan_is_refused_and_nothing_is_charged(node):
    plan = _plan()
    approve_plan(node.state_dir, plan, actor="officer:test")
    text = json.dumps(json.loads(plan.canonical_json()), indent=1)  # the same plan, other bytes
    import hashlib

    sha = hashlib.sha256(text.encode()).hexdigest()
    result = _serve(node, plan, RoundInstruction(plan_json=text, plan_sha256=sha, round=1,
                                                 coordinator=COORD).to_config())
    assert result.reply.refusal.code.value == "plan_malformed"
    assert not (node.state_dir / "privacy_ledger.json").exists()
    assert not [e for e in _events(node) if e["event"] in ("privacy_spent", "round_joined")]


def test_every_entry_of_an_admitted_round_and_its_ledger_segments_carry_the_plans_one_hash(node):
    plan = _plan()
    approve_plan(node.state_dir, plan, actor="officer:test")
    result = _serve(node, plan, RoundInstruction(plan_json=plan.canonical_json(), plan_sha256=plan.sha256(),
                                                 round=1, coordinator=COORD).to_config())
    assert result.reply.status == "ok"
    hashes = {e["details"]["plan_sha256"] for e in _events(node) if "plan_sha256" in e["details"]}
    assert hashes == {plan.sha256()}
    ledger = json.loads((node.state_dir / "privacy_ledger.json").read_text())
    assert {s["plan_sha256"] for s in ledger["segments"]} == {plan.sha256()}


# -- strict types on a signed plan ------------------------------------------------------------------

def _doc() -> dict:
    return json.loads(_plan().canonical_json())


@pytest.mark.parametrize("path, value", [
    (("rounds",), "5"), (("rounds",), 5.0), (("seed",), "0"), (("seed",), True),
    (("privacy", "enabled"), "yes"), (("privacy", "enabled"), 1),
    (("privacy", "secure_aggregation"), "true"), (("privacy", "epsilon"), "3"),
    (("training", "local_steps"), "2"), (("training", "learning_rate"), "0.01"),
    (("privacy", "secagg", "min_sites"), 3.0), (("model", "hidden"), "8"),
])
def test_a_training_plan_with_a_loosely_typed_field_does_not_validate(path, value):
    doc = _doc()
    where = doc
    for key in path[:-1]:
        where = where[key]
    where[path[-1]] = value
    with pytest.raises(ValueError):
        TrainingPlan.model_validate_json(json.dumps(doc))
    with pytest.raises(ValueError):
        parse_any_plan(json.dumps(doc))


def test_whole_numbers_are_numbers_where_a_plan_takes_a_real():
    doc = _doc()
    doc["privacy"]["epsilon"] = 3
    doc["training"]["learning_rate"] = 1
    with pytest.raises(ValueError):  # lt=1: the bound, not the type, refuses it
        TrainingPlan.model_validate_json(json.dumps(doc))
    doc["training"]["learning_rate"] = 0.01
    assert TrainingPlan.model_validate_json(json.dumps(doc)).privacy.epsilon == 3.0
    assert parse_any_plan(json.dumps(doc)).privacy.epsilon == 3.0


def test_a_plan_names_only_the_strategy_the_coordinator_implements():
    doc = _doc()
    assert doc["strategy"] == "fedavg"
    doc["strategy"] = "krum"
    with pytest.raises(ValueError, match="fedavg"):
        TrainingPlan.model_validate_json(json.dumps(doc))


def test_a_trial_plan_with_a_loosely_typed_privacy_field_does_not_validate():
    from builders import TINY_ARMS
    from twinfed.models.arms import parse_design
    from twinfed.models.trial_plan import TrialPlan, TrialTwin

    plan = _plan()
    design = parse_design(TINY_ARMS, plan.spec)
    doc = json.loads(TrialPlan(design=design, twin=TrialTwin(training_plan_json=plan.canonical_json(),
                                                             weights_sha256="ab" * 32)).canonical_json())
    assert TrialPlan.model_validate_json(json.dumps(doc)).sha256()
    for key, value in (("enabled", "yes"), ("secure_aggregation", 1), ("epsilon", "1.0")):
        bad = json.loads(json.dumps(doc))
        bad["privacy"][key] = value
        with pytest.raises(ValueError):
            TrialPlan.model_validate_json(json.dumps(bad))
        with pytest.raises(ValueError):
            parse_any_plan(json.dumps(bad))


def test_a_re_serialised_approved_trial_plan_is_refused_and_audited_under_the_hash_it_claims(node):
    import hashlib

    from builders import TINY_ARMS
    from twinfed.client.gate import serve
    from twinfed.models.arms import parse_design
    from twinfed.models.digest import weights_sha256
    from twinfed.models.trial_plan import TrialPlan, TrialTwin
    from twinfed.wire import TrialInstruction

    training = _plan()
    weights = get_weights(build_surrogate(training.spec, training.model, seed=training.seed))
    plan = TrialPlan(design=parse_design(TINY_ARMS, training.spec),
                     twin=TrialTwin(training_plan_json=training.canonical_json(),
                                    weights_sha256=weights_sha256(weights)))
    approve_plan(node.state_dir, plan, actor="officer:test")
    text = json.dumps(json.loads(plan.canonical_json()), indent=1)
    sha = hashlib.sha256(text.encode()).hexdigest()
    shares, threshold = required_setup(3, plan)
    result = serve(node, TrialInstruction(plan_json=text, plan_sha256=sha, coordinator=COORD).to_config(),
                           weights, secagg=SecAggView(masked=True, sampled=3, shares=shares, threshold=threshold))
    assert result.reply.refusal.code.value == "plan_malformed"
    refused = [e["details"] for e in _events(node) if e["event"] == "round_refused"]
    assert [(r["plan_sha256"], r["refusal"]["code"]) for r in refused] == [(sha, "plan_malformed")]
    assert not (node.state_dir / "privacy_ledger.json").exists()
