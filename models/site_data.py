"""A site directory, validated against a twin spec, as per-patient arrays.

Guarantees of a :class:`SiteData`: every value is finite and inside the spec's range, each
patient's rows are in strictly increasing time on the spec's step grid, and every patient with
time series has covariates. Rows are grouped by patient; ``offsets`` delimit each patient.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from twinfed.errors import DataError
from twinfed.models.problems import FirstProblems
from twinfed.models.spec import TwinSpec
from twinfed.models.tables import BATCH_ROWS, RowBatch, find_table, max_rows, stream_table

# time_min counts minutes since the patient's first row: 10**9 is about 1900 years, so a larger
# value is a unit or epoch mistake; the bound also keeps the step arithmetic exact in float64.
MAX_TIME_MIN = 10**9


@dataclass
class SiteData:
    spec: TwinSpec
    patient_ids: list[str]  # stays on the node: never logged, never sent
    series: np.ndarray  # float32 [rows, states + controls], spec column order
    steps: np.ndarray  # int32 [rows]: time_min // step_minutes
    offsets: np.ndarray  # int64 [patients + 1]
    covariates: np.ndarray  # float32 [patients, covariates]

    @property
    def n_patients(self) -> int:
        return len(self.patient_ids)

    @property
    def n_rows(self) -> int:
        return int(self.series.shape[0])

    def subset(self, keep: set[str], *, reuse: bool = False) -> SiteData:
        """Only the patients in ``keep`` (e.g. those consented), in the same order.

        ``reuse``: move the kept rows to the front of this site's own arrays instead of copying
        them; this site must not be used afterwards. A node that loads its export only to keep
        its consented patients then holds one copy of the data, not two.
        """
        kept = np.fromiter((pid in keep for pid in self.patient_ids), dtype=bool, count=self.n_patients)
        idx = np.flatnonzero(kept)
        lengths = np.diff(self.offsets)[idx]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        if reuse:
            series, steps = self._compact(kept, int(offsets[-1]))
        else:
            rows = np.repeat(kept, np.diff(self.offsets))
            series, steps = self.series[rows], self.steps[rows]
        return SiteData(
            spec=self.spec,
            patient_ids=[self.patient_ids[i] for i in idx],
            series=series,
            steps=steps,
            offsets=offsets,
            covariates=self.covariates[idx],
        )

    def _compact(self, kept: np.ndarray, n_kept: int) -> tuple[np.ndarray, np.ndarray]:
        """The kept patients' rows moved to the front of ``series`` and ``steps``, in place."""
        # runs of consecutive kept patients, as row ranges
        edges = np.flatnonzero(np.diff(np.concatenate([[False], kept, [False]]).astype(np.int8)))
        block = 1 << 16  # moved a block at a time: an overlapping copy buffers only a block
        to = 0
        for first, end in zip(self.offsets[edges[0::2]], self.offsets[edges[1::2]]):
            for a in range(int(first), int(end), block):
                b = min(int(end), a + block)
                self.series[to:to + b - a] = self.series[a:b]
                self.steps[to:to + b - a] = self.steps[a:b]
                to += b - a
        assert to == n_kept
        return self.series[:n_kept], self.steps[:n_kept]

    @classmethod
    def pooled(cls, sites: list[SiteData]) -> SiteData:
        """Several sites as one (the centralised baseline's data; never done across hospitals)."""
        if not sites:
            raise ValueError("pooled() needs at least one site")
        lengths = np.concatenate([np.diff(s.offsets) for s in sites])
        return cls(
            spec=sites[0].spec,
            patient_ids=[f"{i}:{pid}" for i, s in enumerate(sites) for pid in s.patient_ids],
            series=np.concatenate([s.series for s in sites]),
            steps=np.concatenate([s.steps for s in sites]),
            offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            covariates=np.concatenate([s.covariates for s in sites]),
        )

    def patient_slice(self, index: int) -> slice:
        return slice(int(self.offsets[index]), int(self.offsets[index + 1]))


def _ranges(cols) -> dict[str, tuple[float, float, str]]:
    return {c.column: (c.min, c.max, c.unit) for c in cols}


def load_site(site_dir: str | Path, spec: TwinSpec, *, batch_rows: int = BATCH_ROWS) -> SiteData:
    """Read and validate ``timeseries`` and ``patients`` of a site directory.

    The export streams past in batches of ``batch_rows`` rows into compact arrays (float32
    values, int32 steps), so the node holds about one copy of the data, not Arrow's tables
    and float64 columns of all of it. Any problem is the one-line error of the whole file,
    wherever the batches fall.
    """
    site_dir = Path(site_dir)
    if not site_dir.is_dir():
        raise DataError(f"{site_dir}: no such site directory")
    ts_path = find_table(site_dir, "timeseries")
    pt_path = find_table(site_dir, "patients")
    series = _SeriesBuilder(spec, ts_path.name, capacity=max_rows(ts_path))
    ts_problems = FirstProblems()
    for batch in stream_table(ts_path, "patient_id", ["time_min", *spec.timeseries_columns],
                              ranges=_ranges((*spec.states, *spec.controls)), problems=ts_problems,
                              batch_rows=batch_rows):
        series.add(batch)
    ts_problems.raise_first()
    pt_ids, pt_values = _read_patients(pt_path, spec, batch_rows)
    if series.n_rows == 0:
        raise DataError(f"{ts_path.name}: no data rows; export at least one patient's series")

    # patients.csv: one row per patient
    pt_codes, pt_distinct = _codes(pt_ids)
    counts = np.bincount(pt_codes, minlength=len(pt_distinct))
    if counts.size and counts.max() > 1:
        dup = int(np.flatnonzero(counts > 1)[0])
        row = int(np.flatnonzero(pt_codes == dup)[1])
        raise DataError(f"{pt_path.name} row {row + 1}, column patient_id: patient listed twice; "
                        "keep one row per patient")
    series.problems.raise_first()

    patient_ids = series.patient_ids
    cov_index = {pid: i for i, pid in enumerate(pt_ids)}
    pt_rows = np.empty(len(patient_ids), dtype=np.int64)
    for code, pid in enumerate(patient_ids):
        j = cov_index.get(pid)
        if j is None:
            raise DataError(f"{ts_path.name} row {int(series.first_row[code]) + 1}, column patient_id: "
                            f"this patient has no row in {pt_path.name}; add the patient's covariates")
        pt_rows[code] = j
    cov = np.stack([pt_values[c][pt_rows] for c in spec.covariate_columns], axis=1) \
        if spec.covariates else np.zeros((len(patient_ids), 0))
    values, steps, offsets = series.grouped()
    # Arrow's allocator keeps freed batches for reuse; the node needs that memory for training.
    pa.default_memory_pool().release_unused()
    return SiteData(spec=spec, patient_ids=patient_ids, series=values, steps=steps, offsets=offsets,
                    covariates=cov.astype(np.float32))


def _codes(ids: list[str]) -> tuple[np.ndarray, list[str]]:
    """Each id's index into the distinct ids, in order of first appearance."""
    code_of: dict[str, int] = {}
    codes = np.fromiter((code_of.setdefault(pid, len(code_of)) for pid in ids), dtype=np.int64,
                        count=len(ids))
    return codes, list(code_of)


def _read_patients(path: Path, spec: TwinSpec, batch_rows: int) -> tuple[list[str], dict[str, np.ndarray]]:
    """``patients``: one small row per patient, its ids in file order and its float64 columns."""
    problems = FirstProblems()
    ids: list[str] = []
    parts: dict[str, list[np.ndarray]] = {c: [] for c in spec.covariate_columns}
    for batch in stream_table(path, "patient_id", spec.covariate_columns,
                              ranges=_ranges(spec.covariates), problems=problems, batch_rows=batch_rows):
        ids.extend(batch.ids.to_pylist())
        for c in spec.covariate_columns:
            parts[c].append(batch.values[c])
    problems.raise_first()
    return ids, {c: np.concatenate(v) if v else np.zeros(0) for c, v in parts.items()}


class _SeriesBuilder:
    """The time series, batch by batch, into arrays sized once for the whole file: patient
    codes, int32 steps and float32 values in file order; per-patient running state (rows, last
    step, first row) for the checks that span batches; and the first problem of each kind that
    depends on more than one cell."""

    # kinds of ``problems``, in the order they outrank each other
    NEGATIVE, TOO_LATE, OFF_GRID, DUPLICATE, BACKWARDS = range(5)

    def __init__(self, spec: TwinSpec, name: str, capacity: int):
        self.spec, self.name = spec, name
        self.columns = spec.timeseries_columns
        self.problems = FirstProblems()
        self.code_of: dict[str, int] = {}
        self.n_rows = 0
        self.codes = np.empty(capacity, np.int32)
        self.steps = np.empty(capacity, np.int32)
        self.values = np.empty((capacity, len(self.columns)), np.float32)
        self.in_patient_order = True  # each patient's rows are contiguous in the file so far
        self.rows_of = np.zeros(1024, np.int64)  # per patient code
        self.last_step = np.zeros(1024, np.int64)
        self.first_row = np.zeros(1024, np.int64)

    @property
    def patient_ids(self) -> list[str]:
        return list(self.code_of)

    def add(self, batch: RowBatch) -> None:
        codes = self._patient_codes(batch)
        steps = self._steps(batch)
        self._check_time_order(codes, steps, batch.start)
        a, b = self.n_rows, self.n_rows + len(batch)
        if b > self.codes.size:  # only if max_rows() was wrong
            self._grow(b)
        if self.in_patient_order:
            before = self.codes[a - 1] if a else 0
            self.in_patient_order = bool(np.all(np.diff(codes) >= 0)) and (codes.size == 0 or codes[0] >= before)
        self.codes[a:b] = codes
        self.steps[a:b] = steps
        for k, col in enumerate(self.columns):
            self.values[a:b, k] = batch.values[col]
        self.n_rows = b

    def _grow(self, rows: int) -> None:
        size = max(rows, 2 * self.codes.size)
        self.codes, self.steps = (np.concatenate([a, np.empty(size - a.size, a.dtype)])
                                  for a in (self.codes, self.steps))
        self.values = np.concatenate([self.values, np.empty((size - len(self.values), len(self.columns)),
                                                            np.float32)])

    def _patient_codes(self, batch: RowBatch) -> np.ndarray:
        encoded = pc.dictionary_encode(batch.ids)
        seen_before = len(self.code_of)
        local = np.fromiter((self.code_of.setdefault(pid, len(self.code_of))
                             for pid in encoded.dictionary.to_pylist()), dtype=np.int32)
        codes = local[encoded.indices.to_numpy(zero_copy_only=False)]
        n = len(self.code_of)
        if n > self.rows_of.size:
            grow = max(n, 2 * self.rows_of.size) - self.rows_of.size
            self.rows_of, self.last_step, self.first_row = (
                np.concatenate([a, np.zeros(grow, np.int64)])
                for a in (self.rows_of, self.last_step, self.first_row))
        if n > seen_before:  # the patients first seen in this batch: where they first appear
            rows = np.flatnonzero(codes >= seen_before)
            new, where = np.unique(codes[rows], return_index=True)
            self.first_row[new] = batch.start + rows[where]
        return codes

    def _steps(self, batch: RowBatch) -> np.ndarray:
        """int64 steps of the batch's rows (0 where time_min is unusable, a noted problem)."""
        time = batch.values["time_min"]
        step = self.spec.step_minutes
        name, start = self.name, batch.start
        bad = np.flatnonzero(time < 0)
        if bad.size:
            self.problems.note((self.NEGATIVE,), start + bad[0],
                               f"{name} row {start + bad[0] + 1}, column time_min: negative time; "
                               "time_min counts minutes since the patient's first row")
        bad = np.flatnonzero(time > MAX_TIME_MIN)
        if bad.size:
            self.problems.note((self.TOO_LATE,), start + bad[0],
                               f"{name} row {start + bad[0] + 1}, column time_min: more than "
                               f"{MAX_TIME_MIN:,} minutes (about 1900 years); time_min counts "
                               "minutes since the patient's first row")
        usable = (time >= 0) & (time <= MAX_TIME_MIN)
        steps = np.rint(np.where(usable, time, 0.0) / step).astype(np.int64)
        # The tolerance is in minutes, not in steps: measured in steps, a large step_minutes would
        # shrink any offset below it and put every row on step 0.
        bad = np.flatnonzero(usable & (np.abs(time - steps * step) > 1e-6))
        if bad.size:
            self.problems.note((self.OFF_GRID,), start + bad[0],
                               f"{name} row {start + bad[0] + 1}, column time_min: {time[bad[0]]:g} is "
                               f"not a multiple of the spec's step_minutes {step}; resample the export")
        return steps

    def _check_time_order(self, codes: np.ndarray, steps: np.ndarray, start: int) -> None:
        """Each row against its patient's previous row (in this batch or an earlier one). The
        row named is the first in patient order (first appearance), then file order."""
        order = np.argsort(codes, kind="stable")
        c, s = codes[order], steps[order]
        new_run = np.ones(c.size, bool)
        new_run[1:] = c[1:] != c[:-1]
        prev = np.empty_like(s)
        prev[1:] = s[:-1]
        prev[new_run] = self.last_step[c[new_run]]
        has_prev = ~new_run | (self.rows_of[c] > 0)
        d = s - prev
        for kind, bad, what in (
                (self.DUPLICATE, has_prev & (d == 0),
                 "duplicate (patient, time) row; keep one row per patient per step"),
                (self.BACKWARDS, has_prev & (d < 0),
                 "time goes backwards for this patient; sort each patient's rows by time_min")):
            hit = np.flatnonzero(bad)
            if hit.size:
                row = start + int(order[hit[0]])
                self.problems.note((kind,), (int(c[hit[0]]), row),
                                   f"{self.name} row {row + 1}, column time_min: {what}")
        run_ends = np.flatnonzero(np.append(new_run[1:], True))
        self.last_step[c[run_ends]] = s[run_ends]
        self.rows_of[c[run_ends]] += np.diff(np.append(-1, run_ends))  # one run per patient

    def grouped(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Values, steps and offsets with rows grouped by patient (in order of first appearance),
        file order kept within a patient. An export already in patient order is used as read;
        otherwise the rows are placed a slice at a time (a counting sort: no permutation of
        all rows is ever held), at the cost of a second copy of the compact data."""
        n_patients, n = len(self.code_of), self.n_rows
        offsets = np.concatenate([[0], np.cumsum(self.rows_of[:n_patients])]).astype(np.int64)
        values, steps = self.values[:n], self.steps[:n]
        if not self.in_patient_order:
            values = np.empty_like(values)
            steps = np.empty_like(steps)
            fill = offsets[:-1].copy()
            for a in range(0, n, 1 << 16):
                b = min(n, a + (1 << 16))
                order = np.argsort(self.codes[a:b], kind="stable")
                c = self.codes[a:b][order]
                run_starts = np.flatnonzero(np.append(True, c[1:] != c[:-1]))
                run_lengths = np.diff(np.append(run_starts, c.size))
                dest = fill[c] + (np.arange(c.size) - np.repeat(run_starts, run_lengths))
                values[dest] = self.values[a:b][order]
                steps[dest] = self.steps[a:b][order]
                fill[c[run_starts]] += run_lengths
        self.codes = self.steps = self.values = None
        return values, steps, offsets
