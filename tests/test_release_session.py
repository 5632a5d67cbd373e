"""A release kind cannot forget a rule: the node's one session (``twinfed.client.gate.serve``)
applies every rule to every kind, so a new kind that supplies only its own parts (here a probe
that sums a fixed vector and notes when it was asked to read patients and to compute) is
admitted, charged, audited and refused exactly as the built-in kinds are.
"""

from __future__ import annotations

import numpy as np
import pytest

from test_release_rules import COORD, _code, _events, _masked, _node, _trial_plan
from twinfed.client.gate import serve
from twinfed.client.kinds.trial import Trial
from twinfed.governance.approvals import approve_plan
from twinfed.privacy.ledger import set_budget
from twinfed.wire import NodeHead, TrialInstruction


class Probe(Trial):
    """A new kind: a trial plan's shape, a sum of ones, and a note of each step it was asked for,
    with what the node's log held at that moment."""

    calls: list[tuple[str, list[str]]] = []

    def load(self) -> None:
        self.calls.append(("load", self._logged()))

    def exact_sum(self, seed: int):
        self.calls.append(("compute", self._logged()))
        return np.ones(self.components(self.plan)), 3, 0

    def _logged(self) -> list[str]:
        return [e["event"] for e in _events(self.node)]


@pytest.fixture
def probe(monkeypatch):
    Probe.calls = []
    monkeypatch.setattr("twinfed.client.gate.kind_for", lambda config: Probe)
    return Probe


def _instruction(plan, **kw) -> dict:
    return TrialInstruction(plan_json=plan.canonical_json(), plan_sha256=plan.sha256(), coordinator=COORD,
                            **kw).to_config()


def test_a_new_kind_is_charged_before_it_computes_and_audited_before_it_sends(tmp_path, probe):
    node = _node(tmp_path)
    plan, weights = _trial_plan(start_hours=1)
    approve_plan(node.state_dir, plan, actor="officer:test")
    result = serve(node, _instruction(plan), weights, secagg=_masked(plan))
    assert result.reply.status == "ok"
    (load, logged_at_load), (compute, logged_at_compute) = probe.calls
    assert (load, compute) == ("load", "compute")
    assert "privacy_spent" not in logged_at_load and "privacy_spent" in logged_at_compute
    events = [e["event"] for e in _events(node)]
    assert events.index("privacy_spent") < events.index("aggregate_released") < events.index("model_sent")
    aggregate = result.reply.released.aggregate
    assert aggregate.epsilon > 0 and aggregate.site_epsilon_spent == pytest.approx(aggregate.epsilon)
    assert np.any(result.update[0] != result.update[0].flat[0])  # noised, not the bare ones


def _unapproved(node, plan):
    """The plan was never approved at the node."""


def _approved(node, plan):
    approve_plan(node.state_dir, plan, actor="officer:test")


def _exhausted(node, plan):
    _approved(node, plan)
    set_budget(node.state_dir, 0.5, actor="officer:test")  # the trial asks for 1.0


def _smaller_delta(node, plan):
    _approved(node, plan)
    set_budget(node.state_dir, 5.0, actor="officer:test", delta=1e-7)  # the trial asks for 1e-5


@pytest.mark.parametrize("setup, anchor, code, reads_patients", [
    (_unapproved, None, "plan_not_approved", False),
    (_approved, "cd" * 32, "log_rolled_back", False),  # the coordinator anchored a head the log lacks
    (_exhausted, None, "budget_exhausted", True),
    (_smaller_delta, None, "delta_exceeds_budget", True),
], ids=["unapproved", "rolled-back", "budget-exhausted", "delta-above-budget"])
def test_a_new_kind_is_refused_by_the_sessions_rules_before_anything_is_charged_or_computed(
        tmp_path, probe, setup, anchor, code, reads_patients):
    node = _node(tmp_path)
    plan, weights = _trial_plan(start_hours=1)
    setup(node, plan)
    kw = {"node_anchor": NodeHead(hash=anchor)} if anchor else {}
    result = serve(node, _instruction(plan, **kw), weights, secagg=_masked(plan))
    assert result.reply.status == "refused" and _code(result) == code
    assert [step for step, _ in probe.calls] == (["load"] if reads_patients else [])
    events = [e["event"] for e in _events(node)]
    assert "privacy_spent" not in events and "model_sent" not in events
    assert events[-1] == "round_refused"
