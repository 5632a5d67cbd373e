"""Only contributors count towards a SecAgg+ minimum sum, at the coordinator and at every node.

On the real Flower simulation engine (real SecAgg+): three sites, two of which refuse the round
(the plan is not approved there). A refusing node withdraws from the masked round instead of
sending a masked zero, so it is no contributor for anyone. The coordinator here skips its own
minimum-sum rule (it holds itself to a sum of one site); the nodes are unchanged, and the lone
training site's update must still never be unmasked.
"""

import json

import numpy as np
import pytest

import twinfed.server.secagg_workflow as secagg_workflow
from builders import write_site
from twinfed.governance.provision import provision_simulated_node
from twinfed.governance.verify import verify_path
from twinfed.models.plan import ModelConfig, TrainingConfig, TrainingPlan
from twinfed.models.spec import load_spec
from twinfed.models.surrogate import build_surrogate, get_weights
from twinfed.models.twin import Twin
from twinfed.server.secagg_workflow import TwinSecAggPlusWorkflow
from twinfed.simulate import SiteRef, run_simulated_study

pytestmark = [pytest.mark.slow, pytest.mark.studies]

OPERATOR = "operator:test"


def _plan() -> TrainingPlan:
    return TrainingPlan(spec=load_spec("glucose"), rounds=1, seed=3, model=ModelConfig(hidden=8),
                        training=TrainingConfig(local_steps=2, batch_size=4))


def _events(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _with_min_sites(plan: TrainingPlan, n: int) -> TrainingPlan:
    secagg = plan.privacy.secagg.model_copy(update={"min_sites": n})  # below what a plan may say
    return plan.model_copy(update={"privacy": plan.privacy.model_copy(update={"secagg": secagg})})


class SkipsItsMinimumSum(TwinSecAggPlusWorkflow):
    """A coordinator that holds itself to a minimum sum of one site; the plan it sends is the
    approved one, so the nodes hold to the plan's minimum."""

    def __init__(self, plan, **kw):
        super().__init__(plan, **kw)
        self.plan = _with_min_sites(plan, 1)


class AlsoIgnoresTheThreshold(SkipsItsMinimumSum):
    """...and goes on to the unmask stage however few masked vectors arrived."""

    def _check_threshold(self, state) -> bool:
        return True


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    root = tmp_path_factory.mktemp("sites")
    return [SiteRef(n, write_site(root / n, n_patients=8, n_steps=80, seed=i)) for i, n in enumerate("abc")]


def _provision(sites, state, plan, approved: set[str]) -> None:
    for s in sites:
        provision_simulated_node(state / s.name, site_name=s.name, site_data=s.data_dir,
                                 plan=plan if s.name in approved else None, operator=OPERATOR)


def _unchanged(plan, run) -> bool:
    init = get_weights(build_surrogate(plan.spec, plan.model, seed=plan.seed))
    final = get_weights(Twin.load(run).surrogate)
    return all(np.array_equal(a, b) for a, b in zip(init, final))


@pytest.mark.parametrize("coordinator", [SkipsItsMinimumSum, AlsoIgnoresTheThreshold])
def test_a_lone_training_site_is_never_unmasked_when_the_others_refuse(sites, tmp_path, monkeypatch,
                                                                        coordinator):
    monkeypatch.setattr(secagg_workflow, "TwinSecAggPlusWorkflow", coordinator)
    plan, state, run = _plan(), tmp_path / "nodes", tmp_path / "run"
    _provision(sites, state, plan, approved={"a"})
    summary = run_simulated_study(plan, sites, run, progress=lambda m: None, state_root=state,
                                  approve_as=None)
    assert _unchanged(plan, run)  # site a's update never reached the coordinator
    assert summary["rounds_with_update"] == 0 and summary["skipped_rounds"] == [1]
    # The refusals still reach the coordinator, coded, with the nodes' audit heads.
    for name in "bc":
        assert summary["sites"][name]["refusals"][0]["code"] == "plan_not_approved"
    assert summary["sites"]["a"]["rounds_joined"] == 1
    skipped = [e["details"] for e in _events(run / "coordinator" / "audit.jsonl") if e["event"] == "round_skipped"]
    assert len(skipped) == 1 and set(skipped[0]["sites_refused"]) == {"b", "c"}
    assert set(skipped[0]["node_heads"]) >= {"b", "c"}
    refused = [e["details"] for e in _events(state / "a" / "audit.jsonl") if e["event"] == "unmask_refused"]
    if coordinator is AlsoIgnoresTheThreshold:  # the lone site was asked for its shares, and withheld them
        assert [(d["contributors"], d["min_sites"]) for d in refused] == [(1, 3)]
    for name in "bc":  # a refusing node is never asked to unmask anything
        assert not any(e["event"] == "unmask_refused" for e in _events(state / name / "audit.jsonl"))
    report = verify_path(run, node_states=state)
    assert report.ok, report.issues


def test_with_all_three_training_the_round_is_unmasked(sites, tmp_path, monkeypatch):
    monkeypatch.setattr(secagg_workflow, "TwinSecAggPlusWorkflow", AlsoIgnoresTheThreshold)
    plan, state, run = _plan(), tmp_path / "nodes", tmp_path / "run"
    _provision(sites, state, plan, approved={"a", "b", "c"})
    summary = run_simulated_study(plan, sites, run, progress=lambda m: None, state_root=state,
                                  approve_as=None)
    assert summary["rounds_with_update"] == 1 and summary["skipped_rounds"] == []
    assert summary["history"][0]["sites_trained"] == 3 and summary["history"][0]["sites_refused"] == 0
    assert not _unchanged(plan, run)
    for name in "abc":
        assert not any(e["event"] == "unmask_refused" for e in _events(state / name / "audit.jsonl"))
