"""Windows of one patient's series: ``history_steps`` of context then ``horizon_steps`` ahead.

A window never spans a gap in a patient's series. The index lets training draw exactly one
window for a given patient (the unit of patient-level DP) and lets evaluation walk every window.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from twinfed.models.site_data import SiteData


@dataclass
class WindowIndex:
    starts: np.ndarray  # int64: row index of every valid window's first step, grouped by patient
    ptr: np.ndarray  # int64 [patients + 1]: patient p's starts are starts[ptr[p]:ptr[p+1]]

    @classmethod
    def build(cls, site: SiteData) -> WindowIndex:
        w = site.spec.window_steps
        n = site.n_rows
        if n < w:
            return cls(np.zeros(0, np.int64), np.zeros(site.n_patients + 1, np.int64))
        first = np.arange(n - w + 1)
        last = first + w - 1
        patient_of_row = np.repeat(np.arange(site.n_patients), np.diff(site.offsets))
        ok = (patient_of_row[first] == patient_of_row[last]) & \
             (site.steps[last] - site.steps[first] == w - 1)
        starts = first[ok]
        counts = np.bincount(patient_of_row[starts], minlength=site.n_patients)
        return cls(starts.astype(np.int64), np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))

    @property
    def n_windows(self) -> int:
        return int(self.starts.size)

    def counts(self) -> np.ndarray:
        return np.diff(self.ptr)

    def patients_with_windows(self) -> np.ndarray:
        return np.flatnonzero(self.counts() > 0)

    def one_per_patient(self, patients: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One uniformly drawn window start for each of ``patients`` (each must have one)."""
        return self.per_patient(patients, rng, 1)[:, 0]

    def per_patient(self, patients: np.ndarray, rng: np.random.Generator, k: int) -> np.ndarray:
        """``[len(patients), k]`` window starts, each drawn uniformly (with replacement) from its
        patient's windows: ``k`` looks at the same patient, still one unit of privacy."""
        counts = self.counts()[patients]
        pick = (rng.random((len(patients), k)) * counts[:, None]).astype(np.int64)
        return self.starts[self.ptr[patients][:, None] + pick]

    def window_patients(self) -> np.ndarray:
        """The patient index of every window in ``starts``."""
        return np.repeat(np.arange(len(self.ptr) - 1), self.counts())


@dataclass
class Batch:
    """Raw (unscaled) windows: history of states and controls, future controls and truth.

    ``context`` (when asked for) is the record's last ``spec.context_length`` steps before the
    forecast origin, history included, ``[B, Lc, S + C]``; ``context_mask`` ``[B, Lc]`` is 1 where
    the patient's contiguous record reaches back that far and 0 before it (values there are 0).
    """

    history: np.ndarray  # [B, H, S + C]
    future_controls: np.ndarray  # [B, K, C]
    future_states: np.ndarray  # [B, K, S]
    covariates: np.ndarray  # [B, V]
    context: np.ndarray | None = None  # [B, Lc, S + C]
    context_mask: np.ndarray | None = None  # [B, Lc]
    patients: np.ndarray | None = None  # [B]: each window's patient (index into the site)

    def __len__(self) -> int:
        return len(self.history)

    def part(self, sl: slice) -> Batch:
        """Windows ``sl`` of this batch."""
        cut = (lambda a: None if a is None else a[sl])  # noqa: E731
        return Batch(self.history[sl], self.future_controls[sl], self.future_states[sl],
                     self.covariates[sl], cut(self.context), cut(self.context_mask), cut(self.patients))

    def with_future_controls(self, future_controls: np.ndarray) -> Batch:
        """The same windows under other planned controls (a what-if)."""
        return Batch(self.history, future_controls, self.future_states, self.covariates,
                     self.context, self.context_mask, self.patients)


def gather(site: SiteData, starts: np.ndarray, patients: np.ndarray, *,
           with_context: bool = False) -> Batch:
    spec = site.spec
    h, k, s = spec.history_steps, spec.horizon_steps, len(spec.states)
    rows = starts[:, None] + np.arange(h + k)[None, :]
    win = site.series[rows]  # [B, H+K, S+C]
    context = mask = None
    if with_context:
        context, mask = context_at(site, starts + h - 1, patients)
    return Batch(
        history=win[:, :h, :],
        future_controls=win[:, h:, s:],
        future_states=win[:, h:, :s],
        covariates=site.covariates[patients],
        context=context, context_mask=mask, patients=patients,
    )


def context_at(site: SiteData, ends: np.ndarray, patients: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ``context_length`` rows ending at row ``ends`` (the forecast origin) of each window,
    masked where they leave the patient's contiguous record."""
    lc = site.spec.context_length
    rows = ends[:, None] - np.arange(lc - 1, -1, -1)[None, :]  # [B, Lc], oldest first
    first = site.offsets[patients][:, None]
    safe = np.maximum(rows, first)
    contiguous = site.steps[safe] == site.steps[ends][:, None] - (ends[:, None] - rows)
    mask = (rows >= first) & contiguous
    context = site.series[safe] * mask[:, :, None]
    return context.astype(np.float32), mask.astype(np.float32)
