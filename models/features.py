"""Turning windows into network inputs and targets, scaled by the spec's declared ranges only.

Scaling uses the spec's ``min``/``max`` and fixed constants, never statistics of patient data:
such statistics would leave the hospital without noise. The network predicts the change from the
last observed state (persistence is its zero), in units of ``DELTA_UNITS`` of the state's range.
"""

from __future__ import annotations

import numpy as np

from twinfed.models.spec import TwinSpec
from twinfed.models.windows import Batch

# A change of 1/DELTA_UNITS of a state's half-range is one unit for the network; e.g. glucose's
# half-range is 290 mg/dL, so one unit is 29 mg/dL: typical hourly changes are of order one.
DELTA_UNITS = 10.0
# Controls are mostly small against their declared maximum (a basal insulin step is 0.1 U of a
# 100 U maximum), so they enter three ways: linearly with this gain (dose-proportional effects),
# log-compressed with CONTROL_KNEE (on/off events), and as running totals over the window (amounts
# act long after they are given).
CONTROL_GAIN = 50.0
CONTROL_KNEE = 1000.0


class Scaler:
    """The neural surrogate's inputs: the last ``history_steps`` of the window, the planned
    controls and the covariates, scaled."""

    with_context = False

    def __init__(self, spec: TwinSpec):
        self.spec = spec
        st = spec.states
        self.s_mid = np.array([(c.min + c.max) / 2 for c in st], np.float32)
        self.s_half = np.array([(c.max - c.min) / 2 for c in st], np.float32)
        self.c_max = np.array([c.max for c in spec.controls], np.float32)
        cv = spec.covariates
        self.v_mid = np.array([(c.min + c.max) / 2 for c in cv], np.float32)
        self.v_half = np.array([(c.max - c.min) / 2 for c in cv], np.float32)
        self.n_states = len(st)
        self.n_controls = len(spec.controls)

    @property
    def n_features(self) -> int:
        h, k = self.spec.history_steps, self.spec.horizon_steps
        return self.n_states + h * self.n_states + 3 * (h + k) * self.n_controls + len(self.v_mid)

    @property
    def n_outputs(self) -> int:
        return self.spec.horizon_steps * self.n_states

    def _controls(self, c: np.ndarray) -> np.ndarray:
        frac = np.clip(c / self.c_max, 0.0, 1.0)
        return np.concatenate([frac * CONTROL_GAIN,
                               np.log1p(frac * CONTROL_KNEE) / np.log1p(CONTROL_KNEE),
                               np.cumsum(frac, axis=1) * (CONTROL_GAIN / 4)], axis=-1)

    def features(self, history: np.ndarray, future_controls: np.ndarray,
                 covariates: np.ndarray) -> np.ndarray:
        s, n = self.n_states, len(history)
        h, k, c = self.spec.history_steps, self.spec.horizon_steps, self.n_controls
        states = history[:, :, :s]
        last = states[:, -1, :]
        # Explicit shapes: an empty batch (Poisson sampling can draw none) must still work.
        parts = [
            (last - self.s_mid) / self.s_half,
            ((states - last[:, None, :]) / self.s_half * DELTA_UNITS).reshape(n, h * s),
        ]
        if self.n_controls:
            parts.append(self._controls(history[:, :, s:]).reshape(n, h * 3 * c))
            parts.append(self._controls(future_controls).reshape(n, k * 3 * c))
        if len(self.v_mid):
            parts.append((covariates - self.v_mid) / self.v_half)
        return np.concatenate(parts, axis=1).astype(np.float32)

    def batch_features(self, batch: Batch) -> np.ndarray:
        return self.features(batch.history, batch.future_controls, batch.covariates)

    def targets(self, batch: Batch) -> np.ndarray:
        """Scaled change of each future state from the last observed one: [B, K*S]."""
        last = batch.history[:, -1, : self.n_states]
        d = (batch.future_states - last[:, None, :]) / self.s_half * DELTA_UNITS
        return d.reshape(len(d), self.n_outputs).astype(np.float32)

    def decode(self, last_states: np.ndarray, outputs: np.ndarray) -> np.ndarray:
        """Network outputs [B, K*S] back to states [B, K, S] in the spec's units."""
        d = outputs.reshape(len(outputs), self.spec.horizon_steps, self.n_states)
        return last_states[:, None, :] + d * self.s_half / DELTA_UNITS
