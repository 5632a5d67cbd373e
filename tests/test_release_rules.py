"""The rules of a node's releases of aggregates (a trial's sums, a study's calibration), at the
node's boundary without the Flower engine:

- once a release is charged, nothing data-dependent refuses it: a trial or a calibration over no
  usable patient releases the noisy zero vector (an empty site looks like any other);
- a study is calibrated once per plan at a node, and only for the weights the node recorded at
  the study's end; both refused before anything is charged.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from builders import TINY_ARMS, write_site
from twinfed.client.gate import serve
from twinfed.client.node import NodeConfig
from twinfed.governance.approvals import approve_plan
from twinfed.governance.layout import open_audit, state_paths
from twinfed.governance.node_state import init_node
from twinfed.models.digest import weights_sha256
from twinfed.models.plan import (CalibrationConfig, ModelConfig, PrivacyConfig, TrainingConfig,
                                 TrainingPlan)
from twinfed.models.spec import load_spec
from twinfed.models.surrogate import build_surrogate, get_weights
from twinfed.privacy.secagg import SecAggView, required_setup
from twinfed.wire import LogHead, RoundInstruction, TrialInstruction

COORD = LogHead(seq=4, hash="ab" * 32)
TRIAL_PURPOSE = "in-silico-trial"


def _masked(plan) -> SecAggView:
    shares, threshold = required_setup(3, plan)
    return SecAggView(masked=True, sampled=3, shares=shares, threshold=threshold)


def _node(root, *, n_patients=5) -> NodeConfig:
    spec = load_spec("glucose")
    site = write_site(root / "site", n_patients=n_patients, n_steps=60)
    lines = (site / "consent.csv").read_text().splitlines()
    lines += [f"p{p},granted,{TRIAL_PURPOSE},2026-01-01T00:00:00Z" for p in range(n_patients)]
    (site / "consent.csv").write_text("\n".join(lines) + "\n")
    assert spec.purpose != TRIAL_PURPOSE
    init_node(root / "state", site_name="a", site_data=site)
    return NodeConfig(site_name="a", site_data=site, state_dir=root / "state")


def _events(node) -> list[dict]:
    return [json.loads(x) for x in state_paths(node.state_dir).audit.read_text().splitlines()]


def _ledger(node) -> bytes | None:
    path = node.state_dir / "privacy_ledger.json"
    return path.read_bytes() if path.exists() else None


def _code(result) -> str | None:
    return result.reply.refusal.code.value if result.reply.refusal else None


# -- 1. charged, then never refused for what the data holds -------------------------------------

def _trial_plan(start_hours: float):
    from twinfed.models.arms import parse_design
    from twinfed.models.trial_plan import TrialPlan, TrialPrivacy, TrialTwin

    training = TrainingPlan(spec=load_spec("glucose"), rounds=1, model=ModelConfig(hidden=8),
                            training=TrainingConfig(local_steps=2, batch_size=4))
    weights = get_weights(build_surrogate(training.spec, training.model, seed=training.seed))
    design = parse_design(TINY_ARMS.replace("start_hours = 48", f"start_hours = {start_hours}"),
                          training.spec)
    plan = TrialPlan(design=design, twin=TrialTwin(training_plan_json=training.canonical_json(),
                                                   weights_sha256=weights_sha256(weights)),
                     privacy=TrialPrivacy(epsilon=1.0))
    return plan, weights


def test_a_charged_trial_with_no_patient_whose_record_reaches_its_start_releases_noisy_zeros(tmp_path):
    node = _node(tmp_path)  # 60 five-minute steps: every record ends at hour 5
    plan, weights = _trial_plan(start_hours=1000)
    approve_plan(node.state_dir, plan, actor="officer:test")
    config = TrialInstruction(plan_json=plan.canonical_json(), plan_sha256=plan.sha256(),
                              coordinator=COORD).to_config()
    result = serve(node, config, weights, secagg=_masked(plan))
    assert _code(result) is None and result.reply.status == "ok"
    aggregate = result.reply.released.aggregate
    assert aggregate.kind == "trial" and aggregate.epsilon > 0
    assert np.any(result.update[0])  # the noise of a zero vector, not zeros
    released = [e["details"] for e in _events(node) if e["event"] == "aggregate_released"]
    assert [(r["patients_used"], r["kind"]) for r in released] == [(0, "trial")]
    spent = [e for e in _events(node) if e["event"] == "privacy_spent"]
    assert [e["details"]["plan_sha256"] for e in spent] == [plan.sha256()]


def _calibrated_plan(holdout_fraction=0.25) -> TrainingPlan:
    return TrainingPlan(spec=load_spec("glucose"), rounds=1, model=ModelConfig(hidden=8),
                        training=TrainingConfig(local_steps=2, batch_size=4), privacy=PrivacyConfig(),
                        calibration=CalibrationConfig(holdout_fraction=holdout_fraction))


def _train(node, plan):
    weights = get_weights(build_surrogate(plan.spec, plan.model, seed=plan.seed))
    cfg = RoundInstruction(plan_json=plan.canonical_json(), plan_sha256=plan.sha256(), round=1,
                           coordinator=COORD).to_config()
    result = serve(node, cfg, weights, secagg=_masked(plan))
    assert result.reply.status == "ok", result.reply
    return [w + u for w, u in zip(weights, result.update)]


def _calibrate(node, plan, weights, *, server_round=None):
    cfg = RoundInstruction(plan_json=plan.canonical_json(), plan_sha256=plan.sha256(),
                           round=server_round or plan.rounds + 1, coordinator=COORD,
                           stage="calibrate").to_config()
    return serve(node, cfg, weights, secagg=_masked(plan))


def test_a_calibration_with_no_held_out_patient_releases_noisy_zeros(tmp_path):
    from twinfed.models.calibration import held_out

    node = _node(tmp_path, n_patients=6)
    plan = next(p for p in (_calibrated_plan(f) for f in (0.01, 0.02, 0.03, 0.05))
                if not held_out(p.sha256(), [f"p{i}" for i in range(6)],
                                p.calibration.holdout_fraction).any())
    approve_plan(node.state_dir, plan, actor="officer:test")
    final = _train(node, plan)
    result = _calibrate(node, plan, final)
    assert result.reply.status == "ok" and result.reply.released.aggregate.kind == "calibration"
    assert np.any(result.update[0])
    released = [e["details"] for e in _events(node) if e["event"] == "aggregate_released"]
    assert [r["patients_used"] for r in released] == [0]


# -- 2. one calibration per study, for the weights the study ended with ---------------------------

@pytest.fixture()
def trained(tmp_path):
    node = _node(tmp_path, n_patients=8)
    plan = _calibrated_plan()
    approve_plan(node.state_dir, plan, actor="officer:test")
    return node, plan, _train(node, plan)


def _finish(node, plan, weights) -> None:
    """The node's own record of the study's end (what boundary._finish writes)."""
    from twinfed.events import StudyFinished

    open_audit(node.state_dir).append(StudyFinished(
        plan_sha256=plan.sha256(), rounds=plan.rounds, rounds_with_update=plan.rounds,
        weights_sha256=weights_sha256(weights), weights_file_sha256="cd" * 32, coordinator=COORD))


def test_a_study_is_calibrated_once_and_a_second_calibration_is_refused_before_any_charge(trained):
    node, plan, final = trained
    assert _calibrate(node, plan, final).reply.status == "ok"
    ledger = _ledger(node)
    again = _calibrate(node, plan, final)
    assert _code(again) == "already_released" and again.reply.released is None
    assert not np.any(again.update[0])
    assert _ledger(node) == ledger
    refused = [e["details"] for e in _events(node) if e["event"] == "round_refused"]
    assert [r["refusal"]["code"] for r in refused] == ["already_released"]
    assert [e["details"]["kind"] for e in _events(node) if e["event"] == "aggregate_released"] == \
        ["calibration"]


def test_after_the_studys_end_only_the_weights_it_ended_with_are_calibrated(trained):
    node, plan, final = trained
    _finish(node, plan, final)
    ledger = _ledger(node)
    zeros = [np.zeros_like(w) for w in final]
    other = _calibrate(node, plan, zeros)
    assert _code(other) == "model_mismatch" and _ledger(node) == ledger
    assert _calibrate(node, plan, final).reply.status == "ok"


def test_a_calibration_before_the_studys_last_round_is_refused_before_any_charge(trained):
    node, plan, final = trained
    ledger = _ledger(node)
    early = _calibrate(node, plan, final, server_round=plan.rounds)
    assert _code(early) == "plan_malformed" and _ledger(node) == ledger
