"""Only contributors count towards a SecAgg+ minimum sum, at the coordinator and at every node.

On the real Flower simulation engine (real SecAgg+): three sites, two of which refuse the round
(the plan is not approved there). A refusing node withdraws from the masked round instead of
sending a masked zero, so it is no contributor for anyone. The coordinator here skips its own
minimum-sum rule (it holds itself to a sum of one site); the nodes are unchanged, and the lone
training site's update must still never be unmasked.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import ray.cloudpickle

import twinfed.server.secagg_workflow as secagg_workflow
from builders import write_site
from twinfed.governance.provision import provision_simulated_node
from twinfed.governance.verify import verify_path
from twinfed.models.plan import ModelConfig, PrivacyConfig, SecAggConfig, TrainingConfig, TrainingPlan
from twinfed.models.spec import load_spec
from twinfed.models.surrogate import build_surrogate, get_weights
from twinfed.models.twin import Twin
from twinfed.server.secagg_workflow import TwinSecAggPlusWorkflow
from twinfed.simulate import SiteRef, run_simulated_study

pytestmark = [pytest.mark.slow, pytest.mark.studies]
# The probe below travels to Ray's workers by value, not by module name.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

OPERATOR = "operator:test"


def _plan(**privacy) -> TrainingPlan:
    return TrainingPlan(spec=load_spec("glucose"), rounds=1, seed=3, model=ModelConfig(hidden=8),
                        training=TrainingConfig(local_steps=2, batch_size=4), privacy=PrivacyConfig(**privacy))


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


class Sent:
    """Saves, per node, the update its training function returned (``inner``) or the masked
    vector that left it (``outer``)."""

    def __init__(self, out: Path, kind: str):
        self.out, self.kind = out, kind

    def __call__(self, msg, ctxt, call_next):
        from flwr.common import parameters_to_ndarrays
        from flwr.compat.common import recorddict_compat as compat

        pid = int(ctxt.node_config["partition-id"])
        configs = msg.content.config_records.get("secaggplus_configs")
        stage = configs.get("stage") if configs is not None else None  # the SecAgg+ mod pops it
        reply = call_next(msg, ctxt)
        if self.kind == "inner":
            fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
            np.savez(self.out / f"update-{pid}.npz", *parameters_to_ndarrays(fitres.parameters))
        elif stage == "collect_masked_vectors":
            (self.out / f"masked-{pid}").touch()
        return reply


def _flat(arrays) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])


def test_a_withdrawn_node_is_no_part_of_the_sum_the_others_unmask(sites, tmp_path):
    # The plan accepts a sum of two sites; c refuses and withdraws: the round unmasks the mean of
    # a's and b's updates exactly (Flower removes c's pairwise masks with the survivors' shares).
    plan, state, run, sent = _plan(secagg=SecAggConfig(min_sites=2)), tmp_path / "nodes", tmp_path / "run", tmp_path / "sent"
    sent.mkdir()
    _provision(sites, state, plan, approved={"a", "b"})
    summary = run_simulated_study(plan, sites, run, progress=lambda m: None, state_root=state, approve_as=None,
                                  outer_mods=[Sent(sent, "outer")], inner_mods=[Sent(sent, "inner")])
    h = summary["history"][0]
    assert (h["skipped"], h["sites_trained"], h["sites_refused"], h["failures"]) == (False, 2, 1, 0)
    assert summary["sites"]["c"]["refusals"][0]["code"] == "plan_not_approved"
    assert {p.name for p in sent.glob("masked-*")} == {"masked-0", "masked-1"}  # nothing left c
    assert not (sent / "update-2.npz").exists()
    with np.load(sent / "update-0.npz") as a, np.load(sent / "update-1.npz") as b:
        mean = (_flat(a[k] for k in sorted(a.files, key=lambda k: int(k.split("_")[1])))
                + _flat(b[k] for k in sorted(b.files, key=lambda k: int(k.split("_")[1])))) / 2
    init = get_weights(build_surrogate(plan.spec, plan.model, seed=plan.seed))
    change = _flat(get_weights(Twin.load(run).surrogate)) - _flat(init)
    step = 2 * plan.privacy.update_clip / 2**22
    assert np.abs(mean).max() > 100 * step
    assert np.abs(change - mean).max() <= 2 * step + 1e-6
    aggregated = [e["details"] for e in _events(run / "coordinator" / "audit.jsonl") if e["event"] == "round_aggregated"]
    assert list(aggregated[0]["sites_refused"]) == ["c"] and aggregated[0]["failures"] == 0
    assert verify_path(run, node_states=state).ok
