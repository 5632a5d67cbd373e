"""One admitted round of training at a hospital node: a pure function of the admission.

The governance gate (:mod:`twinfed.client.gate`) decides whether a round may run, loads the
consented patients and reserves the privacy spend; what is left here is the computation: train
from the global weights (DP-SGD unless the plan is a simulated non-private baseline), and return
the weight change clipped to the SecAgg+ range. Nothing here writes node state except the
optimiser's moments (kept for the next round, never sent), and only after the spend was recorded.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from twinfed.client.node import NodeConfig
from twinfed.errors import PlanError
from twinfed.models.plan import TrainingPlan


@dataclass(frozen=True)
class Admission:
    """A round the gate let through, and everything the training needs."""

    node: NodeConfig
    plan: TrainingPlan
    round: int
    site: object  # SiteData of the consented patients only (stays at the node)
    windows: object  # models.windows.WindowIndex of ``site``, built once by the gate
    patients_used: int  # exact: for the node's own audit log only
    patients_excluded: int
    study: object | None  # privacy.study.StudyPrivacy; None for a non-private baseline


@dataclass(frozen=True)
class TrainOutcome:
    update: list[np.ndarray]  # change of the weights over the round, clipped to the plan's range
    steps: int
    update_clip_fraction: float  # share of update entries that hit the clip (should be ~0)


def parse_plan(text: str) -> TrainingPlan:
    try:
        return TrainingPlan.model_validate_json(text)
    except ValueError as exc:
        raise PlanError(f"the coordinator sent a malformed plan ({str(exc).splitlines()[0]})") from None


def round_seed(plan: TrainingPlan, site_name: str, server_round: int) -> int:
    site = zlib.crc32(site_name.encode())
    return int.from_bytes(hashlib.sha256(f"{plan.seed}:{site}:{server_round}".encode()).digest()[:4], "big")


def optimizer_state(node: NodeConfig, plan: TrainingPlan) -> Path:
    """Where the node keeps its optimiser's moments for this study (never sent)."""
    return node.state_dir / "studies" / f"{plan.sha256()}.optimizer.pt"


def train_admitted(adm: Admission, weights: list[np.ndarray]) -> TrainOutcome:
    """Train the admitted round from ``weights``; the privacy spend is already recorded."""
    # Heavy imports stay here: a deployed ClientApp starts a fresh process per message.
    import torch

    from twinfed.models.surrogate import build_surrogate, get_weights, inputs_for, set_weights

    torch.set_num_threads(1)
    plan = adm.plan
    model = build_surrogate(plan.spec, plan.model, seed=plan.seed)
    set_weights(model, weights)
    config = plan.training.for_round(adm.round, plan.rounds)
    inputs = inputs_for(plan.spec, plan.model)
    if adm.study is not None:
        from twinfed.privacy.dp import DPSettings, patient_examples, train_private

        s = adm.study
        result = train_private(model, patient_examples(adm.site, plan.training, inputs, adm.windows), config,
                               DPSettings(s.noise_multiplier, plan.privacy.clipping_norm,
                                          s.sample_rate, s.expected_batch),
                               steps=plan.training.local_steps,
                               optimizer_state=optimizer_state(adm.node, plan))
    else:
        from twinfed.models.train import train_local

        seed = round_seed(plan, adm.node.site_name, adm.round)
        torch.manual_seed(seed)
        result = train_local(model, adm.site, config, seed=seed,
                             optimizer_state=optimizer_state(adm.node, plan), inputs=inputs,
                             index=adm.windows)
    clip = plan.privacy.update_clip
    update = [new - old for new, old in zip(get_weights(model), weights)]
    entries = sum(u.size for u in update)
    clipped = sum(int((np.abs(u) > clip).sum()) for u in update)
    update = [np.clip(u, -clip, clip).astype(np.float32) for u in update]
    return TrainOutcome(update, result.steps, clipped / max(1, entries))
