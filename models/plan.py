"""The training plan: everything that decides what a study computes and what leaves a node.

A plan is a frozen pydantic model. Its canonical form is its JSON with sorted keys and no spaces,
and its identity is the SHA-256 of that text, so every node and the coordinator agree on the
hash byte for byte. No torch here: governance reads plans too.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from twinfed.models.spec import TwinSpec

# A signed plan's numbers and switches are strictly typed, from JSON and from Python alike: "5",
# 5.0 or true is not a count, "yes" or 1 is not a switch, "0.5" is not a number (a whole number
# is a number: epsilon = 3 is 3.0).
Int = Annotated[int, Field(strict=True)]
Real = Annotated[float, Field(strict=True)]
Bool = Annotated[bool, Field(strict=True)]
# The aggregation strategies the coordinator implements (twinfed.server.strategy).
STRATEGIES = ("fedavg",)

# Figures a node may release when a plan names them: noisy counts, charged to its ledger.
RELEASABLE_METRICS = ("patients_used", "patients_excluded")


class ModelConfig(BaseModel):
    """The surrogate's architecture: ``hybrid`` (a mechanistic core from the spec's
    ``[twin.core]``, an encoder of its parameters and a bounded correction; the default for specs
    with a core) or ``mlp-residual`` (a neural network beside a linear path). ``auto`` picks."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    kind: Literal["auto", "hybrid", "mlp-residual"] = "auto"
    # Width and depth of the networks (None: the kind's default, see ``resolved``). The hybrid's
    # encoder and correction are small on purpose: DP noise grows with the weight count.
    hidden: Annotated[Int, Field(gt=0, le=4096)] | None = None
    layers: Annotated[Int, Field(ge=1, le=8)] | None = None
    # The study starts from weights pretrained on a public virtual cohort (twinfed.models.pretrain),
    # named by their digest; None: from a fresh, seeded initialisation.
    pretrained_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None

    def resolved(self, spec: TwinSpec) -> ModelConfig:
        """``auto`` and unset sizes made explicit: ``hybrid`` (32 wide, 1 layer) for a spec with a
        ``[twin.core]``, else ``mlp-residual`` (64 wide, 2 layers)."""
        kind = self.kind if self.kind != "auto" else ("hybrid" if spec.core is not None else "mlp-residual")
        hidden, layers = DEFAULT_SIZES[kind]
        return self.model_copy(update={"kind": kind, "hidden": self.hidden or hidden,
                                       "layers": self.layers or layers})


DEFAULT_SIZES = {"hybrid": (32, 1), "mlp-residual": (64, 2)}


# The rolled-forward loss (TrainingConfig.rolled_hours): the span it may cover, and how often along
# it the rolled path is scored against the record.
ROLLED_HOURS = (2.0, 12.0)
ROLLED_EVERY_MINUTES = 30


class TrainingConfig(BaseModel):
    """Local optimisation on each node, per round."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    local_steps: Annotated[Int, Field(gt=0)] = 10
    batch_size: Annotated[Int, Field(gt=0)] = 256  # expected patients per step
    learning_rate: Annotated[Real, Field(gt=0, lt=1)] = 1e-2
    # Windows looked at per sampled patient; the patient's loss is their mean (one DP example).
    windows_per_patient: Annotated[Int, Field(gt=0, le=256)] = 16
    # "cosine": the learning rate falls from learning_rate to a tenth of it over the rounds, so
    # late rounds add less DP noise to the model; "constant" keeps it.
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    # Opt-in, hybrid twins only: each patient's example also carries long windows, the core rolled
    # forward ``rolled_hours`` from the origin under the recorded controls and scored against the
    # record every ``ROLLED_EVERY_MINUTES``; that loss counts ``rolled_weight`` beside the
    # horizon's (twinfed.models.train). 0: off. Both are left out of the canonical JSON at their
    # defaults, so plans written before them keep their hashes.
    rolled_hours: Annotated[Real, Field(ge=0)] = 0.0
    rolled_weight: Annotated[Real, Field(gt=0, le=100)] = 0.5

    @field_validator("rolled_hours")
    @classmethod
    def _rolled_span(cls, value: float) -> float:
        grid = ROLLED_EVERY_MINUTES / 60
        if value != 0 and not (ROLLED_HOURS[0] <= value <= ROLLED_HOURS[1]
                               and abs(value / grid - round(value / grid)) < 1e-9):
            raise ValueError(f"rolled_hours must be 0 (off) or {ROLLED_HOURS[0]:g} to {ROLLED_HOURS[1]:g} "
                             f"hours in steps of {ROLLED_EVERY_MINUTES} minutes, got {value:g}")
        return value

    @model_serializer(mode="wrap")
    def _without_default_rolled(self, handler):
        doc = handler(self)
        if isinstance(doc, dict):
            for name in ("rolled_hours", "rolled_weight"):
                if name in doc and doc[name] == type(self).model_fields[name].default:
                    del doc[name]
        return doc

    def for_round(self, server_round: int, rounds: int) -> TrainingConfig:
        """This round's settings (the learning rate under the schedule)."""
        if self.lr_schedule == "constant" or rounds <= 1:
            return self
        import math

        frac = (server_round - 1) / (rounds - 1)
        scale = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(max(frac, 0.0), 1.0)))
        return self.model_copy(update={"learning_rate": self.learning_rate * scale})


class SecAggConfig(BaseModel):
    """What nodes require of a SecAgg+ round before they take part (checked on both sides)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    # The coordinator never unmasks, and nodes never help unmask, a sum of fewer sites.
    min_sites: Annotated[Int, Field(ge=2, le=100_000)] = 3
    # What the round's neighbourhood (num_shares) and threshold are derived from, on both sides
    # (twinfed.privacy.neighbourhood, after Bell et al., CCS 2020): at most this fraction of a
    # round's sampled nodes (rounded up) collude with the coordinator, and at most this fraction
    # (rounded up) drop out during the round. 10% each is the scale of the paper's own examples
    # and rounds up to one node of each in any consortium of 3 to 10.
    corrupt_fraction: Annotated[Real, Field(ge=0, le=0.5)] = 0.1
    dropout_fraction: Annotated[Real, Field(ge=0, le=0.5)] = 0.1
    # P(some honest node's update is exposed) <= 2^-security_bits: 40 is the paper's statistical
    # security parameter. P(a round fails to complete) <= 2^-correctness_bits: a failed round
    # is lost work, not a leak, so one in a million is enough.
    security_bits: Annotated[Int, Field(ge=16, le=128)] = 40
    correctness_bits: Annotated[Int, Field(ge=1, le=64)] = 20


# The normalised forecast error's histogram edges (see twinfed.models.calibration): fine where
# the 80% and 95% quantiles usually fall (scores of 1-3), one open bin above 4: a quantile is read
# off the tail above it, and every bin in that tail adds its DP noise. A design study on 723
# held-out patients of 3 sites (README, "Prediction intervals") chose these and the noise: the
# coverage's spread from DP is 0.9 points at the 95% level (1.4 with bins up to 10 and noise 3).
DEFAULT_EDGES = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0)


class CalibrationConfig(BaseModel):
    """Prediction intervals by split conformal prediction, calibrated at the end of a study.

    Each node keeps ``holdout_fraction`` of its consented patients out of training (chosen by a
    hash of the plan and the patient id, the same every round) and, once the twin is trained,
    releases the histogram of their normalised forecast errors with Gaussian noise of
    ``noise_multiplier`` (sensitivity: one patient moves at most one unit of mass per state),
    charged to its ledger within the plan's epsilon. The coordinator reads each level's quantile
    off the summed histogram (``twinfed.models.calibration``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    holdout_fraction: Annotated[Real, Field(gt=0, le=0.9)] = 0.25
    noise_multiplier: Annotated[Real, Field(gt=0, le=1e4)] = 2.5
    levels: tuple[Annotated[Real, Field(gt=0, lt=1)], ...] = (0.8, 0.95)
    edges: tuple[Annotated[Real, Field(gt=0)], ...] = DEFAULT_EDGES
    # Each calibration patient's first hours identify them (as evaluation and what-if do); the
    # windows after them are scored.
    identify_hours: Annotated[Real, Field(gt=0, le=24 * 366)] = 48.0

    @model_validator(mode="after")
    def _ordered(self) -> CalibrationConfig:
        if list(self.edges) != sorted(set(self.edges)) or len(self.edges) < 2:
            raise ValueError("calibration edges must be at least two increasing numbers")
        if list(self.levels) != sorted(set(self.levels)) or not self.levels:
            raise ValueError("calibration levels must be increasing, e.g. (0.8, 0.95)")
        return self


class PrivacyConfig(BaseModel):
    """Patient-level DP-SGD at every node, and secure aggregation of the nodes' updates."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    enabled: Bool = True
    epsilon: Annotated[Real, Field(gt=0, le=100)] = 3.0  # per site, for the whole study
    delta: Annotated[Real, Field(gt=0, lt=1)] = 1e-5  # a node uses min(delta, 1/N)
    clipping_norm: Annotated[Real, Field(gt=0)] = 0.1  # per-patient gradient norm bound
    accountant: Literal["rdp", "prv"] = "rdp"
    secure_aggregation: Bool = True
    # SecAgg+ quantises each update into [-update_clip, update_clip]; updates are weight changes
    # of one round, far smaller than this (checked and reported as update_clip_fraction).
    update_clip: Annotated[Real, Field(gt=0)] = 0.5
    # Std of the Gaussian noise on the patient counts each node releases once per study
    # (sensitivity 1 patient); the sample rate and delta are derived from the noisy count.
    count_noise: Annotated[Real, Field(gt=0, le=1e6)] = 20.0
    secagg: SecAggConfig = SecAggConfig()

    def label(self) -> dict:
        """How a study or a twin was trained, with a warning for every protection turned off,
        so no output of a baseline goes unlabelled (summary.json, evaluate, whatif)."""
        label = {"differential_privacy": self.enabled, "secure_aggregation": self.secure_aggregation,
                 "epsilon_per_site": self.epsilon if self.enabled else None,
                 "delta_max": self.delta if self.enabled else None,
                 "clipping_norm": self.clipping_norm, "accountant": self.accountant}
        warnings = []
        if not self.enabled:
            warnings.append("NO DIFFERENTIAL PRIVACY: a baseline only; this model must not leave "
                            "the study")
        if not self.secure_aggregation:
            warnings.append("NO SECURE AGGREGATION: the coordinator saw every site's update")
        return label | ({"warning": "; ".join(warnings)} if warnings else {})


class TrainingPlan(BaseModel):
    """What a study trains, how, for how long, and for which consent purpose."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    spec: TwinSpec
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    rounds: Annotated[Int, Field(gt=0, le=10_000)]
    seed: Int = 0
    privacy: PrivacyConfig = PrivacyConfig()
    # How the coordinator combines the updates: only what it implements (STRATEGIES).
    strategy: str = "fedavg"
    # The DP-released figures the nodes report (see twinfed.wire); nothing else can be asked for.
    metrics: tuple[str, ...] = ("patients_used", "patients_excluded")
    # Prediction intervals calibrated at the study's end (None: no intervals). Left out of the
    # canonical JSON when None, so plans written before intervals existed keep their hashes.
    calibration: CalibrationConfig | None = None

    @field_validator("strategy")
    @classmethod
    def _implemented(cls, value: str) -> str:
        if value not in STRATEGIES:
            raise ValueError(f"strategy {value!r} is not implemented; the coordinator implements "
                             f"{', '.join(STRATEGIES)}")
        return value

    def unsupported_metrics(self) -> list[str]:
        """Metrics this plan asks for that no node ever releases (e.g. a training loss)."""
        return [m for m in self.metrics if m not in RELEASABLE_METRICS]

    @model_validator(mode="after")
    def _resolve_model(self) -> TrainingPlan:
        """The model's kind and sizes made explicit (``ModelConfig.resolved``), so a plan's
        canonical JSON (and hash) names the architecture it trains."""
        if self.model.kind == "hybrid" and self.spec.core is None:
            raise ValueError("model kind 'hybrid' needs a [twin.core] in the spec")
        object.__setattr__(self, "model", self.model.resolved(self.spec))
        return self

    @model_validator(mode="after")
    def _rolled_fits(self) -> TrainingPlan:
        """The rolled-forward loss rolls a core (a hybrid twin) over whole steps, scored on a grid
        the spec's step divides, beyond the forecast's horizon."""
        hours = self.training.rolled_hours
        if not hours:
            return self
        step = self.spec.step_minutes
        if self.model.kind != "hybrid":
            raise ValueError("training.rolled_hours needs a hybrid twin (a spec with a [twin.core], "
                             f"model kind 'hybrid'), not {self.model.kind!r}")
        if ROLLED_EVERY_MINUTES % step:
            raise ValueError(f"training.rolled_hours scores the path every {ROLLED_EVERY_MINUTES} minutes; "
                             f"the spec's step of {step} minutes does not divide it")
        if hours * 60 <= self.spec.horizon_minutes:
            raise ValueError(f"training.rolled_hours ({hours:g} h) must reach beyond the forecast's "
                             f"horizon of {self.spec.horizon_minutes} minutes")
        return self

    @property
    def purpose(self) -> str:
        return self.spec.purpose

    def canonical_json(self) -> str:
        doc = self.model_dump(mode="json")
        if doc.get("calibration") is None:
            doc.pop("calibration", None)
        return json.dumps(doc, sort_keys=True, separators=(",", ":"))

    def sha256(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()


TRIAL_PLAN_KIND = "in-silico-trial"


def parse_any_plan(text: str | bytes):
    """A training plan, or an in-silico trial's plan (``twinfed.models.trial_plan``: its JSON
    says ``"kind": "in-silico-trial"``; a training plan has no kind), from its JSON.
    ``ValueError`` (pydantic's ``ValidationError`` among them) if it is neither. The trial plan's
    module (numpy) is imported only for a trial plan: governance starts light."""
    doc = json.loads(text)
    if isinstance(doc, dict) and doc.get("kind") == TRIAL_PLAN_KIND:
        from twinfed.models.trial_plan import TrialPlan

        return TrialPlan.model_validate(doc)
    return TrainingPlan.model_validate(doc)
