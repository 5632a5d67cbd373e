"""Patient-level DP-SGD with Opacus for one round on one node.

One example is one patient: Opacus's Poisson sampler draws patients (each independently with
probability ``sample_rate``), the dataset hands back one random window per drawn patient, each
patient's gradient is clipped to ``clipping_norm`` and Gaussian noise of ``noise_multiplier x
clipping_norm`` is added to the sum. A patient with more data therefore costs no more privacy.

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
from twinfed.models.train import (PatientWindows, TrainResult, make_adam, make_loader, run_steps,
                                  save_adam)


@dataclass(frozen=True)
class DPSettings:
    noise_multiplier: float
    clipping_norm: float
    sample_rate: float


def csprng_seed() -> int:
    return secrets.randbits(63)


def patient_examples(site: SiteData, config: TrainingConfig) -> PatientWindows:
    """The node's DP examples, one per patient with at least one window, CSPRNG-seeded."""
    return PatientWindows(site, seed=csprng_seed(), windows_per_patient=config.windows_per_patient)


def train_private(model: nn.Module, data: PatientWindows, config: TrainingConfig, dp: DPSettings,
                  *, steps: int, optimizer_state: Path | None = None) -> TrainResult:
    """``steps`` DP-SGD (DP-Adam) steps over patients; returns the trained module's loss record.

    The caller's ``model`` is trained in place (Opacus wraps it; the wrapper shares parameters).
    ``dp.sample_rate`` must be the rate the ledger records: ``sample_rate(len(data), batch)``.
    ``optimizer_state``: Adam's moments kept at the node between rounds; they are computed from
    noised gradients only, so keeping them costs no privacy (post-processing) and they never
    leave the node.
    """
    from opacus import PrivacyEngine

    torch.manual_seed(csprng_seed())  # the Poisson sampler draws from torch's default generator
    loader = make_loader(data, config.batch_size, seed=csprng_seed())
    adam = make_adam(model, config, optimizer_state)
    with warnings.catch_warnings():  # the README says why secure_mode is off and what remains
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
        warnings.filterwarnings("ignore", message=".*Optimal RDP order.*")
        engine = PrivacyEngine(accountant="rdp", secure_mode=False)
        private, optimizer, loader = engine.make_private(
            module=model, optimizer=adam, data_loader=loader,
            noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.clipping_norm,
            poisson_sampling=True, noise_generator=torch.Generator().manual_seed(csprng_seed()),
        )
    if abs(loader.sample_rate - dp.sample_rate) > 1e-12:  # the ledger must record the true rate
        raise AssertionError(f"Opacus samples at {loader.sample_rate}, the ledger has {dp.sample_rate}")
    result = run_steps(private, optimizer, loader, steps)
    save_adam(adam, optimizer_state)
    return result
