"""Personalisation at the hospital: each patient's core parameters, identified from their record.

A maximum-a-posteriori fit in the spirit of ReplayBG (Cappon et al. 2023): the hybrid twin's
encoder gives the prior (the population's guess for this patient, window by window), and the
patient's own windows give the likelihood (the forecast error over the horizon). What is fitted
is one **offset per patient** on the core's unconstrained parameters ``z``, added to the
encoder's output for each of the patient's windows: the encoder keeps adapting to the moment
(e.g. today's level), the offset carries what is stable about this patient (their insulin
sensitivity, their carbohydrate ratio), and every parameter stays in its physiological range by
construction. The prior is a Gaussian on the offset around zero; the encoder and the correction
stay as trained.

This is care for that patient at the hospital that holds the record: nothing of it is released,
so it needs no differential privacy. It uses only windows that *end* before ``until`` (the
decision time of a what-if, or the end of the identification period when evaluating), never the
future it is judged on. Patients are fitted together, vectorised (independent objectives).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from twinfed.models.site_data import SiteData
from twinfed.models.windows import WindowIndex, gather

WINDOWS = 48  # windows per patient the fit looks at, spread over the identification span
STEPS = 50
LEARNING_RATE = 0.12
# The prior's weight against the mean squared forecast error (both in scaled units): a patient
# with little record stays near the encoder's guess.
PRIOR_WEIGHT = 0.02


@dataclass
class Identified:
    """Per patient: the fitted ``offset`` (``[P, n_params]``, added to the encoder's ``z``) and
    how many windows each fit used (0: no full window before ``until``; the offset is then 0).

    The windows themselves: ``starts`` (row indices into the site, grouped by patient) and
    ``owner`` (each window's row of ``offset``, i.e. its position in ``patients``, the site
    indices fitted), so what is computed on the fit's own windows (a patient's error scale for
    prediction intervals, ``twinfed.models.calibration``) needs no second selection."""

    offset: torch.Tensor
    n_windows: np.ndarray
    starts: np.ndarray
    owner: np.ndarray
    patients: np.ndarray


def identification_windows(site: SiteData, patients: np.ndarray, until_steps: np.ndarray, *,
                           windows: int = WINDOWS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The windows an identification reads: for each of ``patients``, up to ``windows`` of its
    windows whose horizon ends at or before its ``until_steps``, drawn without replacement.
    Returns the window starts (grouped by patient, in the order of ``patients``) and the count
    per patient."""
    index = WindowIndex.build(site)
    rng = np.random.default_rng(seed)
    h, k = site.spec.history_steps, site.spec.horizon_steps
    starts, counts = [], []
    for p, until in zip(patients, until_steps):
        own = index.starts[index.ptr[p]: index.ptr[p + 1]]
        own = own[site.steps[own + h + k - 1] <= until]
        if own.size > windows:
            own = np.sort(rng.choice(own, windows, replace=False))
        counts.append(own.size)
        starts.append(own)
    flat = np.concatenate(starts).astype(np.int64) if starts else np.zeros(0, np.int64)
    return flat, np.array(counts, dtype=np.int64)


def identify(model, site: SiteData, patients: np.ndarray, until_steps: np.ndarray, *,
             windows: int = WINDOWS, steps: int = STEPS, prior_weight: float = PRIOR_WEIGHT,
             seed: int = 0) -> Identified:
    """Fit each of ``patients`` (indices into ``site``) on its windows whose horizon ends at or
    before its ``until_steps`` (the site's time grid)."""
    patients = np.asarray(patients, dtype=np.int64)
    starts, counts = identification_windows(site, patients, until_steps, windows=windows, seed=seed)
    owner_np = np.repeat(np.arange(len(patients)), counts)
    offset = torch.zeros(len(patients), len(model.binding.params), requires_grad=True)
    if counts.sum() == 0:
        return Identified(offset.detach(), counts, starts, owner_np, patients)
    owner = torch.from_numpy(owner_np)
    model.eval()
    with torch.no_grad():  # what does not depend on the offset, once
        batch = gather(site, starts, patients[owner_np], with_context=True)
        u = model.unpack(torch.from_numpy(model.inputs.batch_features(batch)))
        y = torch.from_numpy(model.inputs.targets(batch))
        z_windows = model.parameters_of(u)
        correction = model.corrections(u)
    weight = torch.from_numpy(1.0 / np.maximum(counts, 1)).float()[owner]  # each patient counts once
    # Adam, written out: torch.optim's constructor imports the compiler stack (~1.5 s), which a
    # what-if from the shell cannot afford. Each patient's objective is independent of the others'.
    m, v = torch.zeros_like(offset), torch.zeros_like(offset)
    b1, b2 = 0.9, 0.999
    for t in range(1, steps + 1):
        err = ((model.outputs(u, z_windows + offset[owner], correction) - y) ** 2).mean(-1)
        prior = prior_weight * (offset ** 2).mean(-1).sum()
        (grad,) = torch.autograd.grad((err * weight).sum() + prior, offset)
        with torch.no_grad():
            m.mul_(b1).add_(grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            offset -= LEARNING_RATE * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + 1e-8)
    return Identified(offset.detach(), counts, starts, owner_np, patients)
