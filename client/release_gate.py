"""The node's boundary for a release of aggregates: a federated in-silico trial, or the end of a
study's calibration of its prediction intervals. One place, always audited, like a training round.

Admission, in order (each failure a coded refusal, audited at the node):
1. the instruction parses and its plan hashes to the hash it names (a trial plan for a
   :class:`twinfed.wire.TrialInstruction`, the study's training plan for a ``calibrate`` stage);
   the node's state is initialised and its own log verifies;
2. a deployed node refuses a plan without DP; a plan requiring SecAgg+ is refused unmasked or
   under a set-up weaker than its assumptions (:func:`twinfed.client.gate.check_protections`);
3. the plan is approved here (``approvals.json`` and a standing signed approval), before any
   patient data is read; a trial's weights must be those its plan names (``model_mismatch``);
4. the patients: a trial's consented for the trial's purpose; a calibration's, the study's
   consented patients it held out of training;
5. under the state lock: the approval again, the ledger cross-checked against the log, and the
   release's spend reserved (audited, then written) *before* anything is computed: a trial's
   noise calibrated to its plan's epsilon on top of what the site spent, a calibration's
   declared by the study's plan (and planned into its epsilon from the start).
Then the aggregate is computed, clipped per patient, noised from the OS CSPRNG and sent as the
(masked) update; the reply carries the release's privacy figures (:class:`twinfed.wire.DPAggregate`)
and nothing else. The exact patient counts stay in the node's ``aggregate_released`` entry.
"""

from __future__ import annotations

import numpy as np

from twinfed.client.gate import (RoundResult, check_not_rolled_back, check_protections, consented_site, own_entries,
                                 refuse, refuse_malformed, refused_reply)
from twinfed.client.node import NodeConfig
from twinfed.client.refusals import RoundRefused, refusal_for, tell_node_console
from twinfed.errors import ConsentError, PlanError, TwinfedError
from twinfed.events import AggregateReleased, ModelReceived, ModelSent
from twinfed.locking import state_lock
from twinfed.models.digest import weights_sha256
from twinfed.privacy.secagg import SecAggView
from twinfed.wire import (INSTRUCTION_KEY, TRIAL_KEY, DPAggregate, NodeReply, RefusalCode,
                          Released, RoundInstruction, TrialInstruction)


def serve_release(node: NodeConfig, config: dict, weights: list[np.ndarray], *,
                  secagg: SecAggView) -> RoundResult:
    """Decide, audit and (if admitted) compute and release one aggregate. Never raises: a refusal
    replies with zeros of the release's shape (so a SecAgg+ round keeps its shape)."""
    site = node.site_name
    trial = TRIAL_KEY in config
    try:
        instruction = TrialInstruction.from_config(config) if trial else RoundInstruction.from_config(config)
    except (KeyError, ValueError) as exc:
        tell_node_console(site, "release refused", exc)
        return RoundResult([np.zeros(1, np.float32)],
                           refuse_malformed(node, config, TRIAL_KEY if trial else INSTRUCTION_KEY), None, 0)
    plan = _parse(instruction, trial)
    zeros = [np.zeros(_shape(plan), np.float32)]
    try:
        from twinfed.governance.layout import open_audit, read_info

        audit = open_audit(node.state_dir)
        fingerprint = read_info(node.state_dir).key_fingerprint
    except TwinfedError as exc:
        tell_node_console(site, f"release {instruction.round} refused", exc)
        return RoundResult(zeros, refused_reply(node, refusal_for(exc)), None, instruction.round)
    base = {"round": instruction.round, "plan_sha256": instruction.plan_sha256}
    try:
        audit.append(ModelReceived(**base, weights_sha256=weights_sha256(weights),
                                   coordinator=instruction.coordinator))
        if plan is None:
            raise PlanError("the coordinator sent a malformed plan")
        if plan.sha256() != instruction.plan_sha256:  # one identity for every entry and segment
            raise PlanError("the coordinator sent a plan that is not in its canonical form (it parses "
                            "to another plan_sha256 than the instruction names)")
        vector, aggregate, used, excluded = _release(node, plan, instruction, weights, secagg, audit)
        from twinfed.privacy.release import to_update

        update = to_update(vector, plan.privacy.update_clip)
    except Exception as exc:  # the boundary: nothing but a coded refusal leaves the node
        spec = None if plan is None else plan.spec
        columns = set() if spec is None else set(spec.state_columns + spec.control_columns
                                                 + spec.covariate_columns)
        return RoundResult(zeros, refuse(node, audit, base, instruction, exc, fingerprint, columns),
                           plan, instruction.round)
    try:
        audit.append(AggregateReleased(
            **base, kind="trial" if trial else "calibration", coordinator=instruction.coordinator,
            patients_used=used, patients_excluded=excluded, components=int(update[0].size),
            sensitivity=_sensitivity(plan),
            noise_multiplier=aggregate.noise_multiplier if aggregate else None,
            epsilon_spent=aggregate.site_epsilon_spent if aggregate else None,
            aggregate_sha256=weights_sha256(update)))
        sent = audit.append(ModelSent(**base, update_sha256=weights_sha256(update),
                                      secure_aggregation=secagg.masked))
    except TwinfedError as exc:  # computed, but the release cannot be audited: send nothing
        return RoundResult(zeros, refuse(node, audit, base, instruction, exc, fingerprint, set()),
                           plan, instruction.round)
    reply = NodeReply(site=site, status="ok", audit_head=sent.node_head,
                      key_fingerprint=fingerprint, released=Released(steps=0, aggregate=aggregate))
    return RoundResult(update, reply, plan, instruction.round)


# -- the plan of a release ------------------------------------------------------------------------

def _parse(instruction, trial: bool):
    """The instruction's plan, or None when it does not parse (refused once audited)."""
    from twinfed.client.session import parse_plan

    try:
        if trial:
            from twinfed.models.trial_plan import TrialPlan

            return TrialPlan.model_validate_json(instruction.plan_json)
        return parse_plan(instruction.plan_json)
    except (ValueError, PlanError):
        return None


def _is_trial(plan) -> bool:
    return getattr(plan, "kind", None) == "in-silico-trial"


def _shape(plan) -> int:
    """How many figures the release sends (1 when the plan is unknown: every node then refuses)."""
    if plan is None:
        return 1
    if _is_trial(plan):
        from twinfed.models.trial import layout

        return len(layout(plan.design))
    from twinfed.models import conformal

    if plan.calibration is None:
        return 1
    return len(plan.spec.states) * conformal.n_bins(plan.calibration.edges)


def _sensitivity(plan) -> float:
    if _is_trial(plan):
        from twinfed.models.trial import sensitivity

        return sensitivity(plan.design)
    from twinfed.privacy.release import histogram_sensitivity

    return histogram_sensitivity(len(plan.spec.states))


# -- admission, reservation, computation -------------------------------------------------------

def _release(node: NodeConfig, plan, instruction, weights, secagg: SecAggView, audit):
    """The admitted release: ``(noisy vector, its privacy figures or None, patients used,
    patients excluded)``."""
    from twinfed.governance.approvals import require_approved

    trial = _is_trial(plan)
    if not trial and plan.calibration is None:
        raise RoundRefused(RefusalCode.PLAN_UNSUPPORTED,
                           "the coordinator asked for a calibration the plan does not declare")
    check_protections(node, plan, secagg)
    entries = own_entries(node)
    check_not_rolled_back(node, entries, instruction)
    require_approved(node.state_dir, plan.sha256(), entries=entries)  # before any data is read
    if trial:
        from twinfed.models.arms import validate_design

        validate_design(plan.design.model_dump(mode="json"), plan.spec, source="the trial plan's design")
        if weights_sha256(weights) != plan.twin.weights_sha256:
            raise RoundRefused(RefusalCode.MODEL_MISMATCH,
                               "the weights sent are not the twin the approved trial plan names")
    else:
        _check_calibration(plan, instruction, weights, entries)  # before any data is read
    site, patients = _patients(node, plan)
    aggregate = None
    z = None
    with state_lock(node.state_dir):
        if plan.privacy.enabled or not trial:
            entries = own_entries(node)
        if not trial:  # again under the lock: two calibrations at once never both pass
            _check_calibration(plan, instruction, weights, entries)
        if plan.privacy.enabled:
            require_approved(node.state_dir, plan.sha256(), entries=entries)
            z, aggregate = _reserve(node, plan, instruction.round, audit, entries)
    vector, used, excluded = _compute(plan, site, patients, weights)
    if z is not None:
        from twinfed.privacy.release import noisy

        vector = noisy(vector, sensitivity=_sensitivity(plan), noise_multiplier=z)
    return vector, aggregate, used, excluded


def _check_calibration(plan, instruction, weights, entries) -> None:
    """A study's calibration is released once at a node, after its last round, and (once the
    node logged the study's end) only for the weights the study ended with; all checked before
    anything is charged."""
    sha = plan.sha256()
    if instruction.round != plan.rounds + 1:
        raise RoundRefused(RefusalCode.PLAN_MALFORMED,
                           f"a calibration is the release after the plan's last round (round "
                           f"{plan.rounds + 1}), not round {instruction.round}")
    mine = [e for e in entries if e.details.get("plan_sha256") == sha]
    if any((e.event == "aggregate_released" and e.details.get("kind") == "calibration")
           or (e.event == "privacy_spent" and e.details.get("mechanism") == "gaussian-sum") for e in mine):
        raise RoundRefused(RefusalCode.ALREADY_RELEASED,
                           "this node already released (or was charged for) this study's calibration; "
                           "a study is calibrated once")
    finished = [e for e in mine if e.event == "study_finished"]
    if finished and weights_sha256(weights) != finished[-1].details.get("weights_sha256"):
        raise RoundRefused(RefusalCode.MODEL_MISMATCH,
                           "the weights sent are not those this node recorded at the study's end")


def _patients(node: NodeConfig, plan):
    """The site's patients this release reads: ``(site, indices)``."""
    if _is_trial(plan):
        site, _others = consented_site(node, plan.spec, plan.purpose)
        if site.n_patients == 0:
            raise ConsentError(f"site {node.site_name}: no patient has granted consent for purpose "
                               f"{plan.purpose!r}; import consent records with 'twinfed consent import'")
        return site, np.arange(site.n_patients)
    from twinfed.models.calibration import held_out

    site, _others = consented_site(node, plan.spec, plan.purpose)
    out = held_out(plan.sha256(), site.patient_ids, plan.calibration.holdout_fraction)
    return site, np.flatnonzero(out)


def _reserve(node: NodeConfig, plan, server_round: int, audit, entries):
    """Under the state lock: the release's noise multiplier and its spend reserved (audited, then
    the ledger); :class:`BudgetExhausted` if the site cannot afford it."""
    from twinfed.privacy.ledger import PrivacyLedger
    from twinfed.privacy.release import noise_for_epsilon, noise_std, release_segment
    from twinfed.privacy.study import load_study, trial_delta

    p = plan.privacy
    # The first DP plan sets the site's budget, (epsilon, delta); a release asking for a larger
    # delta than the budget's is refused before anything is charged (delta_exceeds_budget).
    ledger = PrivacyLedger.open(node.state_dir, audit, entries, epsilon_budget=p.epsilon,
                                delta_budget=p.delta, accountant=p.accountant)
    ledger.require_delta(p.delta)
    if _is_trial(plan):
        delta = trial_delta(node.state_dir, plan)  # min(plan delta, 1/N released), like a study's
        z = noise_for_epsilon(ledger, epsilon=p.epsilon, delta=delta)
    else:
        study = load_study(node.state_dir, plan)
        delta = study.delta if study is not None else p.delta
        z = plan.calibration.noise_multiplier
    before = ledger.spent()
    after = ledger.reserve(release_segment(plan_sha256=plan.sha256(), server_round=server_round,
                                           noise_multiplier=z), delta, audit)
    sens = _sensitivity(plan)
    # Reported at the budget's delta, as every figure of the site's spend.
    return z, DPAggregate(kind="trial" if _is_trial(plan) else "calibration", sensitivity=sens,
                          noise_multiplier=z, noise_std=noise_std(z, sens), epsilon=max(0.0, after - before),
                          delta=ledger.delta, accountant=ledger.accountant, site_epsilon_spent=after,
                          site_epsilon_budget=ledger.budget, site_delta=ledger.delta)


def _compute(plan, site, patients: np.ndarray, weights) -> tuple[np.ndarray, int, int]:
    """The exact aggregate of ``patients`` (clipped per patient), and how many took part and
    how many could not (their record too short).

    Every random choice in it (identification windows, a trial's error draws) comes from a
    generator keyed by the patient and this release's seed: a secret from the OS CSPRNG, drawn
    here for each release and never stored or sent, so the draws are neither public (the design's
    seed is) nor shared between patients (removing one leaves the others' contributions as they
    were: the sensitivity holds)."""
    import secrets

    import torch

    from twinfed.models.twin import Twin

    torch.set_num_threads(1)
    seed = secrets.randbits(128)
    if _is_trial(plan):
        from twinfed.models.trial import contributions, run_site_trial

        twin = Twin.from_weights(plan.twin.training_plan(), weights)
        outcomes = run_site_trial(twin, site, plan.design, calibration=plan.twin.calibration,
                                  exclude_out_of_range=True,
                                  patients=patients, seed=seed)
        if outcomes.n_patients == 0:  # charged already: the noisy zero vector, never a refusal
            from twinfed.models.trial import layout

            return np.zeros(len(layout(plan.design))), 0, outcomes.n_excluded
        return contributions(outcomes.values, plan.design).sum(axis=0), outcomes.n_patients, outcomes.n_excluded
    from twinfed.models.calibration import calibration_histogram

    twin = Twin.from_weights(plan, weights)
    histogram, used = calibration_histogram(twin, site, patients, plan.calibration, seed=seed)
    return histogram.ravel(), used, int(patients.size) - used
