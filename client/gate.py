"""The node's gate: the one session every release goes through - admit, charge, compute,
audit, reply - whatever is released (a training round, a study's calibration, a trial: the
release kinds of :mod:`twinfed.client.kinds` supply only what is theirs). Never raises: anything
that stops a release becomes a coded refusal, audited at the node
(:mod:`twinfed.client.refusals`).

In order, for every kind:
1. the instruction parses (else refused ``plan_malformed``, audited under what it claims), the
   node's state is initialised and its own audit log opens; what was received is logged;
2. the plan parses and hashes to the instruction's hash (one identity for every entry and ledger
   segment); the kind's checks on the plan; a deployed node refuses a plan without DP; a plan
   requiring SecAgg+ is refused in an unmasked round or one whose set-up (nodes sampled, shares,
   threshold) is weaker than the plan's minimums;
3. the node's log verifies and still holds the head the coordinator last anchored and the
   newest ledger change state.json records (else ``log_rolled_back``);
4. the plan is approved at this node: in ``approvals.json`` *and* by a standing, signed
   ``plan_approved`` event in its log; then the kind's checks on the log - all before any
   patient data is read;
5. the kind reads its patients (the consent registry, read now: a withdrawal counts from the
   next release);
6. under the node's state lock: the log, the approval and the kind's checks again, then (a DP
   plan) the ledger cross-checked against the log, refused if the plan asks for a larger delta
   than the budget's, and the kind's segment charged - audited, then written - so two releases
   on one node can never both spend the last of a budget, and nothing is computed uncharged;
7. the kind computes the update (noised, clipped), records it in the node's own log (exact
   figures stay here), the sent update's digest is logged, and the reply is built from
   :class:`twinfed.wire.NodeReply` only: the (masked) update travels beside it, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from twinfed.client.kinds import ReleaseKind, kind_for
from twinfed.client.node import NodeConfig
from twinfed.client.refusals import RoundRefused, refusal_for, tell_node_console
from twinfed.errors import PlanError, TwinfedError
from twinfed.events import (BudgetExhausted, ModelReceived, ModelSent, PlanRefused,
                            RoundRefused as RoundRefusedEvent)
from twinfed.locking import state_lock
from twinfed.models.digest import weights_sha256
from twinfed.privacy.secagg import SecAggView
from twinfed.wire import NodeHead, NodeReply, Refusal, RefusalCode


@dataclass(frozen=True)
class RoundResult:
    update: list[np.ndarray]
    reply: NodeReply
    plan: object | None  # the instruction's plan; None when it did not parse
    round: int


def serve(node: NodeConfig, config: dict, weights: list[np.ndarray], *, secagg: SecAggView) -> RoundResult:
    """Decide, audit and (if admitted) compute one release. Never raises: anything that stops it
    becomes a coded refusal with zeros of the release's shape (the ClientApp withdraws a refused
    node from a masked round, ``twinfed.client.app``: only an unmasked round sends the zeros)."""
    site = node.site_name
    kind = kind_for(config)
    try:
        instruction = kind.parse_instruction(config)
    except (KeyError, ValueError) as exc:
        tell_node_console(site, f"{kind.name} refused", exc)
        return RoundResult(kind.zeros(None, weights), refuse_malformed(node, config, kind.key), None, 0)
    kind = kind.for_instruction(instruction)
    plan, plan_error = None, None
    try:
        plan = kind.parse_plan(instruction.plan_json)
    except PlanError as exc:
        plan_error = exc
    zeros = kind.zeros(plan, weights)
    try:
        from twinfed.governance.layout import open_audit, read_info

        audit = open_audit(node.state_dir)
        fingerprint = read_info(node.state_dir).key_fingerprint
    except TwinfedError as exc:
        tell_node_console(site, f"{kind.name} {instruction.round} refused", exc)
        return RoundResult(zeros, refused_reply(node, refusal_for(exc)), None, instruction.round)

    base = {"round": instruction.round, "plan_sha256": instruction.plan_sha256}
    release: ReleaseKind | None = None
    try:
        audit.append(ModelReceived(**base, weights_sha256=weights_sha256(weights),
                                   coordinator=instruction.coordinator))
        if plan_error is not None:
            raise plan_error
        if plan.sha256() != instruction.plan_sha256:  # one identity for every entry and segment
            raise PlanError("the coordinator sent a plan that is not in its canonical form (it parses "
                            "to another plan_sha256 than the instruction names)")
        release = kind(node, plan, instruction, weights)
        _admit(release, secagg, audit)
        update = release.compute()
    except Exception as exc:  # the boundary: nothing but a coded refusal leaves the node
        columns = release.spec_columns() if release is not None else set()
        return RoundResult(zeros, refuse(node, audit, base, instruction, exc, fingerprint, columns),
                           plan, instruction.round)
    try:
        release.record(audit, base, update, masked=secagg.masked)
        sent = audit.append(ModelSent(**base, update_sha256=weights_sha256(update),
                                      secure_aggregation=secagg.masked))
    except TwinfedError as exc:  # computed, but it cannot be audited: send nothing
        return RoundResult(zeros, refuse(node, audit, base, instruction, exc, fingerprint, set()),
                           plan, instruction.round)
    reply = NodeReply(site=site, status="ok", audit_head=sent.node_head, key_fingerprint=fingerprint,
                      released=release.released())
    return RoundResult(update, reply, plan, instruction.round)


def _admit(release: ReleaseKind, secagg: SecAggView, audit) -> None:
    """Steps 2-6: every check, then the charge; raises what refuses the release."""
    from twinfed.governance.approvals import require_approved

    node, plan = release.node, release.plan
    release.check_plan()
    check_protections(node, plan, secagg)
    entries = own_entries(node)
    check_not_rolled_back(node, entries, release.instruction)
    require_approved(node.state_dir, plan.sha256(), entries=entries)  # before any data is read
    release.admit(entries, audit)
    release.load()
    with state_lock(node.state_dir):
        entries = own_entries(node)
        require_approved(node.state_dir, plan.sha256(), entries=entries)
        release.recheck(entries)
        if plan.privacy.enabled:
            charge(release, audit, entries)


def charge(release: ReleaseKind, audit, entries) -> None:
    """Under the state lock: the release's segment charged to the site's ledger at the budget's
    delta (audited, then written); refused before anything is charged if the site cannot afford
    it or the plan asks for a larger delta than the budget's."""
    from twinfed.privacy.ledger import PrivacyLedger

    p = release.plan.privacy
    # The first DP plan sets the site's budget, its (epsilon, delta).
    ledger = PrivacyLedger.open(release.node.state_dir, audit, entries, epsilon_budget=p.epsilon,
                                delta_budget=p.delta, accountant=p.accountant)
    ledger.require_delta(p.delta)
    segment, delta = release.segment(ledger, audit)
    before = ledger.spent()
    after = ledger.reserve(segment, delta, audit)
    release.charged(ledger, before, after)


def check_protections(node: NodeConfig, plan, secagg: SecAggView) -> None:
    """A deployed node releases only under DP; a plan requiring SecAgg+ gets nothing unmasked or
    under a set-up weaker than its assumptions (a training or a trial plan alike)."""
    from twinfed.privacy.secagg import weaker_than_plan

    if not plan.privacy.enabled and not node.simulated:
        raise RoundRefused(RefusalCode.DP_REQUIRED,
                           "this node trains only differentially private plans; a plan without DP "
                           "is for simulated baselines")
    if plan.privacy.secure_aggregation:
        if not secagg.masked:
            raise RoundRefused(RefusalCode.NOT_MASKED,
                               "the plan requires secure aggregation but this round is not SecAgg+; "
                               "an unmasked update never leaves this node")
        why = weaker_than_plan(plan, sampled=secagg.sampled, shares=secagg.shares,
                               threshold=secagg.threshold)
        if why:
            raise RoundRefused(RefusalCode.SECAGG_SETUP_WEAK, why)


def check_not_rolled_back(node: NodeConfig, entries: list, instruction) -> None:
    """The node's log still holds the head of it the coordinator last anchored (the
    instruction's ``node_anchor``), and the entry its state.json records as the newest change of
    its ledger: else the log was cut back, and the node refuses (``log_rolled_back``) before
    any approval, patient or budget is read from it."""
    from twinfed.governance.layout import check_not_rolled_back as check

    check(node.state_dir, entries, node_anchor=getattr(instruction, "node_anchor", None))


def own_entries(node: NodeConfig) -> list:
    """The node's own audit entries, verified against its own key (a few ms per 10,000)."""
    from twinfed.governance.layout import verified_entries

    return verified_entries(node.state_dir)


def refuse(node: NodeConfig, audit, base: dict, instruction, exc: BaseException,
            fingerprint: str, columns: set[str]) -> NodeReply:
    refusal = refusal_for(exc, columns=columns)
    tell_node_console(node.site_name, f"round {instruction.round} refused ({refusal})", exc)
    head = None
    try:
        if refusal.code == RefusalCode.PLAN_NOT_APPROVED:
            audit.append(PlanRefused(**base, refusal=refusal))
        elif refusal.code in (RefusalCode.BUDGET_EXHAUSTED, RefusalCode.DELTA_EXCEEDS_BUDGET):
            # The budget refused the release, by its epsilon or its delta: the refusal's code says which.
            audit.append(BudgetExhausted(**base, refusal=refusal))
        entry = audit.append(RoundRefusedEvent(**base, refusal=refusal,
                                               coordinator=instruction.coordinator))
        head = entry.node_head
    except TwinfedError as audit_exc:  # e.g. a torn audit log: refuse, and say so locally
        tell_node_console(node.site_name, "the refusal could not be audited", audit_exc)
    return refused_reply(node, refusal, head, fingerprint)


def refuse_malformed(node: NodeConfig, config: dict, key: str) -> NodeReply:
    """An instruction that does not parse, or whose plan does not hash to the hash it names:
    refused ``plan_malformed``, and audited when the node's state can be opened (under the hash
    and round it claims when they are well-formed; no coordinator head, nothing of it verified)."""
    import json
    import re

    refusal = Refusal(code=RefusalCode.PLAN_MALFORMED)
    try:
        claimed = json.loads(str(config.get(key, "{}")))
    except ValueError:
        claimed = None
    claimed = claimed if isinstance(claimed, dict) else {}
    sha, rnd = claimed.get("plan_sha256"), claimed.get("round")
    sha = sha if isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha) else "0" * 64
    rnd = rnd if isinstance(rnd, int) and not isinstance(rnd, bool) and 0 <= rnd < 2**31 else 0
    try:
        from twinfed.governance.layout import open_audit, read_info

        audit = open_audit(node.state_dir)
        fingerprint = read_info(node.state_dir).key_fingerprint
    except TwinfedError as exc:
        tell_node_console(node.site_name, "the refusal could not be audited", exc)
        return refused_reply(node, refusal)
    try:
        entry = audit.append(RoundRefusedEvent(round=rnd, plan_sha256=sha, refusal=refusal))
    except TwinfedError as exc:
        tell_node_console(node.site_name, "the refusal could not be audited", exc)
        return refused_reply(node, refusal, None, fingerprint)
    return refused_reply(node, refusal, entry.node_head, fingerprint)


def refused_reply(node: NodeConfig, refusal: Refusal, head: NodeHead | None = None,
           fingerprint: str | None = None) -> NodeReply:
    return NodeReply(site=node.site_name, status="refused", refusal=refusal, audit_head=head,
                     key_fingerprint=fingerprint or None)
