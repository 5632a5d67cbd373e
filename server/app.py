"""The coordinator's Flower ServerApp: run the plan's rounds, save the twin, close the study.

A study is anchored at both ends in both kinds of log: ``study_started`` in the coordinator's
log, each round's commitment in every node's, and at the end the coordinator's
``study_finished`` (the weights' digest and the hash of ``model/weights.npz``) whose head is
sent to every node in a last message; each node records it in its own ``study_finished``, and
the coordinator records the nodes' heads in ``study_closed``. Removing the last round from every
log, or swapping the weights file, is then caught by ``twinfed audit verify``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from flwr.common import Context
from flwr.server import ServerApp
from flwr.serverapp import Grid

from twinfed.errors import TwinfedError
from twinfed.events import StudyFinished
from twinfed.models.plan import TrainingPlan
from twinfed.server.session import CoordinatorSession, coordinator_session, server_app
from twinfed.server.session import stderr as _stderr
from twinfed.server.settings import StudySettings
from twinfed.server.strategy import Progress, TwinStrategy

FINISH_TIMEOUT_S = 120.0


def check_new_run(out_dir: Path) -> None:
    """A study writes a new run directory; it never replaces one (its model, its summary)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise TwinfedError(f"{out_dir} is a file; give a directory for the run")
    done = [name for name in ("summary.json", "model") if (out_dir / name).exists()]
    if done:
        raise TwinfedError(f"{out_dir} already holds a study ({', '.join(done)}); runs are never "
                           "overwritten: choose a new output directory")


def run_study(grid: Grid, context: Context, plan: TrainingPlan, *, out_dir: Path, min_nodes: int,
              progress: Progress = _stderr, extra: dict | None = None,
              pretrained: Path | None = None) -> dict:
    """Run ``plan``'s rounds; ``pretrained``: the model directory of the weights the plan names
    as its start (``model.pretrained_sha256``), if it names any."""
    from twinfed.models.pretrain import starting_weights

    with coordinator_session(grid, plan, out_dir=out_dir, min_nodes=min_nodes, progress=progress,
                             check_new=check_new_run,
                             prepare=lambda: starting_weights(plan, pretrained)) as session:
        strategy = session.run_rounds(context, TwinStrategy, session.prepared, rounds=plan.rounds)
        calibration = _calibrate(session, context, strategy)
        return _finish(session, strategy, Path(out_dir), extra, calibration)


def _calibrate(session: CoordinatorSession, context: Context,
               strategy: TwinStrategy) -> tuple[object | None, dict] | None:
    """After the last round, when the plan calibrates prediction intervals: one release round in
    which every node sends the (DP) histogram of its held-out patients' normalised errors for the
    final weights; their sum gives the intervals. ``(IntervalCalibration or None, record)``."""
    plan = session.plan
    if plan.calibration is None:
        return None
    from twinfed.models.calibration import IntervalCalibration, twin_weights_sha256
    from twinfed.models.conformal import n_bins
    from twinfed.models.twin import Twin
    from twinfed.server.release import run_release
    from twinfed.wire import RoundInstruction

    release_round = plan.rounds + 1

    def instruction(head):
        return RoundInstruction(plan_json=strategy.plan_json, plan_sha256=plan.sha256(), round=release_round,
                                coordinator=head, skipped_rounds=tuple(strategy.skipped_rounds),
                                stage="calibrate").to_config()

    result, _ = run_release(session, context, strategy.final_weights, instruction=instruction,
                            release_round=release_round, label="calibration of prediction intervals")
    record = {"round": release_round, "sites_released": result.sites_released, "sites": result.sites,
              "releases": result.aggregates, "history": result.history}
    if result.total is None or not result.sites_released:
        session.progress("no prediction intervals: the calibration was not released by enough sites")
        return None, record | {"note": "not calibrated: too few sites released their calibration"}
    cfg = plan.calibration
    dp = plan.privacy.enabled
    twin = Twin.from_weights(plan, strategy.final_weights)
    cal = IntervalCalibration.from_histogram(
        result.total.reshape(len(plan.spec.states), n_bins(cfg.edges)), plan.spec, cfg,
        differential_privacy=dp, noise_multiplier=cfg.noise_multiplier if dp else None,
        sites=result.sites_released,
        source=(f"federated: held-out patients of {result.sites_released} sites, "
                + (f"DP histogram (noise multiplier {cfg.noise_multiplier:g})" if dp else "NO DP")),
        weights_sha256=twin_weights_sha256(twin))
    return cal, record


def _finish(session: CoordinatorSession, strategy: TwinStrategy, out_dir: Path, extra: dict | None,
            calibration=None) -> dict:
    from twinfed.models.digest import weights_sha256
    from twinfed.models.twin import Twin, write_text_atomic
    from twinfed.server.closing import close_study

    plan = session.plan
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = Twin.from_weights(plan, strategy.final_weights).save(out_dir)
    cal, cal_record = calibration if calibration is not None else (None, None)
    cal_sha = None
    if cal is not None:
        from twinfed.models.calibration import save_calibration

        cal_sha = hashlib.sha256(save_calibration(model_dir, cal).read_bytes()).hexdigest()
    rounds_with_update = sum(1 for h in strategy.history if h["sites_trained"] and not h["skipped"])
    summary = {
        "twin": plan.spec.name,
        "plan_sha256": plan.sha256(),
        "rounds": plan.rounds,
        "rounds_with_update": rounds_with_update,
        "skipped_rounds": list(strategy.skipped_rounds),
        "strategy": plan.strategy,
        "privacy": plan.privacy.label(),
        "model": {"kind": plan.model.kind, "trained_weights": int(sum(w.size for w in strategy.final_weights)),
                  "pretrained_sha256": plan.model.pretrained_sha256},
        "sites": {name: _site_entry(plan, rec.summary(), (cal_record or {}).get("releases", {}).get(name))
                  for name, rec in sorted(strategy.sites.items())},
        "history": strategy.history,
        "intervals": None if cal is None else cal.label(),
        "model_dir": "model",
        "seconds": session.seconds(),
    } | ({"calibration": cal_record} if cal_record is not None else {}) | (extra or {})
    from twinfed.outputs import StudySummary

    typed = StudySummary.model_validate(summary)
    summary = typed.document()
    write_text_atomic(out_dir / "summary.json", typed.to_json())
    finished = session.audit.append(StudyFinished(
        plan_sha256=plan.sha256(), rounds=plan.rounds, rounds_with_update=rounds_with_update,
        skipped_rounds=tuple(strategy.skipped_rounds),
        weights_sha256=weights_sha256(strategy.final_weights),
        weights_file_sha256=hashlib.sha256((model_dir / "weights.npz").read_bytes()).hexdigest(),
        calibration_file_sha256=cal_sha))
    close_study(session.grid, session.audit, finished, timeout=FINISH_TIMEOUT_S, anchors=session.anchors)
    return summary


def _site_entry(plan: TrainingPlan, entry: dict, calibration: dict | None) -> dict:
    """A site's entry in ``summary.json`` with its spend: the site's whole ledger as it last
    released it (its calibration's figures, or else its last round's), by kind of release."""
    spend = released_spend(plan, entry.get("privacy"), calibration)
    from twinfed.server.strategy import WITHHELD
    from twinfed.wire import DP

    entry = entry | {"release": entry["release"] | {"spend": DP if spend else WITHHELD}}
    return entry | {"epsilon_spent": spend.epsilon if spend else None,
                    "epsilon_budget": spend.epsilon_budget if spend else None,
                    "spend": spend.model_dump() if spend else None}


def released_spend(plan: TrainingPlan, privacy: dict | None, calibration: dict | None):
    """A site's :class:`twinfed.outputs.SiteSpend` from what it released: the total is the last
    figure it released (``site_epsilon_spent`` of its calibration, else of its last round: its
    ledger's total at the budget's delta); the parts are this study's count release, its training
    rounds and its calibration, each what it added to the site's total, and "earlier": what the
    site had spent before this study (the coordinator is not told on what). None: the site
    released no privacy figure (a study without DP, or a site that never trained).

    Every part and the total are at the budget's delta, which a release names as ``site_delta``
    (a round's ``delta`` is the study's own, min(plan delta, 1/N)), so the parts sum to the
    total. A node from before ``site_delta`` was sent names it only in its calibration's
    ``delta``; a round from such a node is read at the study's delta, as before."""
    from twinfed.outputs import KIND_ORDER, SiteSpend, SpendPart, attribute
    from twinfed.privacy.ledger import epsilon_of
    from twinfed.wire import DPAggregate, DPPrivacy

    p = DPPrivacy.model_validate(privacy) if privacy else None
    c = DPAggregate.model_validate(calibration) if calibration else None
    if p is None and c is None:
        return None
    parts: list[SpendPart] = []
    if p is not None:
        # This study's releases in ledger order: its patient counts (rate 1, one step, the plan's
        # count noise) first, then one DP-SGD segment per round.
        labelled = [("count" if i == 0 and s.sample_rate == 1.0 and s.steps == 1
                     and s.noise_multiplier == plan.privacy.count_noise else "training", s)
                    for i, s in enumerate(p.segments)]
        at = _site_delta(c if c is not None else p)  # the delta of the site's total
        parts = attribute(labelled, lambda segs: epsilon_of(segs, at, p.accountant))
    if c is not None:
        parts.append(SpendPart(kind="calibration", mechanism="gaussian-sum", epsilon=c.epsilon, releases=1))
    last = c if c is not None else p
    total = last.site_epsilon_spent
    earlier = total - sum(part.epsilon for part in parts)
    if earlier > 1e-9 * max(1.0, total):
        parts.append(SpendPart(kind="earlier", mechanism=None, epsilon=earlier, releases=0))
    parts.sort(key=lambda part: KIND_ORDER.index(part.kind))
    return SiteSpend(epsilon=total, delta=_site_delta(last), epsilon_budget=last.site_epsilon_budget,
                     accountant=last.accountant, by_kind=parts,
                     source="released by the site: its last figures (rounds, then calibration)")


def _site_delta(released) -> float:
    """The delta a release's site figures are at: the budget's (``site_delta``); a calibration's
    ``delta`` is the budget's too; a round's, from a node that does not send ``site_delta``, is
    only the study's."""
    return released.site_delta if released.site_delta is not None else released.delta


def make_server_app(plan: TrainingPlan, *, out_dir: Path, min_nodes: int,
                    progress: Progress = _stderr, extra: dict | None = None,
                    pretrained: Path | None = None) -> ServerApp:
    return server_app(lambda grid, context: run_study(
        grid, context, plan, out_dir=out_dir, min_nodes=min_nodes, progress=progress, extra=extra,
        pretrained=pretrained))


def main(grid: Grid, context: Context) -> None:
    try:
        settings = StudySettings.from_run_config(dict(context.run_config))
        if settings.trial_plan:
            _main_trial(grid, context, settings)
            return
        plan = settings.plan()
        if settings.sites:  # flwr run on the simulation engine: this process set up the nodes
            from twinfed.governance.provision import provision_run_config_sites

            provision_run_config_sites(settings.out_dir, settings.sites, plan)
        run_study(grid, context, plan, out_dir=settings.out_dir, min_nodes=settings.min_nodes,
                  extra={"engine": "flwr-run"},
                  pretrained=Path(settings.pretrained) if settings.pretrained else None)
    except TwinfedError as exc:
        # One line for whoever watches the run (flwr run --stream, the SuperLink's log), and a
        # failed run for Flower, without a traceback.
        _stderr(f"twinfed: error: {exc}")
        raise SystemExit(1) from None


def _main_trial(grid: Grid, context: Context, settings: StudySettings) -> None:
    """``flwr run`` of a federated in-silico trial (run-config keys ``trial-plan``,
    ``trial-plan-sha256``, ``trial-model``)."""
    from twinfed.models.surrogate import get_weights
    from twinfed.models.twin import Twin
    from twinfed.server.trial import run_trial

    plan = settings.trial()
    weights = get_weights(Twin.load(settings.trial_model).surrogate)
    if settings.sites:
        from twinfed.governance.provision import provision_run_config_sites

        provision_run_config_sites(settings.out_dir, settings.sites, plan)
    run_trial(grid, context, plan, weights, out_dir=settings.out_dir, min_nodes=settings.min_nodes,
              progress=_stderr, extra={"engine": "flwr-run"})


app = server_app(main)
