"""A node's log cannot be rolled back unseen, and what the coordinator anchors tells it nothing
about the node's other activity (issue 20, items 4 and 5).

The attack: keep the first lines of a node's audit.jsonl, delete privacy_ledger.json and
studies/. The log is then a clean, validly signed prefix of itself and the ledger "never
existed", so the gate would admit the same approved plan with a fresh budget and release the
counts again. Two things catch it:
- the node alone: its state.json records the newest log entry that changed the privacy ledger
  (a log without it was cut back), so the gate refuses and ``audit verify`` of the state fails;
- the coordinator: it sends each node the head of that node's log it last anchored, and a node
  whose log does not hold that entry refuses with ``log_rolled_back``.
"""

from __future__ import annotations

import json
import shutil

import pytest

from builders import (COORD, MASKED, audit_events, new_node, refusal_code, round_config, small_plan, start_weights,
                      write_site)
from twinfed.client.gate import serve
from twinfed.client.node import NodeConfig
from twinfed.governance.approvals import approve_plan
from twinfed.governance.consent_registry import withdraw
from twinfed.governance.layout import state_paths
from twinfed.governance.verify import verify_path
from twinfed.wire import RELEASE, NodeReply, RoundInstruction, field_paths, reply_field_table


def _plan(rounds=3, **privacy):
    return small_plan(rounds, **privacy)


def _serve(node, plan, *, server_round=1, anchor=None):
    return serve(node, round_config(plan, server_round=server_round, anchor=anchor), start_weights(plan),
                       secagg=MASKED)


def _roll_back(node, keep: int = 3) -> None:
    """What the reviewer did: the log's first ``keep`` lines, no ledger, no studies."""
    log = state_paths(node.state_dir).audit
    log.write_bytes(b"".join(ln + b"\n" for ln in log.read_bytes().split(b"\n")[:keep]))
    (node.state_dir / "privacy_ledger.json").unlink()
    shutil.rmtree(node.state_dir / "studies", ignore_errors=True)


@pytest.fixture()
def node(tmp_path):
    return new_node(tmp_path)


def test_a_rolled_back_node_refuses_the_coordinators_anchor_and_audits_it(node):
    plan = _plan()
    approve_plan(node.state_dir, plan, actor="officer:test")
    info = state_paths(node.state_dir).info.read_bytes()  # before any ledger: what a forger restores
    first = _serve(node, plan)
    assert first.reply.status == "ok" and first.reply.audit_head is not None
    _roll_back(node)
    state_paths(node.state_dir).info.write_bytes(info)  # and state.json as it was before the study
    result = _serve(node, plan, server_round=2, anchor=first.reply.audit_head)
    assert refusal_code(result) == "log_rolled_back"
    assert all((u == 0).all() for u in result.update) and result.reply.released is None
    assert not (node.state_dir / "privacy_ledger.json").exists()  # no fresh budget was opened
    last = audit_events(node)[-1]
    assert last["event"] == "round_refused" and last["details"]["refusal"]["code"] == "log_rolled_back"


def test_a_node_whose_log_holds_the_anchor_is_admitted(node):
    plan = _plan()
    approve_plan(node.state_dir, plan, actor="officer:test")
    first = _serve(node, plan)
    second = _serve(node, plan, server_round=2, anchor=first.reply.audit_head)
    assert second.reply.status == "ok", second.reply.refusal


def test_a_rolled_back_node_refuses_on_its_own_when_its_state_says_a_ledger_existed(node):
    plan = _plan()
    approve_plan(node.state_dir, plan, actor="officer:test")
    assert _serve(node, plan).reply.status == "ok"
    _roll_back(node)
    result = _serve(node, plan, server_round=2)  # no anchor from the coordinator at all
    assert refusal_code(result) == "log_rolled_back"
    assert not (node.state_dir / "privacy_ledger.json").exists()


def test_audit_verify_of_the_node_alone_fails_after_truncation_and_ledger_deletion(node):
    plan = _plan()
    approve_plan(node.state_dir, plan, actor="officer:test")
    assert _serve(node, plan).reply.status == "ok"
    assert verify_path(node.state_dir).ok
    _roll_back(node)
    report = verify_path(node.state_dir)
    assert not report.ok
    assert any("state.json" in i.reason and "truncated" in i.reason for i in report.issues), report.issues


def test_the_reply_carries_no_seq_of_the_nodes_log():
    assert "audit_head.seq" not in RELEASE
    assert "audit_head.seq" not in [f for f, _ in reply_field_table()]
    assert not [f for f in field_paths(NodeReply) if f.startswith("audit_head.") and f != "audit_head.hash"]


def test_a_consent_withdrawal_between_rounds_changes_only_the_hash_the_coordinator_receives(tmp_path):
    plan = _plan(enabled=False)  # no DP noise: two nodes' replies are otherwise alike
    quiet = new_node(tmp_path / "quiet", name="quiet", simulated=True)
    busy = new_node(tmp_path / "busy", name="busy", simulated=True)
    replies = {}
    for n in (quiet, busy):
        approve_plan(n.state_dir, plan, actor="officer:test")
        first = _serve(n, plan)
        assert first.reply.status == "ok"
        if n is busy:
            withdraw(n.state_dir, "p4", plan.purpose)  # one more entry in busy's log
        replies[n.site_name] = (first.reply, _serve(n, plan, server_round=2, anchor=first.reply.audit_head).reply)
    assert len(audit_events(busy)) > len(audit_events(quiet))  # the withdrawal is in busy's log
    for n in (quiet, busy):
        r1, r2 = replies[n.site_name]
        assert r2.status == "ok"
        head = r2.model_dump(mode="json")["audit_head"]
        assert head == {"hash": audit_events(n)[-1]["hash"]}  # the entry's hash and nothing else
    (_, q2), (_, b2) = replies[quiet.site_name], replies[busy.site_name]
    drop = {"site", "audit_head", "key_fingerprint"}
    assert q2.model_dump(exclude=drop) == b2.model_dump(exclude=drop)


# -- the coordinator's side -------------------------------------------------------------------

def _reply(site: str, fp: str, head: str | None) -> NodeReply:
    return NodeReply(site=site, status="ok", key_fingerprint=fp,
                     audit_head=None if head is None else {"hash": head})


def test_the_coordinator_sends_each_node_its_own_last_anchored_head_across_runs(tmp_path):
    from types import SimpleNamespace

    from flwr.common import FitIns, Parameters

    from twinfed.server.strategy import NodeAnchors

    plan = _plan()
    one = NodeAnchors.open(tmp_path / "runs" / "one" / "coordinator")
    one.record([_reply("a", "1a" * 32, "aa" * 32), _reply("b", "1b" * 32, "bb" * 32)])
    stored = (tmp_path / "runs" / "one" / "coordinator" / "node_anchors.json").read_text()
    assert "seq" not in stored and "aa" * 32 in stored
    two = NodeAnchors.open(tmp_path / "runs" / "two" / "coordinator")  # a later run beside it
    # node 7 is site a with its key; node 8 claims site b with another key (a new state); 9 is new
    two.remember_roll_call({7: _reply("a", "1a" * 32, None), 8: _reply("b", "2b" * 32, None),
                            9: _reply("c", "1c" * 32, None)})
    config = RoundInstruction(plan_json=plan.canonical_json(), plan_sha256=plan.sha256(), round=1,
                              coordinator=COORD).to_config()
    shared = FitIns(Parameters(tensors=[], tensor_type="numpy.ndarray"), config)
    sent = two.instruct([(SimpleNamespace(node_id=n), shared) for n in (7, 8, 9)])
    anchors = [RoundInstruction.from_config(fitins.config).node_anchor for _proxy, fitins in sent]
    assert [a.hash if a else None for a in anchors] == ["aa" * 32, None, None]
    assert RoundInstruction.from_config(shared.config).node_anchor is None  # one copy per node


@pytest.mark.slow
@pytest.mark.studies
def test_a_node_rolled_back_between_two_studies_refuses_the_second(tmp_path):
    """The reviewer's attack on the simulation engine, state.json edited too: only the
    coordinator's anchor can tell, and the node refuses the same plan's second study."""
    from twinfed.simulate import SiteRef, run_simulated_study

    sites = [SiteRef(n, write_site(tmp_path / "sites" / n, n_patients=8, n_steps=80, seed=i))
             for i, n in enumerate("ab")]
    plan = _plan(rounds=1, secure_aggregation=False)
    states = tmp_path / "states"
    run_simulated_study(plan, sites, tmp_path / "runs" / "one", progress=lambda m: None, state_root=states)
    b = NodeConfig(site_name="b", site_data=sites[1].data_dir, state_dir=states / "b")
    _roll_back(b)
    info = state_paths(b.state_dir).info
    info.write_text(json.dumps({k: v for k, v in json.loads(info.read_text()).items() if k != "ledger_anchor"}))
    assert verify_path(b.state_dir).ok  # alone, nothing shows any more
    summary = run_simulated_study(plan, sites, tmp_path / "runs" / "two", progress=lambda m: None,
                                  state_root=states)
    assert [r["code"] for r in summary["sites"]["b"]["refusals"]] == ["log_rolled_back"]
    # a, not rolled back, is refused only because study one spent its budget on this plan
    assert [r["code"] for r in summary["sites"]["a"]["refusals"]] == ["budget_exhausted"], summary["sites"]
    assert not (b.state_dir / "privacy_ledger.json").exists()  # no fresh budget was opened
