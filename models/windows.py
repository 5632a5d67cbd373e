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
    def build(cls, site: SiteData, window_steps: int | None = None) -> WindowIndex:
        """Every window of every patient: ``window_steps`` consecutive rows of one patient on
        consecutive steps (default the spec's, history then horizon; a rolled-forward loss's
        long windows are history then its span). Built from the runs of such rows, so besides
        ``starts`` it holds one byte per row (a round's peak at the node is the data, not its index)."""
        w = site.spec.window_steps if window_steps is None else int(window_steps)
        n = site.n_rows
        # A run starts at each patient's first row and after each gap in the steps.
        breaks = np.ones(n, dtype=bool)
        if n > 1:
            np.not_equal(np.diff(site.steps), 1, out=breaks[1:])
        breaks[site.offsets[:-1][np.diff(site.offsets) > 0]] = True
        run_starts = np.flatnonzero(breaks)
        del breaks
        per_run = np.diff(np.append(run_starts, n)) - (w - 1)
        run_starts, per_run = run_starts[per_run > 0], per_run[per_run > 0]
        # starts = run_start, run_start + 1, ... for each run: a running sum of steps of 1,
        # jumping to the next run's first row
        starts = np.ones(int(per_run.sum()), dtype=np.int64)
        if starts.size:
            firsts = np.concatenate([[0], np.cumsum(per_run)[:-1]])
            last_before = np.concatenate([[0], (run_starts + per_run - 1)[:-1]])
            starts[firsts] = run_starts - last_before
            starts[0] = run_starts[0]
            np.cumsum(starts, out=starts)
        run_patient = np.searchsorted(site.offsets, run_starts, side="right") - 1
        counts = np.bincount(run_patient, weights=per_run, minlength=site.n_patients).astype(np.int64)
        return cls(starts, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))

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
           with_context: bool = False, horizon: int | None = None) -> Batch:
    """The windows starting at rows ``starts``; ``horizon``: steps ahead (default the spec's;
    the windows must have them, e.g. from ``WindowIndex.build(site, history + horizon)``)."""
    spec = site.spec
    h, s = spec.history_steps, len(spec.states)
    k = spec.horizon_steps if horizon is None else int(horizon)
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
