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

from builders import write_site
from twinfed.client.gate import serve_round
from twinfed.client.node import NodeConfig
from twinfed.governance.approvals import approve_plan
from twinfed.governance.consent_registry import withdraw
from twinfed.governance.layout import state_paths
from twinfed.governance.node_state import init_node
from twinfed.governance.verify import verify_path
from twinfed.models.plan import ModelConfig, PrivacyConfig, TrainingConfig, TrainingPlan
from twinfed.models.spec import load_spec
from twinfed.models.surrogate import build_surrogate, get_weights
from twinfed.privacy.secagg import SecAggView
from twinfed.wire import RELEASE, LogHead, NodeReply, RoundInstruction, field_paths, reply_field_table

COORD = LogHead(seq=4, hash="ab" * 32)
MASKED = SecAggView(masked=True, sampled=3, shares=3, threshold=2)


def _plan(rounds=3, **privacy) -> TrainingPlan:
    return TrainingPlan(spec=load_spec("glucose"), rounds=rounds, model=ModelConfig(hidden=8),
                        training=TrainingConfig(local_steps=2, batch_size=4),
                        privacy=PrivacyConfig(**privacy))


def _node(root, *, name="a", simulated=False) -> NodeConfig:
    site = write_site(root / "site", n_patients=5, n_steps=60)
    init_node(root / "state", site_name=name, site_data=site)
    return NodeConfig(site_name=name, site_data=site, state_dir=root / "state", simulated=simulated)


def _serve(node, plan, *, server_round=1, anchor=None):
    weights = get_weights(build_surrogate(plan.spec, plan.model, seed=plan.seed))
    extra = {} if anchor is None else {"node_anchor": anchor}
    cfg = RoundInstruction(plan_json=plan.canonical_json(), plan_sha256=plan.sha256(),
                           round=server_round, coordinator=COORD, **extra).to_config()
    return serve_round(node, cfg, weights, secagg=MASKED)


def _code(result) -> str | None:
    return result.reply.refusal.code.value if result.reply.refusal else None


def _events(node) -> list[dict]:
    return [json.loads(x) for x in state_paths(node.state_dir).audit.read_text().splitlines()]


def _roll_back(node, keep: int = 3) -> None:
    """What the reviewer did: the log's first ``keep`` lines, no ledger, no studies."""
    log = state_paths(node.state_dir).audit
    log.write_bytes(b"".join(ln + b"\n" for ln in log.read_bytes().split(b"\n")[:keep]))
    (node.state_dir / "privacy_ledger.json").unlink()
    shutil.rmtree(node.state_dir / "studies", ignore_errors=True)


@pytest.fixture()
def node(tmp_path):
    return _node(tmp_path)


def test_a_rolled_back_node_refuses_the_coordinators_anchor_and_audits_it(node):
    plan = _plan()
    approve_plan(node.state_dir, plan, actor="officer:test")
    info = state_paths(node.state_dir).info.read_bytes()  # before any ledger: what a forger restores
    first = _serve(node, plan)
    assert first.reply.status == "ok" and first.reply.audit_head is not None
    _roll_back(node)
    state_paths(node.state_dir).info.write_bytes(info)  # and state.json as it was before the study
    result = _serve(node, plan, server_round=2, anchor=first.reply.audit_head)
    assert _code(result) == "log_rolled_back"
    assert all((u == 0).all() for u in result.update) and result.reply.released is None
    assert not (node.state_dir / "privacy_ledger.json").exists()  # no fresh budget was opened
    last = _events(node)[-1]
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
    assert _code(result) == "log_rolled_back"
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
    quiet = _node(tmp_path / "quiet", name="quiet", simulated=True)
    busy = _node(tmp_path / "busy", name="busy", simulated=True)
    replies = {}
    for n in (quiet, busy):
        approve_plan(n.state_dir, plan, actor="officer:test")
        first = _serve(n, plan)
        assert first.reply.status == "ok"
        if n is busy:
            withdraw(n.state_dir, "p4", plan.purpose)  # one more entry in busy's log
        replies[n.site_name] = (first.reply, _serve(n, plan, server_round=2, anchor=first.reply.audit_head).reply)
    assert len(_events(busy)) > len(_events(quiet))  # the withdrawal is in busy's log
    for n in (quiet, busy):
        r1, r2 = replies[n.site_name]
        assert r2.status == "ok"
        head = r2.model_dump(mode="json")["audit_head"]
        assert head == {"hash": _events(n)[-1]["hash"]}  # the entry's hash and nothing else
    (_, q2), (_, b2) = replies[quiet.site_name], replies[busy.site_name]
    drop = {"site", "audit_head", "key_fingerprint"}
    assert q2.model_dump(exclude=drop) == b2.model_dump(exclude=drop)
