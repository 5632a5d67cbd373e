"""The coordinator's federated in-silico trial: every node runs the approved trial on its own
consented patients' twins and releases DP aggregates; the coordinator sums them (SecAgg+) into
the trial's results, with intervals that include the noise.

Anchored like a study: ``study_started`` (the trial plan's hash, one round), the round's
commitment (``round_started``), the nodes' heads (``round_aggregated``) and, at the end,
``trial_finished`` with the hash of ``trial.json`` as written. The weights sent are the twin's
whose digest the plan names: checked here before anything is sent, and by every node.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from twinfed.errors import TwinfedError
from twinfed.events import TrialFinished

RESULTS_FILE = "trial.json"


def check_new_trial(out_dir: Path) -> None:
    """A trial writes a new directory's ``trial.json``; it never replaces one."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise TwinfedError(f"{out_dir} is a file; give a directory for the trial's results")
    if (out_dir / RESULTS_FILE).exists():
        raise TwinfedError(f"{out_dir} already holds a trial ({RESULTS_FILE}); results are never "
                           "overwritten: choose a new --out")


def run_trial(grid, context, plan, weights, *, out_dir: Path, min_nodes: int, progress,
              extra: dict | None = None) -> dict:
    """Run ``plan`` (a :class:`twinfed.models.trial_plan.TrialPlan`) on the nodes of ``grid``
    with the twin ``weights``; write and return the results."""
    from twinfed.server.session import coordinator_session

    with coordinator_session(grid, plan, out_dir=out_dir, min_nodes=min_nodes, progress=progress,
                             check_new=check_new_trial,
                             prepare=lambda: _check_weights(plan, weights)) as session:
        return _release(session, context, weights, Path(out_dir), extra)


def _check_weights(plan, weights) -> None:
    from twinfed.models.digest import weights_sha256

    if weights_sha256(weights) != plan.twin.weights_sha256:
        raise TwinfedError("the model's weights are not the twin the trial plan names; give the model "
                           "directory the plan was made from")


def _release(session, context, weights, out_dir: Path, extra: dict | None) -> dict:
    """The trial's release round, its results written to ``RESULTS_FILE`` and ``trial_finished``."""
    from twinfed.models.trial import plan_structures, summarise
    from twinfed.models.twin import write_text_atomic
    from twinfed.outputs import TrialReport
    from twinfed.server.release import run_release
    from twinfed.wire import TrialInstruction

    plan = session.plan
    plan_json = plan.canonical_json()

    def instruction(head):
        return TrialInstruction(plan_json=plan_json, plan_sha256=plan.sha256(), coordinator=head).to_config()

    result, strategy = run_release(session, context, weights, instruction=instruction, release_round=1,
                                   label=f"trial {plan.design.name}")
    report = {"trial": plan.design.name, "n_patients": 0, "arms": {}, "contrasts": {}}
    if result.total is not None and result.sites_released:
        report = summarise(result.total, plan.design, plan.spec, noise_var=result.noise_var,
                           structures=plan_structures(plan.twin.training_plan()))
    else:
        report["note"] = "no result: too few sites released the trial's aggregates (see sites)"
    report |= {
        "plan_sha256": plan.sha256(),
        "privacy": plan.privacy.label() | {"noise_variance_in_sums": result.noise_var,
                                            "sites": result.aggregates},
        "uncertainty": _uncertainty(plan),
        "design": {"start_hours": plan.design.start_hours, "duration_days": plan.design.duration_days,
                   "draws": plan.design.draws, "purpose": plan.design.purpose},
        "sites": {name: {k: s[k] for k in ("rounds_joined", "rounds_refused", "refusals")}
                  | _site_spend(result.aggregates.get(name)) for name, s in result.sites.items()},
        "sites_released": result.sites_released,
        "seconds": session.seconds(),
        "model": _model_label(plan),
    } | (extra or {})
    out_dir.mkdir(parents=True, exist_ok=True)
    text = TrialReport.model_validate(report).to_json()
    write_text_atomic(out_dir / RESULTS_FILE, text)
    session.audit.append(TrialFinished(
        plan_sha256=plan.sha256(), sites_released=result.sites_released,
        sites_refused=strategy.refusals(), node_heads=strategy.node_heads(),
        results_file_sha256=hashlib.sha256(text.encode()).hexdigest()))
    return report


def _model_label(plan) -> dict:
    """The twin the trial ran on, as ``twinfed trial`` labels it in every output."""
    training = plan.twin.training_plan()
    return {"kind": training.model.kind, "training_plan_sha256": training.sha256(),
            "privacy": training.privacy.label()}


def _site_spend(aggregate: dict | None) -> dict:
    """A site's spend as it released it with the trial's aggregates: its whole ledger's total
    (``site_epsilon_spent``, as ``twinfed ledger show``), the trial's part of it, and what it had
    spent before (the coordinator is not told on what)."""
    if not aggregate:
        return {"epsilon_spent": None, "spend": None}
    from twinfed.outputs import SiteSpend, SpendPart

    parts = [SpendPart(kind="trial", mechanism="gaussian-sum", epsilon=aggregate["epsilon"], releases=1)]
    earlier = aggregate["site_epsilon_spent"] - aggregate["epsilon"]
    if earlier > 1e-9 * max(1.0, aggregate["site_epsilon_spent"]):
        parts.insert(0, SpendPart(kind="earlier", mechanism=None, epsilon=earlier, releases=0))
    spend = SiteSpend(epsilon=aggregate["site_epsilon_spent"], delta=aggregate["delta"],
                      epsilon_budget=aggregate["site_epsilon_budget"], accountant=aggregate["accountant"],
                      by_kind=parts, source="released by the site with the trial's aggregates")
    return {"epsilon_spent": spend.epsilon, "spend": spend.model_dump()}


def _uncertainty(plan) -> str:
    if plan.twin.calibration is None:
        return ("none propagated: the twin has no calibrated intervals, so each patient's arm is the "
                "twin's expected path; the intervals reflect the patients' spread and the DP noise only")
    return (f"each patient's forecast errors drawn from the twin's calibration ({plan.twin.calibration.source}), "
            f"{plan.design.draws} draws per patient, the same draws in every arm")


def make_trial_server_app(plan, weights, *, out_dir: Path, min_nodes: int, progress,
                          extra: dict | None = None):
    from twinfed.server.session import server_app

    return server_app(lambda grid, context: run_trial(
        grid, context, plan, weights, out_dir=out_dir, min_nodes=min_nodes, progress=progress, extra=extra))
