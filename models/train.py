"""Local training on one node's patients.

The dataset's unit is the patient: item ``i`` is one window drawn at random from patient ``i``.
A batch is a set of patients, so patient-level DP-SGD (Poisson sampling over patients) plugs in
without changing the data path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from twinfed.models.features import Scaler
from twinfed.models.plan import TrainingConfig
from twinfed.models.site_data import SiteData
from twinfed.models.windows import WindowIndex, gather


class PatientWindows(Dataset):
    """Item ``i``: features and targets of one random window of the ``i``-th eligible patient."""

    def __init__(self, site: SiteData, *, seed: int):
        self.site = site
        self.index = WindowIndex.build(site)
        self.patients = self.index.patients_with_windows()
        self.scaler = Scaler(site.spec)
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return int(self.patients.size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.draw(np.array([i]))
        return x[0], y[0]

    def draw(self, items: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        patients = self.patients[items]
        batch = gather(self.site, self.index.one_per_patient(patients, self.rng), patients)
        return (torch.from_numpy(self.scaler.batch_features(batch)),
                torch.from_numpy(self.scaler.targets(batch)))


class _BatchOfPatients(Dataset):
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
    return DataLoader(_BatchOfPatients(data), batch_size=min(batch_size, len(data)), shuffle=True,
                      drop_last=False, generator=gen)


def run_steps(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
              steps: int) -> TrainResult:
    """``steps`` optimiser steps over ``loader`` (cycled), mean MSE loss over them."""
    loss_fn = nn.MSELoss()
    model.train()
    losses: list[float] = []
    while len(losses) < steps:
        for x, y in loader:
            if len(x) == 0:  # Poisson sampling can draw an empty batch
                continue
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if len(losses) >= steps:
                break
    return TrainResult(steps=len(losses), mean_loss=float(np.mean(losses)) if losses else float("nan"))


def train_local(model: nn.Module, site: SiteData, config: TrainingConfig, *, seed: int) -> TrainResult:
    """Non-private local training: ``config.local_steps`` Adam steps over patient batches."""
    data = PatientWindows(site, seed=seed)
    if len(data) == 0:
        return TrainResult(steps=0, mean_loss=float("nan"))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    return run_steps(model, optimizer, make_loader(data, config.batch_size, seed=seed),
                     config.local_steps)
