"""A node's privacy for one study: released counts, calibrated noise, a reservation per round.

At a study's first admitted round the node, under its state lock:
1. releases its patient counts (consented patients used, others excluded) with Gaussian noise
   of the plan's ``count_noise`` (sensitivity 1 patient), charged to the ledger as one segment;
2. derives everything that depends on the site's size from the *noisy* count only: the Poisson
   sample rate (the plan's expected batch over it), the batch size gradients are averaged over,
   and the study's delta (``min(plan delta, 1 / count)``). Being post-processing of a DP release,
   they may leave the node; the exact count never does;
3. calibrates the noise multiplier so that the whole study (the counts, every planned step and,
   when the plan calibrates prediction intervals, the end-of-study release of the calibration
   histogram) lands within the plan's epsilon on top of what the site already spent (Opacus's
   accountant), both at the study's delta and at the site's budget delta.
Each round then reserves its steps in the ledger (audited) before training starts.

The site's budget is an (epsilon, delta) pair (:mod:`twinfed.privacy.ledger`): a plan whose delta
is larger than the budget's is refused before anything is charged
(:class:`~twinfed.privacy.ledger.DeltaExceedsBudget`), the site's spend is checked and reported
at the budget's delta, and the study's own epsilon (``DPPrivacy.epsilon``) at the study's delta,
which is never larger.

The neighbouring relation is add/remove one patient at the site; with the exact size never
released, it is the relevant one. What it does not hide: that the site took part, and whether it
had any eligible patient at all (a site with none refuses, saying so).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from twinfed.atomic import write_json_atomic
from twinfed.events import StudyCalibrated
from twinfed.ledger_file import LedgerError, Segment, capped_delta
from twinfed.models.plan import TrainingPlan
from twinfed.privacy.calibrate import noise_for_budget, sample_rate
from twinfed.privacy.ledger import BudgetExhausted, PrivacyLedger, epsilon_of
from twinfed.wire import DPCounts, DPPrivacy, DPSegment

# The OS CSPRNG: the counts' noise must not be predictable from anything the node reveals.
_CSPRNG = random.SystemRandom()


class StudyPrivacy(BaseModel):
    """``studies/<plan sha256>.json``: the study's privacy set-up at this node."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    plan_sha256: str
    released_used: Annotated[int, Field(ge=0)]
    released_excluded: Annotated[int, Field(ge=0)]
    count_noise: float
    n_released: Annotated[int, Field(ge=1)]  # the count the rate is derived from (at least 1)
    sample_rate: float
    expected_batch: Annotated[int, Field(ge=1)]
    noise_multiplier: float
    delta: float
    target_epsilon: float  # the study's own spend, on top of what the site had spent before
    planned_steps: int
    calibrated_at: str

    def counts(self) -> DPCounts:
        return DPCounts(patients_used=self.released_used, patients_excluded=self.released_excluded,
                        noise_std=self.count_noise)

    def round_segment(self, plan: TrainingPlan, server_round: int) -> Segment:
        return Segment(sample_rate=self.sample_rate, noise_multiplier=self.noise_multiplier,
                       steps=plan.training.local_steps, plan_sha256=self.plan_sha256,
                       round=server_round, mechanism="dp-sgd")


def study_path(state_dir: Path, plan: TrainingPlan) -> Path:
    return Path(state_dir) / "studies" / f"{plan.sha256()}.json"


def load_study(state_dir: Path, plan: TrainingPlan) -> StudyPrivacy | None:
    path = study_path(state_dir, plan)
    if not path.is_file():
        return None
    try:
        return StudyPrivacy.model_validate_json(path.read_bytes())
    except (ValidationError, ValueError):
        raise LedgerError(f"studies/{path.name}: not a valid study calibration; restore it from "
                          "backup (without it the study's noise is unknown)") from None


def count_segment(plan: TrainingPlan) -> Segment:
    """The counts' Gaussian release as the accountant sees it: rate 1, one step."""
    return Segment(sample_rate=1.0, noise_multiplier=plan.privacy.count_noise, steps=1,
                   plan_sha256=plan.sha256(), round=0, mechanism="gaussian-count")


def calibration_segment(plan: TrainingPlan) -> Segment | None:
    """The end-of-study release of the held-out patients' calibration histogram (round
    ``rounds + 1``), if the plan calibrates prediction intervals: planned from the start, so the
    study's DP-SGD noise leaves room for it within the plan's epsilon."""
    if plan.calibration is None:
        return None
    from twinfed.privacy.release import release_segment

    return release_segment(plan_sha256=plan.sha256(), server_round=plan.rounds + 1,
                           noise_multiplier=plan.calibration.noise_multiplier)


@dataclass(frozen=True)
class Calibration:
    """What a site's size decides, computed from its released count only."""

    n_released: int
    sample_rate: float
    expected_batch: int
    delta: float
    noise_multiplier: float


def calibrate(plan: TrainingPlan, n_released: int, *, history=(), accountant="rdp",
              budget_delta: float | None = None) -> Calibration:
    """The study's sample rate, batch, delta and noise for a site whose released patient count
    is ``n_released`` and whose ledger already holds ``history`` (the counts' release included):
    the whole plan lands within the plan's epsilon on top of what ``history`` spent, at the
    study's delta and, when given, at the site's ``budget_delta`` (the larger noise of the two)."""
    n = max(1, n_released)
    delta = capped_delta(plan.privacy.delta, n)
    q = sample_rate(n, plan.training.batch_size)
    before = [s for s in history if s.mechanism == "dp-sgd" or s.plan_sha256 != plan.sha256()]
    planned = [seg for seg in (calibration_segment(plan),) if seg is not None]
    sigma = 0.0
    for at in sorted({delta, delta if budget_delta is None else budget_delta}):
        sigma = max(sigma, noise_for_budget(
            target_epsilon=epsilon_of(before, at, accountant) + plan.privacy.epsilon, delta=at,
            sample_rate=q, steps=plan.rounds * plan.training.local_steps, spent=[*history, *planned],
            accountant=accountant))
    return Calibration(n_released=n, sample_rate=q, expected_batch=max(1, round(q * n)), delta=delta,
                       noise_multiplier=sigma)


def calibrate_study(state_dir: Path, plan: TrainingPlan, ledger: PrivacyLedger, audit, *,
                    patients_used: int, patients_excluded: int) -> StudyPrivacy:
    """The study's set-up (first round: release counts, calibrate, persist). Caller holds the
    state lock. :class:`BudgetExhausted` if the site cannot afford the plan's epsilon."""
    existing = load_study(state_dir, plan)
    if existing is not None:
        return existing
    p = plan.privacy
    ledger.require_delta(p.delta)  # before anything is charged
    _require_left(ledger, p.epsilon)
    sigma_c = p.count_noise
    noisy_used = patients_used + _CSPRNG.gauss(0.0, sigma_c)
    noisy_excluded = patients_excluded + _CSPRNG.gauss(0.0, sigma_c)
    n_released = max(1, round(noisy_used))
    counts = count_segment(plan)
    cal = calibrate(plan, n_released, history=[*ledger.segments, counts], accountant=ledger.accountant,
                    budget_delta=ledger.delta)
    ledger.reserve(counts, cal.delta, audit)
    study = StudyPrivacy(
        plan_sha256=plan.sha256(), released_used=max(0, round(noisy_used)),
        released_excluded=max(0, round(noisy_excluded)), count_noise=sigma_c,
        n_released=n_released, sample_rate=cal.sample_rate, expected_batch=cal.expected_batch,
        noise_multiplier=cal.noise_multiplier, delta=cal.delta, target_epsilon=p.epsilon,
        planned_steps=plan.rounds * plan.training.local_steps,
        calibrated_at=datetime.now(timezone.utc).isoformat())
    write_json_atomic(study_path(state_dir, plan), study.model_dump(mode="json"), mode=0o600)
    audit.append(StudyCalibrated(
        plan_sha256=study.plan_sha256, patients_used=patients_used,
        patients_excluded=patients_excluded, released_patients_used=study.released_used,
        released_patients_excluded=study.released_excluded, count_noise=sigma_c,
        sample_rate=study.sample_rate, noise_multiplier=study.noise_multiplier, delta=study.delta,
        target_epsilon=p.epsilon, planned_steps=study.planned_steps))
    return study


def _require_left(ledger: PrivacyLedger, epsilon: float) -> None:
    """The plan's epsilon must fit in what the site has left, at the budget's delta."""
    delta = ledger.delta
    spent = ledger.spent()
    left = ledger.budget - spent
    if left < epsilon * (1 - 1e-6):
        raise BudgetExhausted(
            f"privacy budget exhausted: epsilon {spent:.3f} of {ledger.budget:g} spent at delta "
            f"{delta:.2g}, {max(left, 0):.3f} left; this plan needs {epsilon:g}. Ask the privacy "
            "officer for a new budget or approve a plan with a smaller epsilon")


def released_privacy(ledger: PrivacyLedger, study: StudyPrivacy, plan: TrainingPlan) -> DPPrivacy:
    """The study's figures as they may leave the node (all from DP releases and the plan)."""
    mine = [s for s in ledger.segments if s.plan_sha256 == study.plan_sha256]
    return DPPrivacy(
        epsilon=epsilon_of(mine, study.delta, ledger.accountant), delta=study.delta,
        accountant=ledger.accountant, noise_multiplier=study.noise_multiplier,
        sample_rate=study.sample_rate, clipping_norm=plan.privacy.clipping_norm,
        segments=tuple(DPSegment(sample_rate=s.sample_rate, noise_multiplier=s.noise_multiplier,
                                 steps=s.steps) for s in mine),
        site_epsilon_spent=ledger.spent(), site_epsilon_budget=ledger.budget,
        site_delta=ledger.delta)  # the site's figures, at the budget's delta


def trial_delta(state_dir: Path, plan) -> float:
    """A trial's delta at this site: the trial plan's, at most 1/N like a study's, N the site's
    patient count as released (noisy) by the study that trained the trial's twin here: already
    public, so the delta and the noise calibrated at it reveal nothing more. A site that did not
    train the twin has released no count; its trial's delta is the plan's (which the site's
    budget delta bounds in any case)."""
    study = load_study(Path(state_dir), plan.twin.training_plan())
    return plan.privacy.delta if study is None else plan.privacy.delta_for(study.n_released)
