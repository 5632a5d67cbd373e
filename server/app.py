"""The coordinator's Flower ServerApp: run the plan's rounds, then save the twin and summary."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from flwr.common import Context
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.workflow import DefaultWorkflow
from flwr.serverapp import Grid

from twinfed.models.plan import TrainingPlan
from twinfed.privacy.secagg import check_secagg, server_workflow
from twinfed.server.settings import StudySettings
from twinfed.server.strategy import Progress, TwinStrategy


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_study(grid: Grid, context: Context, plan: TrainingPlan, *, out_dir: Path, min_nodes: int,
              progress: Progress = _stderr, extra: dict | None = None) -> dict:
    from twinfed.models.surrogate import build_surrogate, get_weights
    from twinfed.models.twin import Twin, write_text_atomic

    started = time.perf_counter()
    init = get_weights(build_surrogate(plan.spec, plan.model, seed=plan.seed))
    masked = plan.privacy.secure_aggregation
    check_secagg(plan, min_nodes)
    audit = coordinator_audit(out_dir / COORDINATOR_DIRNAME)
    audit.append("study_started", {
        "plan_sha256": plan.sha256(), "purpose": plan.purpose, "rounds": plan.rounds,
        "min_nodes": min_nodes, "differential_privacy": plan.privacy.enabled,
        "epsilon_per_site": plan.privacy.epsilon, "secure_aggregation": masked})
    strategy = TwinStrategy(plan, init, min_nodes=min_nodes, progress=progress, masked=masked,
                            audit=audit)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=plan.rounds),
                           strategy=strategy)
    fit = server_workflow(min_nodes, plan.privacy.update_clip) if masked else None
    DefaultWorkflow(fit_workflow=fit)(grid, legacy)

    out_dir.mkdir(parents=True, exist_ok=True)
    Twin.from_weights(plan, strategy.final_weights).save(out_dir)
    summary = {
        "twin": plan.spec.name,
        "plan_sha256": plan.sha256(),
        "rounds": plan.rounds,
        "rounds_with_update": sum(1 for h in strategy.history if h["sites_trained"]),
        "strategy": plan.strategy,
        "privacy": plan.privacy.label(),
        "sites": {name: asdict(rec) for name, rec in sorted(strategy.sites.items())},
        "history": strategy.history,
        "model_dir": "model",
        "seconds": round(time.perf_counter() - started, 3),
    } | (extra or {})
    write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    audit.append("study_finished", {
        "plan_sha256": plan.sha256(), "rounds_with_update": summary["rounds_with_update"],
        "model_sha256": hashlib.sha256((out_dir / "model" / "weights.npz").read_bytes()).hexdigest()})
    return summary


COORDINATOR_DIRNAME = "coordinator"


def coordinator_audit(state_dir: Path):
    """The coordinator's own state (keys, signed audit log) under the run directory."""
    from twinfed.governance.layout import open_audit
    from twinfed.governance.node_state import init_coordinator

    init_coordinator(state_dir, exist_ok=True)
    return open_audit(state_dir)


def make_server_app(plan: TrainingPlan, *, out_dir: Path, min_nodes: int,
                    progress: Progress = _stderr, extra: dict | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_study(grid, context, plan, out_dir=out_dir, min_nodes=min_nodes, progress=progress,
                  extra=extra)

    return app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = StudySettings.from_run_config(dict(context.run_config))
    run_study(grid, context, settings.plan(), out_dir=settings.out_dir, min_nodes=settings.min_nodes,
              extra={"engine": "flwr-run"})
