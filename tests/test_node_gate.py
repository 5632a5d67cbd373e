"""The node's boundary, round by round, without the Flower engine: admit, audit, reply."""

import json
import multiprocessing as mp

import pytest

from builders import (COORD, MASKED, audit_events, edit_csv, new_node, own_entries, refusal_code, round_config,
                      small_plan, start_weights, write_site)
from twinfed.client import session
from twinfed.client.gate import serve
from twinfed.client.node import NodeConfig
from twinfed.governance.approvals import approve_plan
from twinfed.governance.layout import state_paths
from twinfed.governance.node_state import init_node
from twinfed.models.plan import SecAggConfig, TrainingPlan
from twinfed.privacy.secagg import SecAggView
from twinfed.wire import RELEASE, NodeHead


@pytest.fixture()
def node(tmp_path):
    return new_node(tmp_path)


def _serve(node, plan, *, secagg=MASKED, server_round=1):
    return serve(node, round_config(plan, server_round=server_round), start_weights(plan), secagg=secagg)


def _leaf_paths(obj, prefix=""):
    if obj is None:
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaf_paths(v, f"{prefix}{k}.")
    elif isinstance(obj, list):
        for v in obj:
            yield from _leaf_paths(v, prefix)
    else:
        yield prefix[:-1]


def test_an_unapproved_plan_is_refused_before_any_patient_data_is_read(node):
    (node.site_data / "timeseries.csv").write_text("not,a,valid,export\n")  # never reached
    result = _serve(node, small_plan())
    assert refusal_code(result) == "plan_not_approved" and result.reply.status == "refused"
    events = audit_events(node)
    assert [e["event"] for e in events][-3:] == ["model_received", "plan_refused", "round_refused"]
    assert result.reply.audit_head == NodeHead(hash=events[-1]["hash"])
    assert events[-1]["details"]["coordinator"] == COORD.model_dump()
    assert all((u == 0).all() for u in result.update)


def test_a_hand_added_approval_is_not_an_approval(node):
    plan = small_plan()
    other = new_node(node.state_dir.parent / "elsewhere")  # approved there, copied here by hand
    approve_plan(other.state_dir, plan, actor="officer:o")
    state_paths(node.state_dir).approvals.write_bytes(state_paths(other.state_dir).approvals.read_bytes())
    assert refusal_code(_serve(node, plan)) == "plan_not_approved"
    assert not (node.state_dir / "privacy_ledger.json").exists()


def test_a_plan_requiring_secure_aggregation_is_refused_in_an_unmasked_round(node):
    plan = small_plan()
    approve_plan(node.state_dir, plan, actor="officer:test")
    assert refusal_code(_serve(node, plan, secagg=SecAggView(masked=False))) == "not_masked"
    assert not (node.state_dir / "privacy_ledger.json").exists()


@pytest.mark.parametrize("view,privacy", [
    # Under the default assumptions (10% corrupt, 10% dropping out, 2^-40):
    (SecAggView(True, sampled=10, shares=3, threshold=2), {}),  # runbook's min-nodes 3: a ring of
    # 3 is cut by one corrupt and one dropped node, so the coordinator would learn partial sums
    (SecAggView(True, sampled=100, shares=21, threshold=10), {}),  # 10 corrupt could be neighbours
    (SecAggView(True, sampled=1000, shares=1000, threshold=26), {}),  # more shares, same threshold
    (SecAggView(True, sampled=2, shares=2, threshold=2), {}),
    # What the default plan accepts, a plan assuming 30% corrupt sites refuses.
    (SecAggView(True, sampled=10, shares=5, threshold=3), {"secagg": SecAggConfig(corrupt_fraction=0.3)}),
])
def test_a_round_whose_secagg_setup_is_weaker_than_the_plans_assumptions_is_refused(node, view, privacy):
    plan = small_plan(**privacy)
    approve_plan(node.state_dir, plan, actor="officer:test")
    assert refusal_code(_serve(node, plan, secagg=view)) == "secagg_setup_weak"
    assert audit_events(node)[-1]["details"]["refusal"] == {"code": "secagg_setup_weak", "file": None,
                                                             "row": None, "column": None}
    assert not (node.state_dir / "privacy_ledger.json").exists()


@pytest.mark.parametrize("sampled,shares,threshold", [(10, 5, 3), (100, 21, 11), (1000, 45, 26),
                                                      (1000, 1000, 101), (4, 4, 2)])
def test_a_setup_meeting_the_plans_assumptions_is_not_weak(sampled, shares, threshold):
    from twinfed.privacy.secagg import required_setup, weaker_than_plan

    plan = small_plan()
    assert weaker_than_plan(plan, sampled=sampled, shares=shares, threshold=threshold) is None
    k, t = required_setup(sampled, plan)  # the coordinator's choice passes the nodes' check
    assert weaker_than_plan(plan, sampled=sampled, shares=k, threshold=t) is None


def test_an_approved_round_reserves_its_spend_before_training_and_replies_only_the_allow_list(node):
    plan = small_plan()
    approve_plan(node.state_dir, plan, actor="officer:test")
    result = _serve(node, plan)
    assert result.reply.status == "ok"
    events = audit_events(node)
    names = [e["event"] for e in events]
    assert names.index("privacy_spent") < names.index("round_joined") < names.index("model_sent")
    # Exact counts stay in the node's own log; the reply carries the once-released noisy ones.
    joined = next(e for e in events if e["event"] == "round_joined")["details"]
    assert (joined["patients_used"], joined["patients_excluded"]) == (5, 0)
    calibrated = next(e for e in events if e["event"] == "study_calibrated")["details"]
    counts = result.reply.released.counts
    assert (counts.patients_used, counts.patients_excluded) == \
        (calibrated["released_patients_used"], calibrated["released_patients_excluded"])
    assert 0 < joined["epsilon_spent"] <= joined["epsilon_budget"] == 3.0
    reply = json.loads(result.reply.model_dump_json())
    assert set(_leaf_paths(reply)) <= set(RELEASE)
    assert "loss" not in result.reply.model_dump_json()
    ledger = json.loads((node.state_dir / "privacy_ledger.json").read_text())
    assert [s["mechanism"] for s in ledger["segments"]] == ["gaussian-count", "dp-sgd"]


def test_a_deployed_node_refuses_a_plan_without_dp_and_a_simulated_one_trains_it(tmp_path):
    plan = small_plan(enabled=False)
    real, simulated = new_node(tmp_path / "real"), new_node(tmp_path / "sim", simulated=True)
    for n in (real, simulated):
        approve_plan(n.state_dir, plan, actor="officer:test")
    assert refusal_code(_serve(real, plan)) == "dp_required"
    result = _serve(simulated, plan)
    assert result.reply.status == "ok" and result.reply.released.privacy is None
    assert result.reply.released.counts is None  # nothing DP to release: the counts are withheld


def test_a_round_over_budget_is_refused_and_the_exhaustion_is_audited(node):
    plan = small_plan(epsilon=0.5)
    approve_plan(node.state_dir, plan, actor="officer:test")
    assert _serve(node, plan).reply.status == "ok"
    bigger = small_plan(epsilon=0.6)  # a second study on a site whose 0.5 is nearly spent
    approve_plan(node.state_dir, bigger, actor="officer:test")
    assert refusal_code(_serve(node, bigger)) == "budget_exhausted"
    assert [e["event"] for e in audit_events(node)][-2:] == ["budget_exhausted", "round_refused"]


@pytest.mark.parametrize("edit", ["empty", "raise", "delete"])
def test_a_node_whose_ledger_was_edited_refuses_to_train(node, edit):
    plan = small_plan(rounds=3)
    approve_plan(node.state_dir, plan, actor="officer:test")
    assert _serve(node, plan).reply.status == "ok"
    path = node.state_dir / "privacy_ledger.json"
    data = json.loads(path.read_text())
    if edit == "delete":
        path.unlink()
    else:
        path.write_text(json.dumps(data | ({"segments": []} if edit == "empty" else {"epsilon_budget": 1000})))
    assert refusal_code(_serve(node, plan, server_round=2)) == "ledger_mismatch"


def test_a_data_error_leaves_the_node_as_file_row_and_column_only(node):
    plan = small_plan()
    approve_plan(node.state_dir, plan, actor="officer:test")
    edit_csv(node.site_data / "timeseries.csv", 10, "glucose_mgdl", "777.125")
    result = _serve(node, plan)
    refusal = result.reply.refusal
    assert (refusal.code.value, refusal.file, refusal.row, refusal.column) == \
        ("data_invalid", "timeseries.csv", 10, "glucose_mgdl")
    for text in (result.reply.model_dump_json(), state_paths(node.state_dir).audit.read_text()):
        assert "777.125" not in text and str(node.state_dir) not in text and str(node.site_data) not in text


def test_an_unexpected_exception_becomes_a_coded_refusal_and_its_text_stays_home(node, monkeypatch, capsys):
    plan = small_plan()
    approve_plan(node.state_dir, plan, actor="officer:test")

    def boom(*_a, **_k):
        raise RuntimeError("patient p3 glucose 512.25")

    monkeypatch.setattr(session, "train_admitted", boom)
    monkeypatch.setattr("twinfed.client.kinds.training.train_admitted", boom)
    result = _serve(node, plan)
    assert refusal_code(result) == "internal_error"
    for text in (result.reply.model_dump_json(), state_paths(node.state_dir).audit.read_text()):
        assert "512.25" not in text and "p3" not in text
    assert "patient p3 glucose 512.25" in capsys.readouterr().err  # the node's own console only


def test_a_crash_during_training_keeps_the_spend_and_saves_no_optimizer_state(node, monkeypatch):
    plan = small_plan()
    approve_plan(node.state_dir, plan, actor="officer:test")

    def crash(*_a, **_k):
        raise MemoryError("killed mid-training")

    monkeypatch.setattr("twinfed.privacy.dp.run_steps", crash)
    assert refusal_code(_serve(node, plan)) == "internal_error"
    ledger = json.loads((node.state_dir / "privacy_ledger.json").read_text())
    assert [s["round"] for s in ledger["segments"] if s["mechanism"] == "dp-sgd"] == [1]
    assert not session.optimizer_state(node, plan).exists()


def test_an_uninitialised_node_refuses_without_an_audit_head(tmp_path):
    site = write_site(tmp_path / "site", n_patients=3, n_steps=60)
    node = NodeConfig(site_name="a", site_data=site, state_dir=tmp_path / "state")
    result = _serve(node, small_plan())
    assert refusal_code(result) == "node_not_initialised" and result.reply.audit_head is None


def test_a_node_with_no_consented_patient_refuses_before_spending(tmp_path):
    site = write_site(tmp_path / "site", n_patients=3, n_steps=60, consent="withdrawn")
    init_node(tmp_path / "state", site_name="a", site_data=site)
    node = NodeConfig(site_name="a", site_data=site, state_dir=tmp_path / "state")
    plan = small_plan()
    approve_plan(node.state_dir, plan, actor="officer:test")
    assert refusal_code(_serve(node, plan)) == "no_eligible_patients"
    assert not (node.state_dir / "privacy_ledger.json").exists()


def _serve_in_process(node_json, plan_json, barrier, out):
    node, plan = NodeConfig.model_validate_json(node_json), TrainingPlan.model_validate_json(plan_json)
    barrier.wait()
    out.put(_serve(node, plan).reply.status)


def test_two_studies_at_once_on_one_node_never_overspend_its_budget(node):
    from twinfed.governance.layout import open_audit
    from twinfed.ledger_file import read_ledger
    from twinfed.privacy.ledger import PrivacyLedger

    plans = [small_plan(epsilon=2.0, rounds=1), small_plan(epsilon=2.0, rounds=2)]
    for p in plans:
        approve_plan(node.state_dir, p, actor="officer:test")
    # The site's budget is 3 (as if set by an earlier plan); each study alone would fit in it.
    PrivacyLedger.open(node.state_dir, open_audit(node.state_dir), own_entries(node.state_dir),
                       epsilon_budget=3.0)
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_serve_in_process, args=(node.model_dump_json(), p.model_dump_json(),
                                                         barrier, out)) for p in plans]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    statuses = sorted(out.get(timeout=5) for _ in procs)
    assert statuses == ["ok", "refused"]  # both were willing; only one fitted in the budget
    ledger = read_ledger(node.state_dir)
    assert len({s.plan_sha256 for s in ledger.segments}) == 1
    spends = [e.details for e in own_entries(node.state_dir) if e.event == "privacy_spent"]
    assert len(spends) == len(ledger.segments) and spends[-1]["epsilon_after"] <= 3.0 * (1 + 1e-6)


def test_each_plan_is_accounted_at_its_own_delta(tmp_path):
    node = new_node(tmp_path, n_patients=5)
    first, strict = small_plan(epsilon=1.0), small_plan(epsilon=1.0, delta=1e-8)  # e.g. for 500,000 patients
    for p in (first, strict):
        approve_plan(node.state_dir, p, actor="officer:test")
    assert _serve(node, first).reply.status == "ok"  # the site's budget is now 1, from this plan
    from twinfed.privacy.ledger import set_budget

    set_budget(node.state_dir, 3.0, actor="officer:test", delta=1e-8)  # the officer raises it
    result = _serve(node, strict)
    assert result.reply.status == "ok" and result.reply.released.privacy.delta == 1e-8
    spends = [e["details"] for e in audit_events(node) if e["event"] == "privacy_spent"]
    assert {d["delta"] for d in spends if d["plan_sha256"] == strict.sha256()} == {1e-8}
