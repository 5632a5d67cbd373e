"""A study's calibration: after its last round (round ``rounds + 1``), the DP histogram of the
held-out patients' normalised forecast errors for the weights the study ended with
(:mod:`twinfed.models.calibration`); its cost was planned into the study's epsilon from the
start. Released once per study at a node, for those weights only."""

from __future__ import annotations

import numpy as np

from twinfed.client.kinds.aggregate import AggregateRelease
from twinfed.client.refusals import RoundRefused
from twinfed.models.digest import weights_sha256
from twinfed.wire import INSTRUCTION_KEY, RefusalCode, RoundInstruction


class Calibration(AggregateRelease):
    instruction_model = RoundInstruction
    key = INSTRUCTION_KEY
    name = "calibration"
    kind = "calibration"

    @classmethod
    def parse_plan(cls, text: str):
        from twinfed.client.session import parse_plan

        return parse_plan(text)

    @classmethod
    def components(cls, plan) -> int:
        from twinfed.models import conformal

        if plan.calibration is None:
            return 1
        return len(plan.spec.states) * conformal.n_bins(plan.calibration.edges)

    @classmethod
    def sensitivity(cls, plan) -> float:
        from twinfed.privacy.release import histogram_sensitivity

        return histogram_sensitivity(len(plan.spec.states))

    def check_plan(self) -> None:
        if self.plan.calibration is None:
            raise RoundRefused(RefusalCode.PLAN_UNSUPPORTED,
                               "the coordinator asked for a calibration the plan does not declare")

    def admit(self, entries: list, audit) -> None:
        self.recheck(entries)  # before any data is read

    def recheck(self, entries: list) -> None:
        """Released once at a node, after the study's last round, and (once the node logged the
        study's end) only for the weights the study ended with; all checked before any charge."""
        plan, sha = self.plan, self.plan.sha256()
        if self.instruction.round != plan.rounds + 1:
            raise RoundRefused(RefusalCode.PLAN_MALFORMED,
                               f"a calibration is the release after the plan's last round (round "
                               f"{plan.rounds + 1}), not round {self.instruction.round}")
        mine = [e for e in entries if e.details.get("plan_sha256") == sha]
        if any((e.event == "aggregate_released" and e.details.get("kind") == "calibration")
               or (e.event == "privacy_spent" and e.details.get("mechanism") == "gaussian-sum") for e in mine):
            raise RoundRefused(RefusalCode.ALREADY_RELEASED,
                               "this node already released (or was charged for) this study's calibration; "
                               "a study is calibrated once")
        finished = [e for e in mine if e.event == "study_finished"]
        if finished and weights_sha256(self.weights) != finished[-1].details.get("weights_sha256"):
            raise RoundRefused(RefusalCode.MODEL_MISMATCH,
                               "the weights sent are not those this node recorded at the study's end")

    def load(self) -> None:
        from twinfed.client.kinds import consented_site
        from twinfed.models.calibration import held_out

        site, _others = consented_site(self.node, self.plan.spec, self.plan.purpose)
        out = held_out(self.plan.sha256(), site.patient_ids, self.plan.calibration.holdout_fraction)
        self.site, self.patients = site, np.flatnonzero(out)

    def delta(self) -> float:
        from twinfed.privacy.study import load_study

        study = load_study(self.node.state_dir, self.plan)
        return study.delta if study is not None else self.plan.privacy.delta

    def noise_multiplier(self, ledger, delta: float) -> float:
        return self.plan.calibration.noise_multiplier  # declared by the plan, in its epsilon

    def exact_sum(self, seed: int):
        return calibration_sum(self.plan, self.site, self.patients, self.weights, seed=seed)


def calibration_sum(plan, site, patients: np.ndarray, weights, *, seed: int) -> tuple[np.ndarray, int, int]:
    """The held-out ``patients``' exact histogram (each patient's part clipped), how many took
    part and how many could not (their record too short)."""
    from twinfed.models.calibration import calibration_histogram
    from twinfed.models.twin import Twin

    twin = Twin.from_weights(plan, weights)
    histogram, used = calibration_histogram(twin, site, patients, plan.calibration, seed=seed)
    return histogram.ravel(), used, int(patients.size) - used
