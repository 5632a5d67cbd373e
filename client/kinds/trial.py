"""A federated in-silico trial: the approved trial plan run on the site's consented patients'
twins (the weights its plan names), released as DP per-arm sums (:mod:`twinfed.models.trial`).
A patient whose arm controls would leave the spec's ranges is excluded, never a failure: the
release is charged before it is computed, so one patient's data must not refuse it."""

from __future__ import annotations

import numpy as np

from twinfed.client.kinds.aggregate import AggregateRelease
from twinfed.client.refusals import RoundRefused
from twinfed.errors import ConsentError, PlanError
from twinfed.models.digest import weights_sha256
from twinfed.wire import TRIAL_KEY, RefusalCode, TrialInstruction


class Trial(AggregateRelease):
    instruction_model = TrialInstruction
    key = TRIAL_KEY
    name = "trial"
    kind = "trial"

    @classmethod
    def parse_plan(cls, text: str):
        from twinfed.models.trial_plan import TrialPlan

        try:
            return TrialPlan.model_validate_json(text)
        except ValueError as exc:
            raise PlanError(f"the coordinator sent a malformed trial plan ({str(exc).splitlines()[0]})") from None

    @classmethod
    def components(cls, plan) -> int:
        from twinfed.models.trial import layout, plan_structures

        return len(layout(plan.design, plan_structures(plan.twin.training_plan())))

    @classmethod
    def sensitivity(cls, plan) -> float:
        from twinfed.models.trial import plan_structures, sensitivity

        return sensitivity(plan.design, plan_structures(plan.twin.training_plan()))

    def admit(self, entries: list, audit) -> None:
        from twinfed.models.arms import validate_design

        validate_design(self.plan.design.model_dump(mode="json"), self.plan.spec,
                        source="the trial plan's design")
        if weights_sha256(self.weights) != self.plan.twin.weights_sha256:
            raise RoundRefused(RefusalCode.MODEL_MISMATCH,
                               "the weights sent are not the twin the approved trial plan names")

    def load(self) -> None:
        from twinfed.client.kinds import consented_site

        site, _others = consented_site(self.node, self.plan.spec, self.plan.purpose)
        if site.n_patients == 0:
            raise ConsentError(f"site {self.node.site_name}: no patient has granted consent for purpose "
                               f"{self.plan.purpose!r}; import consent records with 'twinfed consent import'")
        self.site, self.patients = site, np.arange(site.n_patients)

    def delta(self) -> float:
        from twinfed.privacy.study import trial_delta

        return trial_delta(self.node.state_dir, self.plan)  # min(plan delta, 1/N released), like a study's

    def noise_multiplier(self, ledger, delta: float) -> float:
        from twinfed.privacy.release import noise_for_epsilon

        return noise_for_epsilon(ledger, epsilon=self.plan.privacy.epsilon, delta=delta)

    def exact_sum(self, seed: int):
        return trial_sum(self.plan, self.site, self.patients, self.weights, seed=seed)


def trial_sum(plan, site, patients: np.ndarray, weights, *, seed: int) -> tuple[np.ndarray, int, int]:
    """The trial's exact per-arm sums over ``patients`` (each clipped), how many took part and how
    many were excluded (their arm's controls out of the spec's range)."""
    from twinfed.models.trial import contributions, layout, plan_structures, run_site_trial
    from twinfed.models.twin import Twin

    twin = Twin.from_weights(plan.twin.training_plan(), weights)
    outcomes = run_site_trial(twin, site, plan.design, calibration=plan.twin.calibration,
                              exclude_out_of_range=True, patients=patients, seed=seed)
    structures = plan_structures(plan.twin.training_plan())
    if outcomes.structures != structures:  # the weights load into the plan's twin: never reached
        raise ValueError("the twin's core structures are not the trial plan's")
    if outcomes.n_patients == 0:  # charged already: the noisy zero vector, never a refusal
        return np.zeros(len(layout(plan.design, structures))), 0, outcomes.n_excluded
    return (contributions(outcomes.values, plan.design, outcomes.structure_values).sum(axis=0),
            outcomes.n_patients, outcomes.n_excluded)
