"""Forecast accuracy over every window of every patient: per-step RMSE and MAE."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from twinfed.models.baselines import persistence
from twinfed.models.site_data import SiteData
from twinfed.models.windows import Batch, WindowIndex, gather

Forecaster = Callable[[Batch], np.ndarray]  # batch -> [B, K, S]
# Sees each scored batch and every forecaster's forecast of it (e.g. to count interval coverage).
Observer = Callable[[Batch, dict[str, np.ndarray]], None]


@dataclass
class _Acc:
    sq: np.ndarray
    ab: np.ndarray

    def add(self, err: np.ndarray) -> None:
        self.sq += np.square(err, dtype=np.float64).sum(axis=0)
        self.ab += np.abs(err, dtype=np.float64).sum(axis=0)


def evaluate_site(site: SiteData, forecasters: dict[str, Forecaster], *,
                  stride: int = 1, chunk: int = 50_000, with_context: bool = False,
                  origin_from: np.ndarray | None = None, observe: Observer | None = None) -> dict:
    """RMSE and MAE by horizon step for each forecaster, plus persistence, over every window
    (every ``stride``-th), or only those whose forecast origin is at or after ``origin_from``
    (per patient, on the site's time grid). ``observe``, if given, is called with every scored
    batch and the forecasters' forecasts of it; it changes nothing returned here.

    Returns ``{"n_patients", "n_windows", "states": {col: {"<name>_rmse_by_step": [...], ...}}}``.
    """
    spec = site.spec
    index = WindowIndex.build(site)
    patients_all = index.window_patients()
    eligible = np.arange(index.n_windows)
    if origin_from is not None:
        origin = site.steps[index.starts + spec.history_steps - 1]
        eligible = eligible[origin >= origin_from[patients_all]]
    take = eligible[::stride]
    k, s = spec.horizon_steps, len(spec.states)
    accs = {name: _Acc(np.zeros((k, s)), np.zeros((k, s))) for name in [*forecasters, "persistence"]}
    chunk = min(chunk, 8192) if with_context else chunk  # a context window is ~10x larger
    for lo in range(0, take.size, chunk):
        sel = take[lo: lo + chunk]
        batch = gather(site, index.starts[sel], patients_all[sel], with_context=with_context)
        truth = batch.future_states
        accs["persistence"].add(persistence(batch.history[:, -1, :s], k) - truth)
        preds = {name: fn(batch) for name, fn in forecasters.items()}
        for name, pred in preds.items():
            accs[name].add(pred - truth)
        if observe is not None:
            observe(batch, preds)
    n = max(int(take.size), 1)
    states = {}
    for j, col in enumerate(spec.state_columns):
        out = {}
        for name, acc in accs.items():
            prefix = "" if name == "model" else f"{name}_"
            out[f"{prefix}rmse_by_step"] = [float(v) for v in np.sqrt(acc.sq[:, j] / n)]
            out[f"{prefix}mae_by_step"] = [float(v) for v in acc.ab[:, j] / n]
        states[col] = out
    n_patients = int(np.unique(patients_all[take]).size) if take.size else 0
    return {"n_patients": n_patients, "n_windows": int(take.size),
            "horizon_minutes": spec.horizon_minutes, "states": states}
