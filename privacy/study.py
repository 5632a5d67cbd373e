"""A node's privacy settings for one study, calibrated once and kept in its state directory.

At a study's first round the node calibrates its noise from what its ledger has left and the
plan (all rounds x local steps); later rounds, also in fresh processes, reuse the same noise.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from twinfed.models.plan import TrainingPlan
from twinfed.privacy.calibrate import noise_for_budget, sample_rate
from twinfed.atomic import write_json_atomic
from twinfed.privacy.ledger import BudgetExhausted, PrivacyLedger


class StudyPrivacy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    plan_sha256: str
    noise_multiplier: float
    sample_rate: float
    n_patients: int
    delta: float
    target_epsilon: float  # the study's own spend, on top of what the site had spent before
    planned_steps: int
    calibrated_at: str


def study_path(state_dir: Path, plan: TrainingPlan) -> Path:
    return Path(state_dir) / "studies" / f"{plan.sha256()}.json"


def open_ledger(state_dir: Path, plan: TrainingPlan, n_patients: int) -> PrivacyLedger:
    """The node's ledger; a new ledger's budget is the first plan's epsilon at min(delta, 1/N)."""
    return PrivacyLedger.open(state_dir, epsilon_budget=plan.privacy.epsilon,
                              delta=min(plan.privacy.delta, 1.0 / n_patients),
                              accountant=plan.privacy.accountant)


def study_privacy(state_dir: Path, plan: TrainingPlan, ledger: PrivacyLedger,
                  n_patients: int) -> StudyPrivacy:
    path = study_path(state_dir, plan)
    if path.is_file():
        return StudyPrivacy.model_validate_json(path.read_text(encoding="utf-8"))
    spent = ledger.spent()
    left = ledger.budget - spent
    if left < plan.privacy.epsilon * (1 - 1e-6):
        raise BudgetExhausted(
            f"privacy budget exhausted: epsilon {spent:.3f} of {ledger.budget:g} spent at delta "
            f"{ledger.delta:.2g}, {max(left, 0):.3f} left; this plan needs {plan.privacy.epsilon:g}. "
            "Ask the privacy officer for a new budget or approve a plan with a smaller epsilon")
    steps = plan.rounds * plan.training.local_steps
    q = sample_rate(n_patients, plan.training.batch_size)
    sigma = noise_for_budget(target_epsilon=spent + plan.privacy.epsilon, delta=ledger.delta,
                             sample_rate=q, steps=steps, spent=ledger.segments,
                             accountant=ledger.state.accountant)
    study = StudyPrivacy(plan_sha256=plan.sha256(), noise_multiplier=sigma, sample_rate=q,
                         n_patients=n_patients, delta=ledger.delta,
                         target_epsilon=plan.privacy.epsilon, planned_steps=steps,
                         calibrated_at=datetime.now(timezone.utc).isoformat())
    write_json_atomic(path, study.model_dump(mode="json"))
    return study
