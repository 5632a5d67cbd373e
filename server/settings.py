"""The coordinator's study settings, from Flower's run config (``--run-config`` / pyproject).

The plan travels whole: the run-config key ``plan`` holds its canonical JSON (and ``plan-sha256``
its hash, checked), so every field of :class:`TrainingPlan` deploys exactly as approved. The
other study keys are conveniences that build a plan when ``plan`` is empty (``flwr run`` by hand).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from twinfed.errors import PlanError
from twinfed.models.plan import (CalibrationConfig, ModelConfig, PrivacyConfig, SecAggConfig, TrainingConfig,
                                 TrainingPlan)
from twinfed.models.spec import load_spec


class StudySettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    plan_json: str = Field("", alias="plan")  # a whole plan's canonical JSON; wins over the rest
    plan_sha256: str = ""
    pretrained: str = ""  # the model directory of the pretrained weights the plan names, if any
    # A federated in-silico trial instead of a study: the trial plan's canonical JSON (checked
    # against its hash) and the model directory of the twin it names.
    trial_plan: str = ""
    trial_plan_sha256: str = ""
    trial_model: str = ""

    spec: str = "glucose"  # a spec file or a built-in twin name
    rounds: Annotated[int, Field(gt=0)] = 5
    out_dir: Path = Path("runs/flwr")
    seed: int = 0
    sites: str = ""  # simulation only: "name=dir,name=dir", one entry per simulated node
    min_nodes: Annotated[int, Field(gt=0)] = 1
    model: Literal["auto", "hybrid", "mlp-residual"] = "auto"
    hidden: Annotated[int, Field(ge=0)] = 0  # 0: the model kind's default
    layers: Annotated[int, Field(ge=0)] = 0
    local_steps: Annotated[int, Field(gt=0)] = TrainingConfig().local_steps
    batch_size: Annotated[int, Field(gt=0)] = TrainingConfig().batch_size
    learning_rate: Annotated[float, Field(gt=0)] = TrainingConfig().learning_rate
    windows_per_patient: Annotated[int, Field(gt=0)] = TrainingConfig().windows_per_patient
    # Privacy is on unless a run config turns it off (baselines and benchmarks only).
    differential_privacy: bool = PrivacyConfig().enabled
    epsilon: Annotated[float, Field(gt=0)] = PrivacyConfig().epsilon
    delta: Annotated[float, Field(gt=0, lt=1)] = PrivacyConfig().delta
    clipping_norm: Annotated[float, Field(gt=0)] = PrivacyConfig().clipping_norm
    accountant: Literal["rdp", "prv"] = PrivacyConfig().accountant
    secure_aggregation: bool = PrivacyConfig().secure_aggregation
    secagg_min_sites: Annotated[int, Field(ge=2)] = SecAggConfig().min_sites
    # Prediction intervals, calibrated at the study's end on patients each node holds out.
    calibration: bool = True
    calibration_holdout: Annotated[float, Field(gt=0, le=0.9)] = CalibrationConfig().holdout_fraction
    calibration_noise: Annotated[float, Field(gt=0)] = CalibrationConfig().noise_multiplier

    @classmethod
    def from_run_config(cls, cfg: dict) -> StudySettings:
        try:
            return cls.model_validate({("plan" if k == "plan" else k.replace("-", "_")): v
                                       for k, v in cfg.items()})
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(x) for x in err["loc"]).replace("_", "-")
            raise PlanError(f"run config key {key}: {err['msg']}") from None

    def trial(self):
        """The trial plan the run config carries (``trial-plan``), checked against its hash."""
        from twinfed.models.trial_plan import TrialPlan

        plan = _parsed(TrialPlan, self.trial_plan, self.trial_plan_sha256, "trial-plan", "trial plan")
        if not self.trial_model:
            raise PlanError("run config key trial-model: give the model directory of the trial's twin")
        return plan

    def plan(self) -> TrainingPlan:
        if self.plan_json:
            return _parsed(TrainingPlan, self.plan_json, self.plan_sha256, "plan", "training plan")
        model = ModelConfig(kind=self.model, hidden=self.hidden or None, layers=self.layers or None)
        if self.pretrained:
            from twinfed.models.pretrain import pretrained_config

            model = pretrained_config(model, Path(self.pretrained))
        return TrainingPlan(
            spec=load_spec(self.spec),
            model=model,
            training=TrainingConfig(local_steps=self.local_steps, batch_size=self.batch_size,
                                    learning_rate=self.learning_rate,
                                    windows_per_patient=self.windows_per_patient),
            rounds=self.rounds, seed=self.seed,
            privacy=PrivacyConfig(enabled=self.differential_privacy, epsilon=self.epsilon,
                                  delta=self.delta, clipping_norm=self.clipping_norm,
                                  accountant=self.accountant,
                                  secure_aggregation=self.secure_aggregation,
                                  secagg=SecAggConfig(min_sites=self.secagg_min_sites)),
            calibration=CalibrationConfig(holdout_fraction=self.calibration_holdout,
                                          noise_multiplier=self.calibration_noise) if self.calibration else None,
        )


def _parsed(model, text: str, sha256: str, key: str, what: str):
    """A plan from its canonical JSON under run-config ``key``, checked against ``key-sha256``."""
    try:
        plan = model.model_validate_json(text)
    except ValidationError as exc:
        raise PlanError(f"run config key {key}: not a valid {what} ({exc.errors()[0]['msg']})") from None
    if sha256 and plan.sha256() != sha256:
        raise PlanError(f"run config key {key} does not hash to {key}-sha256; pass the plan as written "
                        "by twinfed (its canonical JSON)")
    return plan
