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

import functools
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


def patient_examples(site: SiteData, config: TrainingConfig, inputs=None, index=None) -> PatientWindows:
    """The node's DP examples, one per patient with at least one window, CSPRNG-seeded;
    ``inputs``: how the model reads a window (``surrogate.inputs_for``); ``index``: the site's
    ``WindowIndex`` if the caller already built it."""
    return PatientWindows(site, seed=csprng_seed(), windows_per_patient=config.windows_per_patient,
                          inputs=inputs, index=index, rolled_hours=config.rolled_hours,
                          rolled_weight=config.rolled_weight)


PER_SAMPLE_METHODS = ("auto", "linear", "hooks")


def per_sample_method(model: nn.Module) -> str:
    """How the node computes per-patient gradients for ``model``, decided once per model:
    ``linear`` (:mod:`twinfed.privacy.per_patient`, every twinfed model) when every trained
    weight is in a Linear layer, else Opacus's ``hooks``."""
    from twinfed.privacy.per_patient import unsupported

    return "linear" if unsupported(model) is None else "hooks"


def make_private(model: nn.Module, optimizer: torch.optim.Optimizer, dp: DPSettings, *,
                 method: str = "auto"):
    """Per-patient clipping to ``dp.clipping_norm`` and Opacus's DP optimizer around ``model``
    and ``optimizer``: Gaussian noise of ``noise_multiplier x clipping_norm`` from a
    CSPRNG-seeded generator, the noised sum divided by ``dp.expected_batch``. Returns
    ``(module, optimizer)``; call ``module.cleanup()`` after.

    ``method``: ``linear`` (the project's per-patient Linear gradients, clipped sum handed to
    Opacus's ``DPOptimizerFastGradientClipping`` for noise and scaling), ``hooks`` (Opacus's
    ``GradSampleModule`` and ``DPOptimizer``, which clips), or ``auto``
    (:func:`per_sample_method`). Both compute the same update (tests/test_dp_fast_path.py).
    Either optimizer has ``noise_only_step()``: the step of an empty Poisson draw."""
    if method not in PER_SAMPLE_METHODS:
        raise ValueError(f"unknown per-sample gradient method {method!r}; use one of {PER_SAMPLE_METHODS}")
    if method == "auto":
        method = per_sample_method(model)
    kw = dict(noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.clipping_norm,
              expected_batch_size=dp.expected_batch)
    with warnings.catch_warnings():  # the README says why secure_mode is off and what remains
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
        generator = torch.Generator().manual_seed(csprng_seed())
        if method == "linear":
            from twinfed.privacy.per_patient import PerPatientLinear

            private = PerPatientLinear(model)
            return private, _linear_optimizer()(private, optimizer, generator=generator, **kw)
        from opacus import GradSampleModule

        private = GradSampleModule(model)
        private.forbid_grad_accumulation()
        return private, _hooks_optimizer()(optimizer, generator=generator, **kw)


@functools.cache
def _hooks_optimizer():
    """Opacus's ``DPOptimizer`` with the project's explicit noise-only step."""
    from opacus.optimizers import DPOptimizer

    class HooksDPOptimizer(DPOptimizer):
        def noise_only_step(self) -> None:
            """An empty draw: no patient's gradient (zero clipped sum), the same Gaussian noise,
            divided by the same expected batch, and the optimiser's step."""
            for p in self.params:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
            self.step()

    return HooksDPOptimizer


@functools.cache
def _linear_optimizer():
    """Opacus's ``DPOptimizerFastGradientClipping`` (noise on the clipped sum, division by the
    expected batch, the wrapped optimiser's step), fed by :class:`PerPatientLinear`."""
    from opacus.optimizers.optimizer_fast_gradient_clipping import DPOptimizerFastGradientClipping

    class LinearDPOptimizer(DPOptimizerFastGradientClipping):
        def __init__(self, private, optimizer, **kw):
            super().__init__(optimizer, **kw)
            self.private = private

        def zero_grad(self, set_to_none: bool = False):
            self.private.clear()
            super().zero_grad(set_to_none)

        def pre_step(self, closure=None):
            self.private.clip_and_sum(self.max_grad_norm)
            return super().pre_step(closure)

        def noise_only_step(self) -> None:
            """An empty draw: no patient's gradient (zero clipped sum), the same Gaussian noise,
            divided by the same expected batch, and the optimiser's step."""
            self.private.clear()
            self.step()

    return LinearDPOptimizer


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
