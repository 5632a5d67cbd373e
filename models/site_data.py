"""A site directory, validated against a twin spec, as per-patient arrays.

Guarantees of a :class:`SiteData`: every value is finite and inside the spec's range, each
patient's rows are in strictly increasing time on the spec's step grid, and every patient with
time series has covariates. Rows are grouped by patient; ``offsets`` delimit each patient.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from twinfed.errors import DataError
from twinfed.models.spec import TwinSpec
from twinfed.models.tables import find_table, read_table

# time_min counts minutes since the patient's first row: 10**9 is about 1900 years, so a larger
# value is a unit or epoch mistake; the bound also keeps the step arithmetic exact in float64.
MAX_TIME_MIN = 10**9


@dataclass
class SiteData:
    spec: TwinSpec
    patient_ids: list[str]  # stays on the node: never logged, never sent
    series: np.ndarray  # float32 [rows, states + controls], spec column order
    steps: np.ndarray  # int64 [rows]: time_min // step_minutes
    offsets: np.ndarray  # int64 [patients + 1]
    covariates: np.ndarray  # float32 [patients, covariates]

    @property
    def n_patients(self) -> int:
        return len(self.patient_ids)

    @property
    def n_rows(self) -> int:
        return int(self.series.shape[0])

    def subset(self, keep: set[str]) -> SiteData:
        """Only the patients in ``keep`` (e.g. those consented), in the same order."""
        idx = [i for i, pid in enumerate(self.patient_ids) if pid in keep]
        lengths = np.diff(self.offsets)[idx]
        rows = np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in idx]) \
            if idx else np.zeros(0, dtype=np.int64)
        return SiteData(
            spec=self.spec,
            patient_ids=[self.patient_ids[i] for i in idx],
            series=self.series[rows],
            steps=self.steps[rows],
            offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            covariates=self.covariates[idx],
        )

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


def load_site(site_dir: str | Path, spec: TwinSpec) -> SiteData:
    """Read and validate ``timeseries`` and ``patients`` of a site directory."""
    site_dir = Path(site_dir)
    if not site_dir.is_dir():
        raise DataError(f"{site_dir}: no such site directory")
    ts = read_table(find_table(site_dir, "timeseries"), "patient_id",
                    ["time_min", *spec.timeseries_columns],
                    ranges=_ranges((*spec.states, *spec.controls)))
    pt = read_table(find_table(site_dir, "patients"), "patient_id", spec.covariate_columns,
                    ranges=_ranges(spec.covariates))
    if ts.n_rows == 0:
        raise DataError(f"{ts.path.name}: no data rows; export at least one patient's series")

    # patients.csv: one row per patient
    counts = np.bincount(pt.id_codes, minlength=len(pt.id_values))
    if counts.size and counts.max() > 1:
        dup = int(np.flatnonzero(counts > 1)[0])
        row = int(np.flatnonzero(pt.id_codes == dup)[1])
        raise DataError(f"{pt.path.name} row {row + 1}, column patient_id: patient listed twice; "
                        "keep one row per patient")

    time = ts.values["time_min"]
    name = ts.path.name
    bad = np.flatnonzero(time < 0)
    if bad.size:
        raise DataError(f"{name} row {bad[0] + 1}, column time_min: negative time; time_min counts "
                        "minutes since the patient's first row")
    bad = np.flatnonzero(time > MAX_TIME_MIN)
    if bad.size:
        raise DataError(f"{name} row {bad[0] + 1}, column time_min: more than {MAX_TIME_MIN:,} "
                        "minutes (about 1900 years); time_min counts minutes since the patient's "
                        "first row")
    steps = np.rint(time / spec.step_minutes).astype(np.int64)
    # The tolerance is in minutes, not in steps: measured in steps, a large step_minutes would
    # shrink any offset below it and put every row on step 0.
    bad = np.flatnonzero(np.abs(time - steps * spec.step_minutes) > 1e-6)
    if bad.size:
        raise DataError(f"{name} row {bad[0] + 1}, column time_min: {time[bad[0]]:g} is not a "
                        f"multiple of the spec's step_minutes {spec.step_minutes}; resample the export")

    # Group rows by patient, keeping file order within a patient, then check time order.
    order = np.argsort(ts.id_codes, kind="stable")
    codes = ts.id_codes[order]
    steps_sorted = steps[order]
    same = codes[1:] == codes[:-1]
    dstep = np.diff(steps_sorted)
    dup = np.flatnonzero(same & (dstep == 0))
    if dup.size:
        row = int(order[dup[0] + 1])
        raise DataError(f"{name} row {row + 1}, column time_min: duplicate (patient, time) row; "
                        "keep one row per patient per step")
    back = np.flatnonzero(same & (dstep < 0))
    if back.size:
        row = int(order[back[0] + 1])
        raise DataError(f"{name} row {row + 1}, column time_min: time goes backwards for this "
                        "patient; sort each patient's rows by time_min")

    n_patients = len(ts.id_values)
    # Map each time-series patient to its covariate row.
    cov_index = {pid: i for i, pid in enumerate(pt.id_values)}
    row_of_code = np.empty(len(pt.id_values), dtype=np.int64)
    row_of_code[pt.id_codes] = np.arange(pt.n_rows)
    pt_rows = np.empty(n_patients, dtype=np.int64)
    for code, pid in enumerate(ts.id_values):
        j = cov_index.get(pid)
        if j is None:
            row = int(np.flatnonzero(ts.id_codes == code)[0])
            raise DataError(f"{name} row {row + 1}, column patient_id: this patient has no row in "
                            f"{pt.path.name}; add the patient's covariates")
        pt_rows[code] = row_of_code[j]
    cov = np.stack([pt.values[c][pt_rows] for c in spec.covariate_columns], axis=1) \
        if spec.covariates else np.zeros((n_patients, 0))

    series = np.empty((len(order), len(spec.timeseries_columns)), dtype=np.float32)
    for k, col in enumerate(spec.timeseries_columns):
        series[:, k] = ts.values[col][order]
    lengths = np.bincount(codes, minlength=n_patients)
    return SiteData(
        spec=spec,
        patient_ids=list(ts.id_values),
        series=series,
        steps=steps_sorted,
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        covariates=cov.astype(np.float32),
    )
