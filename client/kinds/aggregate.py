"""What a release of a DP aggregate (a trial's per-arm sums, a study's calibration histogram) does
the same whatever it sums: its charge (a Gaussian sum, noise multiplier ``z`` on the kind's
sensitivity), its noise from the OS CSPRNG, its record (``aggregate_released``, exact counts at
the node only) and its reply (:class:`twinfed.wire.DPAggregate`).

Every random choice inside the sum (identification windows, a trial's error draws) comes from a
generator keyed by the patient and the release's own seed: a secret from the OS CSPRNG drawn for
each release (:meth:`AggregateRelease.compute`), never stored or sent, so the draws are neither
public nor shared between patients (removing one leaves the others' contributions as they were:
the sensitivity holds)."""

from __future__ import annotations

import numpy as np

from twinfed.client.kinds import ReleaseKind
from twinfed.events import AggregateReleased
from twinfed.models.digest import weights_sha256
from twinfed.wire import DPAggregate, Released


class AggregateRelease(ReleaseKind):
    """A release of one noisy sum over the site's patients."""

    kind: str  # "trial" | "calibration": the ledger's and the audit's name for it

    def __init__(self, node, plan, instruction, weights):
        super().__init__(node, plan, instruction, weights)
        self.z: float | None = None
        self.aggregate: DPAggregate | None = None  # once charged (a DP plan)

    @classmethod
    def components(cls, plan) -> int:
        """How many figures the release sends."""
        raise NotImplementedError

    @classmethod
    def sensitivity(cls, plan) -> float:
        """The L2 bound on one patient's part of the sum."""
        raise NotImplementedError

    @classmethod
    def zeros(cls, plan, weights):
        return [np.zeros(1 if plan is None else cls.components(plan), np.float32)]

    def noise_multiplier(self, ledger, delta: float) -> float:
        """The release's noise multiplier, at ``delta``."""
        raise NotImplementedError

    def delta(self) -> float:
        """The delta the release is accounted at (never above the plan's)."""
        return self.plan.privacy.delta

    def exact_sum(self, seed: int) -> tuple[np.ndarray, int, int]:
        """The exact sum over the loaded patients (each clipped to the sensitivity), how many took
        part and how many could not; every draw keyed by ``seed`` and the patient."""
        raise NotImplementedError

    # -- the session's steps ----------------------------------------------------------------------

    def segment(self, ledger, audit):
        from twinfed.privacy.release import release_segment

        delta = self.delta()
        self.z = self.noise_multiplier(ledger, delta)
        return release_segment(plan_sha256=self.plan.sha256(), server_round=self.instruction.round,
                               noise_multiplier=self.z), delta

    def charged(self, ledger, before: float, after: float) -> None:
        from twinfed.privacy.release import noise_std

        sens = self.sensitivity(self.plan)
        # Reported at the budget's delta, as every figure of the site's spend.
        self.aggregate = DPAggregate(
            kind=self.kind, sensitivity=sens, noise_multiplier=self.z, noise_std=noise_std(self.z, sens),
            epsilon=max(0.0, after - before), delta=ledger.delta, accountant=ledger.accountant,
            site_epsilon_spent=after, site_epsilon_budget=ledger.budget, site_delta=ledger.delta)

    def compute(self) -> list[np.ndarray]:
        import secrets

        import torch

        from twinfed.privacy.release import noisy, to_update

        torch.set_num_threads(1)
        vector, self.used, self.excluded = self.exact_sum(secrets.randbits(128))
        if self.aggregate is not None:
            vector = noisy(vector, sensitivity=self.aggregate.sensitivity,
                           noise_multiplier=self.aggregate.noise_multiplier)
        return to_update(vector, self.plan.privacy.update_clip)

    def record(self, audit, base: dict, update, *, masked: bool) -> None:
        aggregate = self.aggregate
        audit.append(AggregateReleased(
            **base, kind=self.kind, coordinator=self.instruction.coordinator, patients_used=self.used,
            patients_excluded=self.excluded, components=int(update[0].size),
            sensitivity=self.sensitivity(self.plan),
            noise_multiplier=aggregate.noise_multiplier if aggregate else None,
            epsilon_spent=aggregate.site_epsilon_spent if aggregate else None,
            aggregate_sha256=weights_sha256(update)))

    def released(self) -> Released:
        return Released(steps=0, aggregate=self.aggregate)
