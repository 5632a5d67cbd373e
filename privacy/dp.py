"""Patient-level DP-SGD with Opacus for one round on one node.

One example is one patient: Opacus's Poisson sampler draws patients (each independently with
probability ``sample_rate``), the dataset hands back ``windows_per_patient`` random windows per
drawn patient (their mean loss is the patient's loss), each patient's gradient is clipped to
``clipping_norm`` and Gaussian noise of ``noise_multiplier x clipping_norm`` is added to the sum.
A patient with more data therefore costs no more privacy.

Randomness: Opacus's ``secure_mode`` needs torchcsprng, which does not support torch 2.13. Every
round instead seeds the noise generator, the patient sampler and the window draws from the
operating system's CSPRNG (``secrets``), so nothing about them is predictable or reproducible.
The residual risk is the one Opacus documents for non-secure mode: torch's Mersenne-Twister
generator is not cryptographically strong, so an attacker who could observe enough of its output
might in principle predict later noise.
"""

from __future__ import annotations

import secrets
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from twinfed.models.plan import TrainingConfig
from twinfed.models.site_data import SiteData
from twinfed.models.train import PatientWindows, TrainResult, make_adam, run_steps, save_adam


@dataclass(frozen=True)
class DPSettings:
    noise_multiplier: float
    clipping_norm: float
    sample_rate: float  # Poisson rate over patients, from the released (noisy) count
    expected_batch: int  # what the noised sum of clipped gradients is divided by (q x released count)


def csprng_seed() -> int:
    return secrets.randbits(63)


def patient_examples(site: SiteData, config: TrainingConfig, inputs=None) -> PatientWindows:
    """The node's DP examples, one per patient with at least one window, CSPRNG-seeded;
    ``inputs``: how the model reads a window (``surrogate.inputs_for``)."""
    return PatientWindows(site, seed=csprng_seed(), windows_per_patient=config.windows_per_patient,
                          inputs=inputs)


def make_private(model: nn.Module, optimizer: torch.optim.Optimizer, dp: DPSettings):
    """Opacus's per-sample gradients (``hooks``) and DP optimizer around ``model`` and
    ``optimizer``: clipping to ``dp.clipping_norm``, Gaussian noise of ``noise_multiplier x
    clipping_norm`` from a CSPRNG-seeded generator, the noised sum divided by
    ``dp.expected_batch``. Returns ``(module, optimizer)``; call ``module.cleanup()`` after."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    with warnings.catch_warnings():  # the README says why secure_mode is off and what remains
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
        private = GradSampleModule(model)
        private.forbid_grad_accumulation()
        dp_optimizer = DPOptimizer(optimizer, noise_multiplier=dp.noise_multiplier,
                                   max_grad_norm=dp.clipping_norm, expected_batch_size=dp.expected_batch,
                                   generator=torch.Generator().manual_seed(csprng_seed()))
    return private, dp_optimizer


def train_private(model: nn.Module, data: PatientWindows, config: TrainingConfig, dp: DPSettings,
                  *, steps: int, optimizer_state: Path | None = None) -> TrainResult:
    """``steps`` DP-SGD (DP-Adam) steps over patients; returns the trained module's loss record.

    The caller's ``model`` is trained in place (Opacus wraps it; the wrapper shares parameters).
    Opacus's ``make_private`` would derive the sample rate and the averaging batch from the
    exact number of patients (``len(dataset)``); here both come from ``dp``, i.e. from the
    site's DP-released count, so nothing about the exact size reaches the update.
    ``optimizer_state``: Adam's moments kept at the node between rounds; they are computed from
    noised gradients only, so keeping them costs no privacy (post-processing) and they never
    leave the node.
    """
    from opacus.data_loader import DPDataLoader

    from twinfed.models.train import BatchOfPatients

    loader = DPDataLoader(BatchOfPatients(data), sample_rate=dp.sample_rate,
                          generator=torch.Generator().manual_seed(csprng_seed()))
    adam = make_adam(model, config, optimizer_state)
    private, optimizer = make_private(model, adam, dp)
    try:
        with warnings.catch_warnings():
            # The inputs never require gradients (features are data); Opacus's hooks say so.
            warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
            result = run_steps(private, optimizer, loader, steps)
    finally:
        private.cleanup()  # the caller keeps a plain module: no hooks left behind
    save_adam(adam, optimizer_state)
    return result
