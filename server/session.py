"""One coordinator session, whatever it releases: a study's rounds (and its calibration) or a
trial's aggregates.

Every session has the same skeleton: a new output directory, the plan's SecAgg+ checked against
``min_nodes``, ``study_started`` in the coordinator's log, a roll call whose answers are the
nodes' anchors, then the kind's rounds (:meth:`CoordinatorSession.run_rounds`: the SecAgg+
workflow, when the plan masks, with the kind's strategy), and at the end the kind's own finished
event; on any exception ``study_aborted`` (``interrupted`` for a KeyboardInterrupt, else
``error``) and the exception goes on. What each kind instructs, and what it writes at the end,
stays with the kind (``twinfed.server.app`` a study, ``twinfed.server.trial`` a trial).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.common import Context
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.workflow import DefaultWorkflow
from flwr.serverapp import Grid

from twinfed.events import StudyAborted, StudyStarted
from twinfed.server.strategy import Progress

COORDINATOR_DIRNAME = "coordinator"


def stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class CoordinatorSession:
    """What a kind's rounds and its finish need of the session."""

    grid: Grid  # prompt replies (twinfed.server.prompt_grid)
    plan: Any  # a TrainingPlan or a TrialPlan
    min_nodes: int
    masked: bool  # the plan's secure aggregation
    audit: Any  # the coordinator's AuditLog
    anchors: Any  # NodeAnchors, the roll call's nodes remembered
    progress: Progress
    started: float  # time.perf_counter() when the session began
    prepared: Any = None  # what the kind's ``prepare`` returned

    def seconds(self) -> float:
        return round(time.perf_counter() - self.started, 3)

    def run_rounds(self, context: Context, strategy_cls, weights, *, rounds: int, **kw):
        """``rounds`` rounds on the session's nodes with a ``strategy_cls`` (a TwinStrategy)
        starting from ``weights``, through the SecAgg+ workflow when the plan masks; the strategy
        (its history, sites and weights) when they are done."""
        fit = None
        if self.masked:
            from twinfed.server.secagg_workflow import TwinSecAggPlusWorkflow

            fit = TwinSecAggPlusWorkflow(self.plan)
        strategy = strategy_cls(self.plan, weights, min_nodes=self.min_nodes, progress=self.progress,
                                masked=self.masked, audit=self.audit,
                                on_sampled=fit.sampled if fit else None, anchors=self.anchors, **kw)
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy)
        DefaultWorkflow(fit_workflow=fit)(self.grid, legacy)
        return strategy


@contextmanager
def coordinator_session(grid: Grid, plan, *, out_dir: Path, min_nodes: int, progress: Progress,
                        check_new: Callable[[Path], None],
                        prepare: Callable[[], Any] | None = None) -> Iterator[CoordinatorSession]:
    """The session of ``plan`` on ``grid``, writing into ``out_dir`` (``check_new``: it is a new
    run of the kind). ``prepare`` (the kind's own checks before anything is logged) runs after
    ``check_new``; what it returns is ``session.prepared``. ``study_started`` is appended once
    the checks pass, ``study_aborted`` if the roll call or the body raises."""
    from twinfed.privacy.secagg import check_secagg, min_sampled
    from twinfed.server.prompt_grid import prompt
    from twinfed.server.roll_call import roll_call

    started = time.perf_counter()
    grid = prompt(grid)  # deployed: replies pulled every 0.1 s, not every 3 s
    out_dir = Path(out_dir)
    check_new(out_dir)
    prepared = prepare() if prepare is not None else None
    masked = plan.privacy.secure_aggregation
    check_secagg(plan, min_nodes)
    audit = coordinator_audit(out_dir / COORDINATOR_DIRNAME)
    audit.append(StudyStarted(
        plan_sha256=plan.sha256(), purpose=plan.purpose, rounds=plan.rounds, min_nodes=min_nodes,
        differential_privacy=plan.privacy.enabled, epsilon_per_site=plan.privacy.epsilon,
        secure_aggregation=masked, secagg_min_sites=plan.privacy.secagg.min_sites if masked else None))
    try:
        anchors, answered = node_anchors(out_dir), {}
        roll_call(grid, max(min_nodes, min_sampled(plan)) if masked else min_nodes, secure=masked,
                  answered=answered)
        anchors.remember_roll_call(answered)
        yield CoordinatorSession(grid=grid, plan=plan, min_nodes=min_nodes, masked=masked, audit=audit,
                                 anchors=anchors, progress=progress, started=started, prepared=prepared)
    except BaseException as exc:
        audit.append(StudyAborted(plan_sha256=plan.sha256(),
                                  code="interrupted" if isinstance(exc, KeyboardInterrupt) else "error"))
        raise


def node_anchors(out_dir: Path):
    """The head of each node's log the coordinator last anchored, in this run's coordinator
    state and the runs beside it (:class:`twinfed.server.strategy.NodeAnchors`)."""
    from twinfed.server.strategy import NodeAnchors

    return NodeAnchors.open(Path(out_dir) / COORDINATOR_DIRNAME)


def coordinator_audit(state_dir: Path):
    """The coordinator's own state (keys, signed audit log) under the run directory."""
    from twinfed.governance.layout import open_audit
    from twinfed.governance.node_state import init_coordinator

    init_coordinator(state_dir, exist_ok=True)
    return open_audit(state_dir)


def server_app(main: Callable[[Grid, Context], None]) -> ServerApp:
    """A Flower ServerApp whose main is ``main``: a study's, a trial's, or the run-config's."""
    app = ServerApp()
    app.main()(main)
    return app
