"""Local training on one node's patients.

The dataset's unit is the patient: item ``i`` is ``windows_per_patient`` windows drawn at random
from patient ``i`` (features ``[k, F]``), and a patient's loss is the mean over its windows. A
batch is a set of patients, so patient-level DP-SGD (Poisson sampling over patients) plugs in
without changing the data path: Opacus's per-sample gradient is then one patient's gradient,
averaged over its windows, which is far less noisy than one window's and so survives clipping
and DP noise better, at no extra privacy cost.
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
from twinfed.models.plan import TrainingConfig
from twinfed.models.site_data import SiteData
from twinfed.models.windows import WindowIndex, gather


class PatientWindows(Dataset):
    """Item ``i``: features ``[k, F]`` and targets ``[k, O]`` of ``k`` random windows of the
    ``i``-th eligible patient, as the model's ``inputs`` (``surrogate.inputs_for``) build them."""

    def __init__(self, site: SiteData, *, seed: int, windows_per_patient: int = 1, inputs=None,
                 index: WindowIndex | None = None):
        self.site = site
        self.k = windows_per_patient
        self.index = index if index is not None else WindowIndex.build(site)
        self.patients = self.index.patients_with_windows()
        self.inputs = inputs or Scaler(site.spec)
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return int(self.patients.size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.draw(np.array([i]))
        return x[0], y[0]

    def draw(self, items: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        patients = self.patients[items]
        starts = self.index.per_patient(patients, self.rng, self.k).reshape(-1)
        batch = gather(self.site, starts, np.repeat(patients, self.k), with_context=self.inputs.with_context)
        x, y = self.inputs.batch_features(batch), self.inputs.targets(batch)
        n = len(patients)
        return (torch.from_numpy(x.reshape(n, self.k, self.inputs.n_features)),
                torch.from_numpy(y.reshape(n, self.k, self.inputs.n_outputs)))


class BatchOfPatients(Dataset):
    """Adapter that lets a DataLoader's batch sampler hand whole index lists to ``draw``."""

    def __init__(self, data: PatientWindows):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitems__(self, items: list[int]):  # torch >= 2.2 batched fetch
        x, y = self.data.draw(np.asarray(items, dtype=np.int64))
        return list(zip(x, y))

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
        for x, y in loader:
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
                loss.backward()
                optimizer.step()
                if len(x):
                    losses.append(float(loss.detach()))
            if draws >= steps:
                break
    return TrainResult(steps=draws, mean_loss=float(np.mean(losses)) if losses else float("nan"))


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
                          inputs=inputs, index=index)
    if len(data) == 0:
        return TrainResult(steps=0, mean_loss=float("nan"))
    optimizer = make_adam(model, config, optimizer_state)
    result = run_steps(model, optimizer, make_loader(data, config.batch_size, seed=seed),
                       config.local_steps)
    save_adam(optimizer, optimizer_state)
    return result
