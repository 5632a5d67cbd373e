"""The plan of a federated in-silico trial: what each site's officer approves before its node runs
a trial on its patients' twins and releases the aggregates.

A trial plan names everything that decides what the trial computes and what leaves a node: the
design (arms, outcomes, start, duration, consent purpose: ``twinfed.models.arms``), the twin
(the training plan it was trained under, its weights by digest, its interval calibration whole,
which is an aggregate), and the release's privacy (the epsilon each site spends on it, SecAgg+).
Like a training plan, it is a frozen pydantic model whose identity is the SHA-256 of its
canonical JSON, approved with ``twinfed plan approve`` and checked by every node.

The weights themselves travel with the instruction (they are the coordinator's); a node refuses
weights whose digest is not the plan's. No torch here: governance reads trial plans.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from twinfed.models.arms import TrialDesign
from twinfed.models.calibration import IntervalCalibration
from twinfed.models.plan import TRIAL_PLAN_KIND, Bool, Real, SecAggConfig, TrainingPlan
from twinfed.models.spec import TwinSpec

KIND = TRIAL_PLAN_KIND
Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class TrialPrivacy(BaseModel):
    """What a trial's release costs each site, and how it is aggregated."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    enabled: Bool = True
    # Each site's spend on this trial: the node calibrates its noise so that its ledger grows by
    # at most this (RDP composition with everything the site released before).
    epsilon: Annotated[Real, Field(gt=0, le=100)] = 1.0
    # At most the site's budget delta (a node refuses a larger one: delta_exceeds_budget); a node
    # uses min(delta, 1/N) like a study (delta_for).
    delta: Annotated[Real, Field(gt=0, lt=1)] = 1e-5
    accountant: Literal["rdp", "prv"] = "rdp"
    secure_aggregation: Bool = True
    # SecAgg+ carries the vector of sums divided by twinfed.privacy.release.SUM_SCALE inside this
    # clip (the same quantisation as a training update).
    update_clip: Annotated[Real, Field(gt=0)] = 0.5
    secagg: SecAggConfig = SecAggConfig()

    def delta_for(self, n_released: int) -> float:
        """The trial's delta at a site whose released (noisy) patient count is ``n_released``:
        ``min(delta, 1/N)``, as a study's."""
        from twinfed.ledger_file import capped_delta

        return capped_delta(self.delta, n_released)

    def label(self) -> dict:
        label = {"differential_privacy": self.enabled, "secure_aggregation": self.secure_aggregation,
                 "epsilon_per_site": self.epsilon if self.enabled else None,
                 "delta": self.delta if self.enabled else None, "accountant": self.accountant}
        warnings = []
        if not self.enabled:
            warnings.append("NO DIFFERENTIAL PRIVACY: exact aggregates left the sites (a simulated "
                            "baseline only)")
        if not self.secure_aggregation:
            warnings.append("NO SECURE AGGREGATION: the coordinator saw every site's aggregate")
        return label | ({"warning": "; ".join(warnings)} if warnings else {})


class TrialTwin(BaseModel):
    """The twin a trial runs on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    training_plan_json: str  # the canonical JSON of the plan it was trained under
    weights_sha256: Hex64  # twinfed.models.digest.weights_sha256 of its weights
    calibration: IntervalCalibration | None = None  # its intervals (None: no propagated uncertainty)

    def training_plan(self) -> TrainingPlan:
        return TrainingPlan.model_validate_json(self.training_plan_json)


class TrialPlan(BaseModel):
    """A federated in-silico trial: one release per site, under this plan's approval."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    kind: Literal["in-silico-trial"] = KIND
    design: TrialDesign
    twin: TrialTwin
    privacy: TrialPrivacy = TrialPrivacy()

    @model_validator(mode="after")
    def _consistent(self) -> TrialPlan:
        plan = self.twin.training_plan()
        if self.twin.calibration is not None:
            self.twin.calibration.check_spec(plan.spec)
        states = set(plan.spec.state_columns)
        missing = [o.state for o in self.design.outcomes if o.state not in states]
        if missing:
            raise ValueError(f"the design's outcomes read {missing}, which the twin does not forecast")
        return self

    @property
    def spec(self) -> TwinSpec:
        return self.twin.training_plan().spec

    @property
    def purpose(self) -> str:
        return self.design.purpose

    @property
    def rounds(self) -> int:
        return 1

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def sha256(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()
