"""The node's governance gate: every round the coordinator asks for passes here, and is audited.

In order, before any patient data is read:
1. the node's state is initialised (keys, audit log) — without it nothing could be audited;
2. the round is masked by SecAgg+ if the plan requires secure aggregation;
3. the plan's hash is approved at this node by its privacy officer;
then :func:`twinfed.client.session.train_round` checks consent and the privacy budget.

Every outcome goes into the node's signed audit log (model received, plan refused, budget
exhausted, round joined or refused with the coordinator's round commitment, model sent), and the
reply carries the node's audit head, so the coordinator's log anchors the node's and the other
way round. Details are counts, hashes and budgets, never patient data.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from twinfed.client.node import NodeConfig
from twinfed.client.session import RoundOutcome, RoundRefused, parse_plan, train_round
from twinfed.errors import PlanNotApproved, TwinfedError
from twinfed.models.digest import weights_sha256


@dataclass
class RoundReply:
    outcome: RoundOutcome | None  # None: refused
    reason: str
    audit_head: dict | None  # {"seq", "hash"}; None only when the node has no audit log to write
    key_fingerprint: str


def serve_round(node: NodeConfig, plan_text: str, weights: list[np.ndarray], server_round: int, *,
                masked: bool, coordinator: dict | None) -> RoundReply:
    """Decide, audit and (if admitted) train one round. Never raises a :class:`TwinfedError`:
    a refusal is a reply whose one-line reason goes back to the coordinator."""
    from twinfed.governance.layout import open_audit, read_info

    plan_sha = hashlib.sha256(plan_text.encode()).hexdigest()
    try:
        plan = parse_plan(plan_text)
        plan_sha = plan.sha256()
        if node.simulation_operator:
            from twinfed.client.provision import provision_simulated_node

            provision_simulated_node(node, plan, operator=node.simulation_operator)
        audit = open_audit(node.state_dir)
        fingerprint = read_info(node.state_dir).key_fingerprint
    except TwinfedError as exc:
        return RoundReply(None, str(exc), None, "")

    anchor = dict(coordinator) if coordinator else {}
    base = {"round": server_round, "plan_sha256": plan_sha}
    try:
        audit.append("model_received", base | {"weights_sha256": weights_sha256(weights),
                                               "coordinator": anchor})
        outcome = _admitted(node, plan, weights, server_round, masked=masked)
    except TwinfedError as exc:
        return _refuse(audit, base, anchor, exc, fingerprint)
    privacy = outcome.privacy or {}
    audit.append("round_joined", base | {
        "coordinator": anchor, "patients_used": outcome.patients_used,
        "patients_excluded": outcome.patients_excluded, "steps": outcome.steps,
        "differential_privacy": outcome.privacy is not None,
        "epsilon_study": privacy.get("epsilon"),
        "epsilon_spent": privacy.get("site_epsilon_spent"),
        "epsilon_budget": privacy.get("site_epsilon_budget"),
        "delta": privacy.get("delta"), "noise_multiplier": privacy.get("noise_multiplier"),
    })
    sent = audit.append("model_sent", base | {"update_sha256": weights_sha256(outcome.update),
                                              "secure_aggregation": masked})
    return RoundReply(outcome, "", {"seq": sent.seq, "hash": sent.hash}, fingerprint)


def _admitted(node: NodeConfig, plan, weights, server_round: int, *, masked: bool) -> RoundOutcome:
    from twinfed.governance.approvals import require_approved

    if plan.privacy.secure_aggregation and not masked:
        raise RoundRefused("the plan requires secure aggregation but this round is not SecAgg+; "
                           "an unmasked update never leaves this node")
    require_approved(node.state_dir, plan.sha256())
    return train_round(node, plan, weights, server_round)


def _refuse(audit, base: dict, anchor: dict, exc: TwinfedError, fingerprint: str) -> RoundReply:
    from twinfed.privacy.ledger import BudgetExhausted

    reason = str(exc)
    try:
        if isinstance(exc, PlanNotApproved):
            audit.append("plan_refused", base | {"reason": reason})
        elif isinstance(exc, BudgetExhausted):
            audit.append("budget_exhausted", base | {"reason": reason})
        entry = audit.append("round_refused", base | {"reason": reason, "coordinator": anchor})
    except TwinfedError as audit_exc:  # e.g. a torn audit log: refuse, and say why it is not logged
        return RoundReply(None, f"{reason}; and the refusal could not be audited: {audit_exc}", None,
                          fingerprint)
    return RoundReply(None, reason, {"seq": entry.seq, "hash": entry.hash}, fingerprint)
