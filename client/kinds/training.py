"""A training round: DP-SGD on the consented patients from the global weights; the weight change
leaves (clipped to the SecAgg+ range). On a study's first round the node also releases its
patient counts (noised, charged) and calibrates the study's noise from them
(:mod:`twinfed.privacy.study`)."""

from __future__ import annotations

import numpy as np

from twinfed.client.kinds import ReleaseKind, consented_site
from twinfed.client.refusals import RoundRefused
from twinfed.client.session import Admission, parse_plan, train_admitted
from twinfed.errors import ConsentError
from twinfed.events import RoundJoined, RoundSkipped
from twinfed.models.plan import TrainingPlan
from twinfed.wire import INSTRUCTION_KEY, DPCounts, RefusalCode, Released, RoundInstruction


class TrainingRound(ReleaseKind):
    instruction_model = RoundInstruction
    key = INSTRUCTION_KEY
    name = "round"

    @classmethod
    def for_instruction(cls, instruction: RoundInstruction) -> type[ReleaseKind]:
        if instruction.stage == "calibrate":  # after the last round: a release, not training
            from twinfed.client.kinds.calibration import Calibration

            return Calibration
        return cls

    @classmethod
    def parse_plan(cls, text: str) -> TrainingPlan:
        return parse_plan(text)

    @classmethod
    def zeros(cls, plan, weights):
        return [np.zeros_like(w, dtype=np.float32) for w in weights]

    def check_plan(self) -> None:
        if self.plan.unsupported_metrics():
            raise RoundRefused(RefusalCode.PLAN_UNSUPPORTED,
                               f"the plan asks nodes to release {', '.join(self.plan.unsupported_metrics())}, "
                               "which no twinfed node releases")

    def admit(self, entries: list, audit) -> None:
        _acknowledge_skips(audit, entries, self.instruction)

    def load(self) -> None:
        from twinfed.models.windows import WindowIndex

        node, plan = self.node, self.plan
        consented, excluded = consented_site(node, plan.spec, plan.purpose)
        used = training_patients(consented, plan)
        del consented  # its arrays now hold ``used``
        windows = WindowIndex.build(used) if used.n_patients else None
        if windows is None or windows.patients_with_windows().size == 0:
            raise ConsentError(f"site {node.site_name}: no patient has granted consent for purpose "
                               f"{plan.purpose!r} and a full window of {plan.spec.window_steps} steps; "
                               "import consent records with 'twinfed consent import' before joining")
        self.site, self.windows = used, windows
        self.used, self.excluded = used.n_patients, excluded
        self.study = None
        self.privacy = None

    def segment(self, ledger, audit):
        from twinfed.privacy.study import calibrate_study

        self.study = calibrate_study(self.node.state_dir, self.plan, ledger, audit, patients_used=self.used,
                                     patients_excluded=self.excluded)  # the counts, on the first round
        return self.study.round_segment(self.plan, self.instruction.round), self.study.delta

    def charged(self, ledger, before: float, after: float) -> None:
        from twinfed.privacy.study import released_privacy

        self.privacy = released_privacy(ledger, self.study, self.plan)

    def compute(self) -> list[np.ndarray]:
        adm = Admission(node=self.node, plan=self.plan, round=self.instruction.round, site=self.site,
                        windows=self.windows, patients_used=self.used, patients_excluded=self.excluded,
                        study=self.study)
        self.outcome = train_admitted(adm, self.weights)
        return self.outcome.update

    def record(self, audit, base: dict, update, *, masked: bool) -> None:
        study, privacy = self.study, self.privacy
        audit.append(RoundJoined(
            **base, coordinator=self.instruction.coordinator, patients_used=self.used,
            patients_excluded=self.excluded, steps=self.outcome.steps, differential_privacy=study is not None,
            epsilon_study=privacy.epsilon if privacy else None,
            epsilon_spent=privacy.site_epsilon_spent if privacy else None,
            epsilon_budget=privacy.site_epsilon_budget if privacy else None,
            delta=study.delta if study else None,
            noise_multiplier=study.noise_multiplier if study else None,
            update_clip_fraction=self.outcome.update_clip_fraction))

    def released(self) -> Released:
        steps = self.plan.training.local_steps
        if self.study is None:
            return Released(steps=steps)
        return Released(steps=steps, privacy=self.privacy, counts=_named_counts(self.study.counts(), self.plan))


def _acknowledge_skips(audit, entries: list, instruction: RoundInstruction) -> None:
    """Record, once, each earlier round the coordinator says it did not unmask."""
    known = {e.details.get("round") for e in entries
             if e.event == "round_skipped" and e.details.get("plan_sha256") == instruction.plan_sha256}
    for r in sorted(set(instruction.skipped_rounds) - known):
        audit.append(RoundSkipped(round=r, plan_sha256=instruction.plan_sha256, code="not_unmasked",
                                  coordinator=instruction.coordinator))


def training_patients(site, plan: TrainingPlan):
    """The consented patients a study trains on: all, or all but those it holds out to
    calibrate its prediction intervals (``twinfed.models.calibration.held_out``)."""
    if plan.calibration is None:
        return site
    from twinfed.models.calibration import held_out

    out = held_out(plan.sha256(), site.patient_ids, plan.calibration.holdout_fraction)
    return site.subset({pid for pid, h in zip(site.patient_ids, out) if not h}, reuse=True)


def _named_counts(counts: DPCounts, plan: TrainingPlan) -> DPCounts | None:
    """The released counts if the plan names them (a plan may keep them at the node)."""
    return counts if {"patients_used", "patients_excluded"} & set(plan.metrics) else None
