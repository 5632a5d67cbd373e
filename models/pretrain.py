"""Optional public pretraining: a twin's starting weights learnt from an in-silico cohort.

A cohort of virtual patients is public (no patient data), so a consortium may start its
federated study from a model pretrained on one instead of from scratch. The starting weights are
named in the training plan by their digest (``model.pretrained_sha256``, the
:func:`twinfed.models.digest.weights_sha256` of the arrays), so officers approve exactly which
weights a study starts from, and every output says the twin was pretrained. The coordinator
loads them from a model directory (``twinfed pretrain`` writes one) and refuses any whose digest
differs from the plan's.

Never pretrain on the virtual world a twin is then scored in as if it were new physiology: the
benchmark pretrains on the built-in simulator and scores the mismatch simulator's cohorts.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from twinfed.errors import ModelError
from twinfed.models.plan import ModelConfig, PrivacyConfig, TrainingConfig, TrainingPlan
from twinfed.models.spec import TwinSpec


def pretrain(spec: TwinSpec, cohort_dir: Path, config: ModelConfig, *, steps: int, learning_rate: float,
             seed: int = 0, progress=lambda _m: None):
    """Train ``config`` non-privately on every site of a virtual cohort pooled (never its
    ``holdout``); returns the model and the plan it is saved under (a one-round non-private
    "study" whose plan says so)."""
    import torch

    from twinfed.models.cohort import HOLDOUT
    from twinfed.models.site_data import SiteData, load_site
    from twinfed.models.surrogate import build_surrogate, inputs_for
    from twinfed.models.train import train_local

    names = sorted(p.name for p in Path(cohort_dir).iterdir()
                   if p.is_dir() and p.name != HOLDOUT and (p / "patients.csv").exists())
    if not names:
        raise ModelError(f"{cohort_dir}: no site directories to pretrain on; generate a virtual "
                         "cohort with 'twinfed cohort generate'")
    sites = [load_site(Path(cohort_dir) / n, spec) for n in names]
    training = TrainingConfig(local_steps=steps, learning_rate=learning_rate, lr_schedule="constant")
    plan = TrainingPlan(spec=spec, rounds=1, seed=seed, model=config, training=training,
                        privacy=PrivacyConfig(enabled=False, secure_aggregation=False))
    model = build_surrogate(spec, plan.model, seed=seed)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    train_local(model, SiteData.pooled(sites), plan.training, seed=seed,
                inputs=inputs_for(spec, plan.model))
    progress(f"pretrained {plan.model.kind} on {len(names)} virtual site(s), {steps} steps, "
             f"{time.perf_counter() - t0:.0f} s")
    return model, plan


def starting_weights(plan: TrainingPlan, pretrained: Path | None) -> list[np.ndarray]:
    """The study's initial global weights: fresh (seeded) for a plan without pretraining; for a
    plan naming pretrained weights, those of ``pretrained`` (a model or run directory), checked."""
    from twinfed.models.digest import weights_sha256
    from twinfed.models.surrogate import build_surrogate, get_weights

    if plan.model.pretrained_sha256 is None:
        if pretrained is not None:
            raise ModelError("pretrained weights were given but the plan names none; build the plan "
                             "with them (--pretrained) so the officers approve what the study starts from")
        return get_weights(build_surrogate(plan.spec, plan.model, seed=plan.seed))
    if pretrained is None:
        raise ModelError(f"the plan starts from pretrained weights {plan.model.pretrained_sha256[:16]}...; "
                         "give their model directory (--pretrained DIR, or the run config's 'pretrained')")
    weights = load_weights(pretrained, plan)
    if weights_sha256(weights) != plan.model.pretrained_sha256:
        raise ModelError(f"{pretrained}: these weights are not the ones the plan names "
                         f"({plan.model.pretrained_sha256[:16]}...); use the model directory it was built from")
    return weights


def load_weights(model_dir: Path, plan: TrainingPlan) -> list[np.ndarray]:
    """Weights of a model directory, checked to fit ``plan``'s architecture."""
    from twinfed.models.twin import Twin

    twin = Twin.load(model_dir)
    if twin.spec.model_dump() != plan.spec.model_dump() or \
            twin.plan.model.model_copy(update={"pretrained_sha256": None}) != \
            plan.model.model_copy(update={"pretrained_sha256": None}):
        raise ModelError(f"{model_dir}: pretrained for another spec or architecture than the plan's")
    from twinfed.models.surrogate import get_weights

    return get_weights(twin.surrogate)


def pretrained_config(config: ModelConfig, model_dir: Path) -> ModelConfig:
    """``config`` naming the weights of ``model_dir`` as its start (their digest)."""
    from twinfed.models.digest import weights_sha256
    from twinfed.models.surrogate import get_weights
    from twinfed.models.twin import Twin

    twin = Twin.load(model_dir)
    return config.model_copy(update={"kind": twin.plan.model.kind, "hidden": twin.plan.model.hidden,
                                     "layers": twin.plan.model.layers,
                                     "pretrained_sha256": weights_sha256(get_weights(twin.surrogate))})
