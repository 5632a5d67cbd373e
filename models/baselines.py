"""Honest baselines for the surrogate.

- Persistence: the last observed value, held over the horizon.
- Linear ARX: a ridge-regularised least-squares map from the surrogate's own input features
  (history, future controls, covariates) to the horizon; the best linear model on the same data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from twinfed.models.features import Scaler
from twinfed.models.site_data import SiteData
from twinfed.models.windows import WindowIndex, gather


def persistence(last_states: np.ndarray, horizon_steps: int) -> np.ndarray:
    """[B, S] -> [B, K, S]: every future step equals the last observation."""
    return np.repeat(last_states[:, None, :], horizon_steps, axis=1)


@dataclass
class LinearARX:
    weights: np.ndarray  # [F + 1, K*S]
    scaler: Scaler

    @classmethod
    def fit(cls, sites: list[SiteData], *, ridge: float = 1e-3, windows_per_patient: int = 200,
            seed: int = 0) -> LinearARX:
        scaler = Scaler(sites[0].spec)
        rng = np.random.default_rng(seed)
        f = scaler.n_features + 1
        xtx = np.zeros((f, f))
        xty = np.zeros((f, scaler.n_outputs))
        for site in sites:
            index = WindowIndex.build(site)
            patients = index.window_patients()
            take = _subsample(index, windows_per_patient, rng)
            for chunk in np.array_split(take, max(1, len(take) // 20000)):
                batch = gather(site, index.starts[chunk], patients[chunk])
                x = _with_bias(scaler.batch_features(batch)).astype(np.float64)
                y = scaler.targets(batch).astype(np.float64)
                xtx += x.T @ x
                xty += x.T @ y
        xtx[np.diag_indices(f)] += ridge * max(1.0, float(np.trace(xtx)) / f)
        return cls(np.linalg.solve(xtx, xty), scaler)

    def predict_outputs(self, features: np.ndarray) -> np.ndarray:
        return (_with_bias(features) @ self.weights).astype(np.float32)


def _with_bias(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x, np.ones((len(x), 1), x.dtype)], axis=1)


def _subsample(index: WindowIndex, per_patient: int, rng: np.random.Generator) -> np.ndarray:
    out = []
    for p in range(len(index.ptr) - 1):
        lo, hi = int(index.ptr[p]), int(index.ptr[p + 1])
        if hi - lo <= per_patient:
            out.append(np.arange(lo, hi))
        else:
            out.append(np.sort(rng.choice(np.arange(lo, hi), per_patient, replace=False)))
    return np.concatenate(out) if out else np.zeros(0, np.int64)
