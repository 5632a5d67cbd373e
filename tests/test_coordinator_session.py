"""A study and a trial are one coordinator session: both open the run's coordinator log with
``study_started`` (the plan's hash and rounds) and, when anything stops them after that (the
operator's Ctrl-C, the SuperLink gone), close it with ``study_aborted`` and let the exception go
on: ``interrupted`` for a KeyboardInterrupt, ``error`` for anything else."""

from __future__ import annotations

import json

import pytest

from builders import TINY_ARMS
from twinfed.governance.layout import state_paths
from twinfed.models.arms import parse_design
from twinfed.models.digest import weights_sha256
from twinfed.models.plan import ModelConfig, TrainingConfig, TrainingPlan
from twinfed.models.spec import load_spec
from twinfed.models.surrogate import build_surrogate, get_weights
from twinfed.models.trial_plan import TrialPlan, TrialTwin
from twinfed.server.app import run_study
from twinfed.server.trial import run_trial


class _Federation:
    """A federation whose SuperLink raises ``exc`` when the coordinator asks for its nodes."""

    def __init__(self, exc: BaseException):
        self.exc = exc

    def get_node_ids(self):
        raise self.exc


def _training() -> TrainingPlan:
    return TrainingPlan(spec=load_spec("glucose"), rounds=2, model=ModelConfig(hidden=8),
                        training=TrainingConfig(local_steps=2, batch_size=4))


def _trial_plan() -> tuple[TrialPlan, list]:
    training = _training()
    weights = get_weights(build_surrogate(training.spec, training.model, seed=training.seed))
    return TrialPlan(design=parse_design(TINY_ARMS, training.spec),
                     twin=TrialTwin(training_plan_json=training.canonical_json(),
                                    weights_sha256=weights_sha256(weights))), weights


def _quiet(_msg: str) -> None:
    pass


@pytest.mark.parametrize("kind", ["study", "trial"])
@pytest.mark.parametrize(("exc", "code"), [(KeyboardInterrupt(), "interrupted"),
                                           (ConnectionError("SuperLink gone"), "error")],
                         ids=["ctrl-c", "superlink-gone"])
def test_a_study_or_trial_stopped_after_it_started_is_logged_aborted_and_the_exception_goes_on(
        tmp_path, kind, exc, code):
    out = tmp_path / "run"
    with pytest.raises(type(exc)):
        if kind == "study":
            plan = _training()
            run_study(_Federation(exc), None, plan, out_dir=out, min_nodes=3, progress=_quiet)
        else:
            plan, weights = _trial_plan()
            run_trial(_Federation(exc), None, plan, weights, out_dir=out, min_nodes=3, progress=_quiet)
    events = [json.loads(line) for line in state_paths(out / "coordinator").audit.read_text().splitlines()]
    assert [e["event"] for e in events] == ["coordinator_initialised", "study_started", "study_aborted"]
    events = events[1:]
    assert events[0]["details"]["plan_sha256"] == plan.sha256()
    assert events[0]["details"]["rounds"] == plan.rounds
    assert events[1]["details"] == {"plan_sha256": plan.sha256(), "code": code}
    assert not (out / "summary.json").exists() and not (out / "trial.json").exists()


def test_a_release_round_is_committed_and_skipped_under_the_round_its_nodes_see(tmp_path):
    """A release's strategy is a training round's: the same commitment, under the plan's round
    number (a calibration's is rounds + 1), and the kind's instruction carries its head."""
    from twinfed.server.release import ReleaseStrategy
    from twinfed.server.session import coordinator_audit

    plan = _training()
    state = tmp_path / "coordinator"
    audit = coordinator_audit(state)
    weights = get_weights(build_surrogate(plan.spec, plan.model, seed=plan.seed))
    strategy = ReleaseStrategy(plan, weights, instruction=lambda head: {"committed": head.hash},
                               release_round=plan.rounds + 1, label="calibration", min_nodes=3, audit=audit)
    config = strategy._fit_config(1)
    strategy.ensure_recorded(1)
    events = [json.loads(line) for line in state_paths(state).audit.read_text().splitlines()]
    assert [(e["event"], e["details"]["round"]) for e in events[1:]] == [("round_started", 3),
                                                                         ("round_skipped", 3)]
    assert config == {"committed": events[1]["hash"]}
    assert events[2]["details"]["code"] == "secagg_halted"
    assert strategy.skipped_rounds == [3] and [h["round"] for h in strategy.history] == [3]
