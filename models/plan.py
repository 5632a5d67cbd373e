"""The training plan: everything that decides what a study computes and what leaves a node.

A plan is a frozen pydantic model. Its canonical form is its JSON with sorted keys and no spaces,
and its identity is the SHA-256 of that text, so every node and the coordinator agree on the
hash byte for byte. No torch here: governance reads plans too.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from twinfed.models.spec import TwinSpec


class ModelConfig(BaseModel):
    """The surrogate's architecture."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str = "mlp-residual"
    hidden: Annotated[int, Field(gt=0, le=4096)] = 256
    layers: Annotated[int, Field(ge=1, le=8)] = 2


class TrainingConfig(BaseModel):
    """Local optimisation on each node, per round."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    local_steps: Annotated[int, Field(gt=0)] = 150
    batch_size: Annotated[int, Field(gt=0)] = 128  # expected patients per step
    learning_rate: Annotated[float, Field(gt=0, lt=1)] = 1e-3


class TrainingPlan(BaseModel):
    """What a study trains, how, for how long, and for which consent purpose."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    spec: TwinSpec
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    rounds: Annotated[int, Field(gt=0, le=10_000)]
    seed: int = 0
    strategy: str = "fedavg"
    metrics: tuple[str, ...] = ("patients_used", "patients_excluded", "train_loss")

    @property
    def purpose(self) -> str:
        return self.spec.purpose

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def sha256(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()
