"""The node boundary on the real Flower simulation engine (real Opacus, real SecAgg+): what the
coordinator holds, a round with too few trained sites, and a study anchored at its end."""

import json
import shutil

import numpy as np
import pytest

from builders import write_site
from twinfed.governance.verify import verify_path
from twinfed.models.plan import ModelConfig, PrivacyConfig, TrainingConfig, TrainingPlan
from twinfed.models.spec import load_spec
from twinfed.models.surrogate import build_surrogate, get_weights
from twinfed.models.twin import Twin
from twinfed.simulate import SiteRef, run_simulated_study

pytestmark = [pytest.mark.slow, pytest.mark.studies]


def _plan(rounds=2, **privacy) -> TrainingPlan:
    return TrainingPlan(spec=load_spec("glucose"), rounds=rounds, seed=3, model=ModelConfig(hidden=8),
                        training=TrainingConfig(local_steps=2, batch_size=4), privacy=PrivacyConfig(**privacy))


def _events(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    root = tmp_path_factory.mktemp("sites")
    return [SiteRef(n, write_site(root / n, n_patients=8, n_steps=80, seed=i)) for i, n in enumerate("abc")]


@pytest.fixture(scope="module")
def finished(sites, tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    run_simulated_study(_plan(), sites, run, progress=lambda m: None)
    return run


def test_no_loss_and_no_exact_count_reaches_the_coordinator(finished):
    coordinator = (finished / "coordinator" / "audit.jsonl").read_text()
    summary = (finished / "summary.json").read_text()
    for text in (coordinator, summary):
        assert "loss" not in text
    assert "patients_used" not in coordinator
    exact = {e["details"]["patients_used"] for e in _events(finished / "nodes" / "a" / "audit.jsonl")
             if e["event"] == "round_joined"}
    calibrated = next(e["details"] for e in _events(finished / "nodes" / "a" / "audit.jsonl")
                      if e["event"] == "study_calibrated")
    assert exact == {8} and json.loads(summary)["sites"]["a"]["patients_used"] == \
        calibrated["released_patients_used"]


def test_the_end_of_the_study_is_anchored_on_both_sides(finished):
    report = verify_path(finished)
    assert report.ok, report.issues
    coord = _events(finished / "coordinator" / "audit.jsonl")
    assert [e["event"] for e in coord][-2:] == ["study_finished", "study_closed"]
    closed = coord[-1]["details"]["node_heads"]
    for site in "abc":
        last = _events(finished / "nodes" / site / "audit.jsonl")[-1]
        assert last["event"] == "study_finished" and last["details"]["coordinator"]["seq"] == coord[-2]["seq"]
        assert closed[site] == {"hash": last["hash"]}  # a node's head travels as its hash only


def _cut_after(path, keep):
    lines = path.read_text().splitlines(keepends=True)
    events = [json.loads(x) for x in lines]
    n = max(i for i, e in enumerate(events) if keep(e)) + 1
    path.write_text("".join(lines[:n]))


def test_removing_the_last_round_from_every_log_is_detected(finished, tmp_path):
    run = shutil.copytree(finished, tmp_path / "run")
    _cut_after(run / "coordinator" / "audit.jsonl",
               lambda e: e["event"] == "round_aggregated" and e["details"]["round"] == 1)
    for site in "abc":
        _cut_after(run / "nodes" / site / "audit.jsonl",
                   lambda e: e["event"] == "model_sent" and e["details"]["round"] == 1)
    report = verify_path(run)
    assert not report.ok
    reasons = " ".join(i.reason for i in report.issues)
    assert "has no study_finished" in reasons and "records no finished study" in reasons
    assert "the audit log 2" in reasons  # each ledger still holds round 2's spend


def test_a_swapped_weights_file_is_detected(finished, tmp_path):
    run = shutil.copytree(finished, tmp_path / "run")
    twin = Twin.load(run)
    weights = get_weights(twin.surrogate)
    weights[0] = weights[0] + 0.01
    Twin.from_weights(twin.plan, weights).save(run)
    report = verify_path(run)
    assert not report.ok
    assert any(i.file.endswith("weights.npz") and "replaced" in i.reason for i in report.issues)


@pytest.mark.parametrize("edit", ["empty", "raise", "delete"])
def test_a_ledger_edited_by_hand_fails_verification(finished, tmp_path, edit):
    run = shutil.copytree(finished, tmp_path / "run")
    path = run / "nodes" / "b" / "privacy_ledger.json"
    if edit == "delete":
        path.unlink()
    else:
        data = json.loads(path.read_text())
        path.write_text(json.dumps(data | ({"segments": []} if edit == "empty" else {"epsilon_budget": 1000})))
    report = verify_path(run)
    assert not report.ok and any(i.file == str(path) for i in report.issues)


def test_a_round_where_one_site_trained_is_never_unmasked_and_both_sides_audit_it(sites, tmp_path):
    state = tmp_path / "nodes"
    # b and c spend their whole budget first, in a study of their own (no SecAgg+: two sites).
    run_simulated_study(_plan(rounds=1, secure_aggregation=False), sites[1:], tmp_path / "first",
                        progress=lambda m: None, state_root=state)
    plan = _plan()
    summary = run_simulated_study(plan, sites, tmp_path / "run", progress=lambda m: None, state_root=state)
    assert summary["sites"]["a"]["rounds_joined"] == 2
    assert summary["sites"]["b"]["refusals"][0]["code"] == "budget_exhausted"
    assert summary["rounds_with_update"] == 0 and summary["skipped_rounds"] == [1, 2]
    assert all(h["skipped"] and h["sites_trained"] == 1 for h in summary["history"])
    init = get_weights(build_surrogate(plan.spec, plan.model, seed=plan.seed))
    final = get_weights(Twin.load(tmp_path / "run").surrogate)
    assert all(np.array_equal(a, b) for a, b in zip(init, final))  # site a's update was never applied
    skipped = [e["details"] for e in _events(tmp_path / "run" / "coordinator" / "audit.jsonl")
               if e["event"] == "round_skipped"]
    assert [(d["round"], d["code"], d["sites_trained"]) for d in skipped] == [(1, "too_few_trained", 1),
                                                                              (2, "too_few_trained", 1)]
    node_a = _events(state / "a" / "audit.jsonl")
    assert [e["details"]["round"] for e in node_a if e["event"] == "round_skipped"] == [1]
    assert node_a[-1]["event"] == "study_finished" and node_a[-1]["details"]["skipped_rounds"] == [1, 2]
    # The nodes served both runs; each run verifies against them, anchored to its own coordinator.
    for run in ("first", "run"):
        report = verify_path(tmp_path / run, node_states=state)
        assert report.ok, report.issues
        assert report.anchors_checked > 0
