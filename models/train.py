"""Local training on one node's patients.

The dataset's unit is the patient: item ``i`` is ``windows_per_patient`` windows drawn at random
from patient ``i`` (features ``[k, F]``), and a patient's loss is the mean over its windows. A
batch is a set of patients, so patient-level DP-SGD (Poisson sampling over patients) plugs in
without changing the data path: Opacus's per-sample gradient is then one patient's gradient,
averaged over its windows, which is far less noisy than one window's and so survives clipping
and DP noise better, at no extra privacy cost.

The rolled-forward loss (opt-in, ``TrainingConfig.rolled_hours``, hybrid twins): a patient's
example also carries ``ROLLED_WINDOWS`` long windows of the same patient (the context the encoder
reads, the recorded controls over the next ``rolled_hours`` and the recorded states every
``ROLLED_EVERY_MINUTES`` along them). The core, with the encoder's parameters, is rolled over the
whole span from the origin (``HybridSurrogate.rolled_outputs``), and the patient's mean squared
scaled error at those points is added with ``rolled_weight``: parameters fitted on the horizon alone
can match its first hour and miss the hours after. A patient whose record holds no long enough
contiguous stretch carries stand-in long windows of weight 0 (its own record, padded): its example
still counts, with the horizon's loss only. Every term is one patient's, so a per-sample gradient
is still one patient's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from twinfed.models.features import Scaler
from twinfed.models.plan import ROLLED_EVERY_MINUTES, TrainingConfig
from twinfed.models.site_data import SiteData
from twinfed.models.windows import Batch, WindowIndex, gather

ROLLED_WINDOWS = 2  # long windows per patient and example when the rolled-forward loss is on


class PatientWindows(Dataset):
    """Item ``i``: features ``[k, F]`` and targets ``[k, O]`` of ``k`` random windows of the
    ``i``-th eligible patient, as the model's ``inputs`` (``surrogate.inputs_for``) build them.

    ``rolled_hours`` > 0 (a hybrid twin's inputs only): the item also carries the patient's long
    windows, features ``[R, F_long]``, targets ``[R, P, S]`` and weights ``[R]`` (``R =
    ROLLED_WINDOWS``; the weights are ``rolled_weight / R``, 0 for stand-ins)."""

    def __init__(self, site: SiteData, *, seed: int, windows_per_patient: int = 1, inputs=None,
                 index: WindowIndex | None = None, rolled_hours: float = 0.0, rolled_weight: float = 0.5):
        self.site = site
        self.k = windows_per_patient
        self.index = index if index is not None else WindowIndex.build(site)
        self.patients = self.index.patients_with_windows()
        self.inputs = inputs or Scaler(site.spec)
        self.rng = np.random.default_rng(seed)
        self.rolled = None
        if rolled_hours:
            self.rolled = _RolledWindows(site, self.inputs, rolled_hours, rolled_weight)

    def __len__(self) -> int:
        return int(self.patients.size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        return tuple(t[0] for t in self.draw(np.array([i])))

    def draw(self, items: np.ndarray) -> tuple[torch.Tensor, ...]:
        """``(x, y)`` of the patients ``items``, and with the rolled-forward loss on also their
        long windows' ``(x_long, y_long, w_long)``."""
        patients = self.patients[items]
        starts = self.index.per_patient(patients, self.rng, self.k)
        batch = gather(self.site, starts.reshape(-1), np.repeat(patients, self.k),
                       with_context=self.inputs.with_context)
        x, y = self.inputs.batch_features(batch), self.inputs.targets(batch)
        n = len(patients)
        short = (torch.from_numpy(x.reshape(n, self.k, self.inputs.n_features)),
                 torch.from_numpy(y.reshape(n, self.k, self.inputs.n_outputs)))
        if self.rolled is None:
            return short
        return short + self.rolled.draw(patients, starts[:, 0], self.rng)


class _RolledWindows:
    """The long windows of a rolled-forward loss: ``history + span`` contiguous rows of one
    patient, drawn uniformly (with replacement) among the patient's."""

    def __init__(self, site: SiteData, inputs, hours: float, weight: float):
        spec = site.spec
        if not hasattr(inputs, "spanning"):
            raise ValueError("the rolled-forward loss (training.rolled_hours) needs a hybrid twin")
        span_minutes, every_minutes = round(hours * 60), ROLLED_EVERY_MINUTES
        if span_minutes % spec.step_minutes or every_minutes % spec.step_minutes:
            raise ValueError(f"training.rolled_hours {hours:g} is not on the spec's {spec.step_minutes}-minute "
                             f"grid scored every {every_minutes} minutes")
        self.site, self.weight = site, weight
        self.steps = span_minutes // spec.step_minutes
        self.every = every_minutes // spec.step_minutes
        self.points = self.steps // self.every
        self.inputs = inputs.spanning(self.steps)
        self.index = WindowIndex.build(site, spec.history_steps + self.steps)

    def draw(self, patients: np.ndarray, fallback: np.ndarray, rng: np.random.Generator):
        """``ROLLED_WINDOWS`` long windows per patient; ``fallback``: a short window start of each
        patient, the stand-in (weight 0) of a patient without a long window."""
        r, n = ROLLED_WINDOWS, len(patients)
        has = self.index.counts()[patients] > 0
        starts = np.repeat(fallback[:, None], r, axis=1)
        if has.any():
            starts[has] = self.index.per_patient(patients[has], rng, r)
        long_rows = np.repeat(has, r)
        flat, owners = starts.reshape(-1), np.repeat(patients, r)
        if long_rows.all():
            batch = gather(self.site, flat, owners, with_context=True, horizon=self.steps)
        else:  # stand-ins: the patient's short window, its future run out with no controls
            full = gather(self.site, flat[long_rows], owners[long_rows], with_context=True, horizon=self.steps)
            stand = _padded(gather(self.site, flat[~long_rows], owners[~long_rows], with_context=True),
                            self.steps)
            order = np.argsort(np.concatenate([np.flatnonzero(long_rows), np.flatnonzero(~long_rows)]),
                               kind="stable")
            batch = _concat([full, stand]).part(order)
        # Explicit widths: an empty draw (Poisson sampling can draw none) must work too.
        x = self.inputs.batch_features(batch).reshape(n, r, self.inputs.n_features)
        y = self.inputs.rolled_targets(batch, self.every).reshape(n, r, self.points, self.inputs.s)
        w = np.where(has, self.weight / r, 0.0).astype(np.float32)
        return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(np.repeat(w[:, None], r, axis=1))


def _padded(batch: Batch, steps: int) -> Batch:
    """``batch`` with its future run out to ``steps`` steps: no controls, the states held."""
    extra = steps - batch.future_controls.shape[1]
    controls = np.concatenate([batch.future_controls,
                               np.zeros((len(batch), extra, batch.future_controls.shape[2]),
                                        batch.future_controls.dtype)], axis=1)
    states = np.concatenate([batch.future_states,
                             np.repeat(batch.future_states[:, -1:, :], extra, axis=1)], axis=1)
    return Batch(batch.history, controls, states, batch.covariates, batch.context, batch.context_mask,
                 batch.patients)


def _concat(batches: list[Batch]) -> Batch:
    return Batch(*(np.concatenate([getattr(b, f) for b in batches]) for f in
                   ("history", "future_controls", "future_states", "covariates", "context", "context_mask",
                    "patients")))


class BatchOfPatients(Dataset):
    """Adapter that lets a DataLoader's batch sampler hand whole index lists to ``draw``."""

    def __init__(self, data: PatientWindows):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitems__(self, items: list[int]):  # torch >= 2.2 batched fetch
        return list(zip(*self.data.draw(np.asarray(items, dtype=np.int64))))

    def __getitem__(self, i: int):
        return self.data[i]


@dataclass
class TrainResult:
    steps: int
    mean_loss: float


def make_loader(data: PatientWindows, batch_size: int, *, seed: int) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(BatchOfPatients(data), batch_size=min(batch_size, len(data)), shuffle=True,
                      drop_last=False, generator=gen)


def run_steps(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
              steps: int) -> TrainResult:
    """``steps`` batch draws from ``loader`` (cycled), mean MSE loss over the non-empty ones.

    A draw is ``(x, y)``, or with the rolled-forward loss ``(x, y, x_long, y_long, w_long)``
    (:class:`PatientWindows`): then each patient's loss adds, weighted by ``w_long``, the mean
    squared error of the core rolled over each long window (:func:`rolled_loss`).

    Every draw counts as a step, also an empty one (Poisson sampling can draw no patient): that is
    what a privacy accountant counts. Under DP (an Opacus optimiser) an empty draw still takes
    its noise-only step, as the DP-SGD mechanism the accountant analyses does: the optimiser's
    ``noise_only_step`` (twinfed.privacy.dp) where it has one, else a pass over the empty batch;
    without DP there is nothing to learn from it.
    """
    private = hasattr(optimizer, "noise_multiplier")
    model.train()
    losses: list[float] = []
    draws = 0
    while draws < steps:
        for x, y, *rolled in loader:
            draws += 1
            if not len(x) and hasattr(optimizer, "noise_only_step"):
                optimizer.zero_grad(set_to_none=True)
                optimizer.noise_only_step()
            elif len(x) or private:
                optimizer.zero_grad(set_to_none=True)
                # The mean over every element, written out so an empty batch gives 0, not NaN.
                out = model(x)
                if out.dim() > y.dim():  # an ensemble's structures, each fitted: [..., M, O]
                    y = y.unsqueeze(-2)
                loss = ((out - y) ** 2).sum() / max(1, out.numel())
                if rolled and len(x):
                    loss = loss + rolled_loss(model, *rolled)
                loss.backward()
                optimizer.step()
                if len(x):
                    losses.append(float(loss.detach()))
            if draws >= steps:
                break
    return TrainResult(steps=draws, mean_loss=float(np.mean(losses)) if losses else float("nan"))


def rolled_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The rolled-forward term of a batch's loss: ``sum_b sum_r w[b, r] * e[b, r] / B``, where
    ``e[b, r]`` is the mean squared scaled error of the core's path rolled over patient ``b``'s long
    window ``r`` against its record (over the points, the states the core binds and an ensemble's
    structures, each fitted on its own). Divided by the batch's size as the horizon's term is, so
    a per-sample gradient (Opacus's ``mean`` reduction, ``PerPatientLinear``) is one patient's.
    ``model``: the twin, or a per-sample wrapper around it (``_module``)."""
    twin = getattr(model, "_module", model)
    out = twin.rolled_outputs(x, y.shape[-2])  # [B, R, M, P, S]
    bound = torch.isfinite(out)
    err = torch.where(bound, out - y.unsqueeze(-3), torch.zeros_like(out)) ** 2
    per_window = err.sum((-3, -2, -1)) / bound.sum((-3, -2, -1)).clamp(min=1)
    return (w * per_window).sum() / max(1, len(x))


def make_adam(model: nn.Module, config: TrainingConfig, state: Path | None = None) -> torch.optim.Adam:
    """Adam at the config's learning rate, resuming the moments saved at ``state`` if any.

    A node keeps its optimiser's moments between rounds (on disk: a deployed node starts a fresh
    process per message), so each round does not restart Adam from sign-like first steps.
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    if state is not None and state.is_file():
        optimizer.load_state_dict(torch.load(state, weights_only=True))
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate
    return optimizer


def save_adam(optimizer: torch.optim.Optimizer, state: Path | None) -> None:
    if state is None:
        return
    state.parent.mkdir(parents=True, exist_ok=True)
    tmp = state.with_name(f".{state.name}.tmp")
    torch.save(optimizer.state_dict(), tmp)
    os.replace(tmp, state)


def train_local(model: nn.Module, site: SiteData, config: TrainingConfig, *, seed: int,
                optimizer_state: Path | None = None, inputs=None, index: WindowIndex | None = None) -> TrainResult:
    """Non-private local training: ``config.local_steps`` Adam steps over patient batches;
    ``index``: the site's window index if the caller already built it."""
    data = PatientWindows(site, seed=seed, windows_per_patient=config.windows_per_patient,
                          inputs=inputs, index=index, rolled_hours=config.rolled_hours,
                          rolled_weight=config.rolled_weight)
    if len(data) == 0:
        return TrainResult(steps=0, mean_loss=float("nan"))
    optimizer = make_adam(model, config, optimizer_state)
    result = run_steps(model, optimizer, make_loader(data, config.batch_size, seed=seed),
                       config.local_steps)
    save_adam(optimizer, optimizer_state)
    return result
