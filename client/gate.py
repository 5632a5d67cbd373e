"""The node's boundary for one training round: admit, train, reply. One place, always audited.

Admission, in order (each failure is a coded refusal, audited at the node, see
:mod:`twinfed.client.refusals`):
1. the instruction parses and its plan hashes to the hash it names; the node's state is
   initialised and its own audit log verifies (nothing could be audited otherwise);
2. the plan asks for nothing nodes never release; a deployed node refuses a plan without DP;
   a plan requiring SecAgg+ is refused in an unmasked round or one whose set-up (nodes sampled,
   shares, threshold) is weaker than the plan's minimums;
3. the plan is approved at this node: in ``approvals.json`` *and* by a standing, signed
   ``plan_approved`` event in its log; checked before any patient data is read;
4. the consented patients are loaded (the registry, read now: a withdrawal counts from the next
   round);
5. under the node's state lock (the same check again, then the ledger cross-checked against the
   log, the study's counts released and noise calibrated on its first round, this round's spend
   reserved: audited, then written) - so two studies on one node can never both spend the last
   of a budget.
Then :func:`twinfed.client.session.train_admitted` trains, and the reply is built from
:class:`twinfed.wire.NodeReply` only: the masked update travels beside it, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from twinfed.client.node import NodeConfig
from twinfed.client.refusals import RoundRefused, refusal_for, tell_node_console
from twinfed.client.session import Admission, parse_plan, train_admitted
from twinfed.errors import ConsentError, PlanError, TwinfedError
from twinfed.events import (BudgetExhausted, ModelReceived, ModelSent, PlanRefused, RoundJoined,
                            RoundRefused as RoundRefusedEvent, RoundSkipped)
from twinfed.locking import state_lock
from twinfed.models.digest import weights_sha256
from twinfed.models.plan import TrainingPlan
from twinfed.privacy.secagg import SecAggView
from twinfed.wire import (INSTRUCTION_KEY, DPCounts, NodeHead, NodeReply, Refusal, RefusalCode, Released,
                          RoundInstruction)


@dataclass(frozen=True)
class RoundResult:
    update: list[np.ndarray]
    reply: NodeReply
    plan: TrainingPlan | None  # None when the instruction's plan did not parse
    round: int


def serve_round(node: NodeConfig, config: dict, weights: list[np.ndarray], *,
                secagg: SecAggView) -> RoundResult:
    """Decide, audit and (if admitted) train one round. Never raises: anything that stops the
    round becomes a coded refusal with a zero update (the ClientApp withdraws a refused node
    from a masked round, ``twinfed.client.app``: only the unmasked round sends the zeros)."""
    zeros = [np.zeros_like(w, dtype=np.float32) for w in weights]
    site = node.site_name
    try:
        instruction = RoundInstruction.from_config(config)
    except (KeyError, ValueError) as exc:
        tell_node_console(site, "round refused", exc)
        return RoundResult(zeros, refuse_malformed(node, config, INSTRUCTION_KEY), None, 0)
    if instruction.stage == "calibrate":  # after the last round: a release, not training
        from twinfed.client.release_gate import serve_release

        return serve_release(node, config, weights, secagg=secagg)
    try:
        from twinfed.governance.layout import open_audit, read_info

        audit = open_audit(node.state_dir)
        fingerprint = read_info(node.state_dir).key_fingerprint
    except TwinfedError as exc:
        tell_node_console(site, f"round {instruction.round} refused", exc)
        return RoundResult(zeros, refused_reply(node, refusal_for(exc)), None, instruction.round)

    base = {"round": instruction.round, "plan_sha256": instruction.plan_sha256}
    plan: TrainingPlan | None = None
    try:
        audit.append(ModelReceived(**base, weights_sha256=weights_sha256(weights),
                                   coordinator=instruction.coordinator))
        plan = parse_plan(instruction.plan_json)
        if plan.sha256() != instruction.plan_sha256:  # one identity for every entry and segment
            raise PlanError("the coordinator sent a plan that is not in its canonical form (it parses "
                            "to another plan_sha256 than the instruction names)")
        admission, released = _admit(node, plan, instruction, secagg, audit)
        outcome = train_admitted(admission, weights)
    except Exception as exc:  # the boundary: nothing but a coded refusal leaves the node
        columns = set(plan.spec.state_columns + plan.spec.control_columns + plan.spec.covariate_columns) \
            if plan is not None else set()
        return RoundResult(zeros, refuse(node, audit, base, instruction, exc, fingerprint, columns),
                           plan, instruction.round)
    try:
        study = admission.study
        audit.append(RoundJoined(
            **base, coordinator=instruction.coordinator, patients_used=admission.patients_used,
            patients_excluded=admission.patients_excluded, steps=outcome.steps,
            differential_privacy=study is not None,
            epsilon_study=released.privacy.epsilon if released.privacy else None,
            epsilon_spent=released.privacy.site_epsilon_spent if released.privacy else None,
            epsilon_budget=released.privacy.site_epsilon_budget if released.privacy else None,
            delta=study.delta if study else None,
            noise_multiplier=study.noise_multiplier if study else None,
            update_clip_fraction=outcome.update_clip_fraction))
        sent = audit.append(ModelSent(**base, update_sha256=weights_sha256(outcome.update),
                                      secure_aggregation=secagg.masked))
    except TwinfedError as exc:  # trained, but the outcome cannot be audited: send nothing
        return RoundResult(zeros, refuse(node, audit, base, instruction, exc, fingerprint, set()),
                           plan, instruction.round)
    reply = NodeReply(site=site, status="ok", audit_head=sent.node_head,
                      key_fingerprint=fingerprint, released=released)
    return RoundResult(outcome.update, reply, plan, instruction.round)


def _admit(node: NodeConfig, plan: TrainingPlan, instruction: RoundInstruction, secagg: SecAggView,
           audit) -> tuple[Admission, Released]:
    from twinfed.governance.approvals import require_approved

    _check_plan(node, plan, secagg)
    entries = own_entries(node)
    check_not_rolled_back(node, entries, instruction)
    require_approved(node.state_dir, plan.sha256(), entries=entries)  # before any data is read
    _acknowledge_skips(audit, entries, instruction)
    site, windows, used, excluded = _consented_site(node, plan)
    study = None
    with state_lock(node.state_dir):
        if plan.privacy.enabled:
            entries = own_entries(node)
            require_approved(node.state_dir, plan.sha256(), entries=entries)
            study, privacy = _reserve_privacy(node, plan, instruction.round, audit, entries,
                                              used=used, excluded=excluded)
    if study is None:
        released = Released(steps=plan.training.local_steps)
    else:
        released = Released(steps=plan.training.local_steps, privacy=privacy,
                            counts=_named_counts(study.counts(), plan))
    return Admission(node=node, plan=plan, round=instruction.round, site=site, windows=windows,
                     patients_used=used,
                     patients_excluded=excluded, study=study), released


def _check_plan(node: NodeConfig, plan: TrainingPlan, secagg: SecAggView) -> None:
    if plan.unsupported_metrics():
        raise RoundRefused(RefusalCode.PLAN_UNSUPPORTED,
                           f"the plan asks nodes to release {', '.join(plan.unsupported_metrics())}, "
                           "which no twinfed node releases")
    check_protections(node, plan, secagg)


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


def _acknowledge_skips(audit, entries: list, instruction: RoundInstruction) -> None:
    """Record, once, each earlier round the coordinator says it did not unmask."""
    known = {e.details.get("round") for e in entries
             if e.event == "round_skipped" and e.details.get("plan_sha256") == instruction.plan_sha256}
    for r in sorted(set(instruction.skipped_rounds) - known):
        audit.append(RoundSkipped(round=r, plan_sha256=instruction.plan_sha256, code="not_unmasked",
                                  coordinator=instruction.coordinator))


def consented_site(node: NodeConfig, spec, purpose: str):
    """The site's patients whose consent covers ``purpose`` (the registry, read now), and how
    many others the export holds."""
    from twinfed.governance.consent_registry import granted_patients
    from twinfed.models.site_data import load_site

    site = load_site(node.site_data, spec)
    in_export = site.n_patients
    used = site.subset(granted_patients(node.state_dir, purpose), reuse=True)
    return used, in_export - used.n_patients  # ``site``'s arrays now hold ``used``


def training_patients(site, plan: TrainingPlan):
    """The consented patients a study trains on: all, or all but those it holds out to
    calibrate its prediction intervals (``twinfed.models.calibration.held_out``)."""
    if plan.calibration is None:
        return site
    from twinfed.models.calibration import held_out

    out = held_out(plan.sha256(), site.patient_ids, plan.calibration.holdout_fraction)
    return site.subset({pid for pid, h in zip(site.patient_ids, out) if not h}, reuse=True)


def _consented_site(node: NodeConfig, plan: TrainingPlan):
    from twinfed.models.windows import WindowIndex

    consented, excluded = consented_site(node, plan.spec, plan.purpose)
    used = training_patients(consented, plan)
    del consented  # its arrays now hold ``used``
    in_export = used.n_patients + excluded
    windows = WindowIndex.build(used) if used.n_patients else None
    if windows is None or windows.patients_with_windows().size == 0:
        raise ConsentError(f"site {node.site_name}: no patient has granted consent for purpose "
                           f"{plan.purpose!r} and a full window of {plan.spec.window_steps} steps; "
                           "import consent records with 'twinfed consent import' before joining")
    return used, windows, used.n_patients, in_export - used.n_patients


def _reserve_privacy(node: NodeConfig, plan: TrainingPlan, server_round: int, audit, entries, *,
                     used: int, excluded: int):
    from twinfed.privacy.ledger import PrivacyLedger
    from twinfed.privacy.study import calibrate_study, released_privacy

    # The first DP plan sets the site's budget: its (epsilon, delta). A plan asking for a larger
    # delta than the budget's is refused before anything is charged (delta_exceeds_budget).
    ledger = PrivacyLedger.open(node.state_dir, audit, entries, epsilon_budget=plan.privacy.epsilon,
                                delta_budget=plan.privacy.delta, accountant=plan.privacy.accountant)
    study = calibrate_study(node.state_dir, plan, ledger, audit, patients_used=used,
                            patients_excluded=excluded)
    ledger.reserve(study.round_segment(plan, server_round), study.delta, audit)  # at the budget's delta
    return study, released_privacy(ledger, study, plan)


def _named_counts(counts: DPCounts, plan: TrainingPlan) -> DPCounts | None:
    """The released counts if the plan names them (a plan may keep them at the node)."""
    return counts if {"patients_used", "patients_excluded"} & set(plan.metrics) else None


def refuse(node: NodeConfig, audit, base: dict, instruction: RoundInstruction, exc: BaseException,
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
