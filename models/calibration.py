"""Prediction intervals for a twin's forecasts: each patient's error scale, the calibration
histogram of held-out patients' normalised errors, the calibration file, and the bands.

The method is split conformal prediction with a per-patient scale:

1. A patient identified from their record up to a time (``twinfed.models.personalise``) has, per
   forecast step and state, an error **scale**: the root-mean-square error of their personalised
   forecast over the identification's own windows, made non-decreasing over the horizon and
   floored at half a percent of the state's spec range. No identification window: no scale
   (NaN), and no interval.
2. Calibration patients, never trained on, are each identified on their first
   ``identify_hours`` and scored on later windows: ``|y - yhat| / scale``. Their patient-weighted
   histogram (``twinfed.models.conformal``) is computed here without noise; a hospital node adds
   the noise before it releases one.
3. The quantile ``q`` of each level and state, read off the summed histogram, gives the
   interval ``yhat +- q * scale``, clipped to the state's spec range.

The file ``model/calibration.json`` (:class:`IntervalCalibration`) holds only aggregates: the
summed histogram, the quantiles and how it was made. A twin that is not a hybrid has no
personalisation: its scale is computed the same way from its plain forecast on the same windows.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from twinfed.errors import ModelError
from twinfed.models import conformal
from twinfed.models.plan import CalibrationConfig
from twinfed.models.spec import TwinSpec

FILENAME = "calibration.json"
FORMAT = "twinfed-intervals-v1"
# Of a state's spec range (2.9 mg/dL for glucose, about a sensor's resolution): a patient whose
# identification windows happened to be flat would otherwise get a scale near 0, a score near
# infinity when calibrating, and a zero-width interval when forecasting.
SCALE_FLOOR = 0.005
CHUNK = 8192  # windows per forward pass (a hybrid's window carries a day of context)


class StateCalibration(BaseModel):
    """One state's calibration: the summed (possibly noisy) histogram masses, their total (the
    number of patients, noisy under DP) and each level's quantile (None: +inf, see ``notes``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    histogram: list[float]
    patients: float
    quantiles: dict[str, Annotated[float, Field(ge=0)] | None]
    notes: dict[str, str] = {}


class IntervalCalibration(BaseModel):
    """The file ``model/calibration.json``: what a twin's prediction intervals are read from."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    format: Literal["twinfed-intervals-v1"] = FORMAT
    levels: tuple[Annotated[float, Field(gt=0, lt=1)], ...]
    edges: tuple[Annotated[float, Field(gt=0)], ...]
    identify_hours: Annotated[float, Field(gt=0)]
    states: dict[str, StateCalibration]
    differential_privacy: bool
    noise_multiplier: Annotated[float, Field(gt=0)] | None = None
    sites: Annotated[int, Field(ge=1)] = 1
    source: str
    # The weights calibrated (``twinfed.models.digest.weights_sha256``): a twin retrained into the
    # same directory must not show intervals calibrated for its predecessor. None: not recorded.
    weights_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> IntervalCalibration:
        if list(self.edges) != sorted(set(self.edges)) or len(self.edges) < 2:
            raise ValueError("edges must be at least two increasing numbers")
        if list(self.levels) != sorted(set(self.levels)) or not self.levels:
            raise ValueError("levels must be increasing")
        if self.differential_privacy != (self.noise_multiplier is not None):
            raise ValueError("a noise_multiplier is given exactly when differential_privacy is true")
        keys = {conformal.percent(level) for level in self.levels}
        for name, state in self.states.items():
            if len(state.histogram) != conformal.n_bins(self.edges):
                raise ValueError(f"state {name}: {len(state.histogram)} histogram bins for "
                                 f"{len(self.edges)} edges (needs {conformal.n_bins(self.edges)})")
            if set(state.quantiles) != keys:
                raise ValueError(f"state {name}: quantiles for {sorted(state.quantiles)}, levels are "
                                 f"{sorted(keys)}")
        return self

    def quantile(self, state: str, level: float) -> float:
        """The normalised-score quantile of ``state`` at ``level`` (+inf when the calibration
        cannot support the level)."""
        try:
            q = self.states[state].quantiles[conformal.percent(level)]
        except KeyError:
            raise ModelError(f"the calibration has no {conformal.percent(level)}% quantile for "
                             f"{state!r} (levels {self.level_keys()}, states {list(self.states)}); "
                             "recalibrate") from None
        return math.inf if q is None else q

    def level_keys(self) -> list[str]:
        return [conformal.percent(level) for level in self.levels]

    def label(self) -> dict:
        """How the intervals were calibrated, for every output that shows them."""
        return {"levels": list(self.levels), "source": self.source,
                "differential_privacy": self.differential_privacy,
                "noise_multiplier": self.noise_multiplier, "sites": self.sites,
                "identify_hours": self.identify_hours}

    def check_spec(self, spec: TwinSpec) -> None:
        # By name, not by order: the file is JSON with sorted keys (the cardio twin's sbp_mmhg,
        # hr_bpm come back as hr_bpm, sbp_mmhg), and every reader looks a state up by its column.
        if sorted(self.states) != sorted(spec.state_columns):
            raise ModelError(f"the calibration is for states {list(self.states)}, the twin has "
                             f"{spec.state_columns}; recalibrate with `twinfed calibrate --force`")

    def check_twin(self, twin) -> None:
        """Refuse a calibration made for another twin (other states, other weights)."""
        self.check_spec(twin.spec)
        if self.weights_sha256 is not None and self.weights_sha256 != twin_weights_sha256(twin):
            raise ModelError("the calibration (model/calibration.json) was made for other weights than "
                             "the twin's; recalibrate with `twinfed calibrate --force`")

    @classmethod
    def from_histogram(cls, histogram: np.ndarray, spec: TwinSpec, config: CalibrationConfig, *,
                       differential_privacy: bool, noise_multiplier: float | None, sites: int,
                       source: str, weights_sha256: str | None = None) -> IntervalCalibration:
        """The calibration of a summed (noisy) histogram ``[S, B]`` whose rows follow the spec's
        states: each level's quantile, and a note for each infinite one. ``weights_sha256``: the
        calibrated twin's (:func:`twin_weights_sha256`), so a retrained twin refuses it."""
        histogram = np.asarray(histogram, dtype=np.float64)
        expected = (len(spec.states), conformal.n_bins(config.edges))
        if histogram.shape != expected:
            raise ModelError(f"a calibration histogram of shape {histogram.shape}; the spec and edges "
                             f"need {expected}")
        qs = conformal.quantiles(histogram, config.edges, config.levels)
        states = {}
        for j, col in enumerate(spec.state_columns):
            keys = [conformal.percent(level) for level in config.levels]
            notes = {key: note for key, level in zip(keys, config.levels)
                     if (note := conformal.quantile_note(histogram[j], config.edges, level))}
            states[col] = StateCalibration(
                histogram=[float(v) for v in histogram[j]], patients=float(histogram[j].sum()),
                quantiles={key: (float(q) if np.isfinite(q) else None) for key, q in zip(keys, qs[j])},
                notes=notes)
        return cls(levels=config.levels, edges=config.edges, identify_hours=config.identify_hours,
                   states=states, differential_privacy=differential_privacy,
                   noise_multiplier=noise_multiplier, sites=sites, source=source,
                   weights_sha256=weights_sha256)


def twin_weights_sha256(twin) -> str:
    """The digest of the twin's weights, as a calibration records it."""
    from twinfed.models.digest import weights_sha256
    from twinfed.models.surrogate import get_weights

    return weights_sha256(get_weights(twin.surrogate))


def _model_dir(model_dir) -> Path:
    from twinfed.models.twin import MODEL_DIRNAME

    path = Path(model_dir)
    return path / MODEL_DIRNAME if (path / MODEL_DIRNAME).is_dir() else path


def calibration_path(model_dir) -> Path:
    """Where a run's (or a model directory's) calibration lives."""
    return _model_dir(model_dir) / FILENAME


def load_calibration(model_dir) -> IntervalCalibration | None:
    """The twin's calibration (``model/calibration.json``), or None if it has none."""
    path = calibration_path(model_dir)
    if not path.is_file():
        return None
    try:
        return IntervalCalibration.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        reason = f"{where}: {message}" if where else message
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        reason = str(exc).splitlines()[0]
    raise ModelError(f"{path}: not a valid calibration file ({reason}); recalibrate with "
                     "`twinfed calibrate --force` or move the file aside")


def save_calibration(model_dir, cal: IntervalCalibration) -> Path:
    """Write ``cal`` as the twin's calibration, atomically; returns the file's path."""
    from twinfed.atomic import write_json_atomic

    path = calibration_path(model_dir)
    # Aggregates only, read by whoever uses the twin: as readable as the model's other files.
    write_json_atomic(path, cal.model_dump(mode="json"), mode=0o644)
    return path


# -- per-patient scales and the local calibration -----------------------------------------------


def held_out(plan_sha256: str, patient_ids: list[str], fraction: float) -> np.ndarray:
    """Which of a node's patients it keeps out of a study's training to calibrate the twin's
    intervals on (bool per id): a hash of the plan and the id, so the same patients in every
    round of the study (none of them is ever trained on) and other patients in another study.
    The ids never leave the node; nor does the split."""
    out = np.empty(len(patient_ids), dtype=bool)
    for i, pid in enumerate(patient_ids):
        digest = hashlib.sha256(f"{plan_sha256}:{pid}".encode()).digest()
        out[i] = int.from_bytes(digest[:8], "big") < fraction * 2.0 ** 64
    return out


def identify_patients(twin, site, patients: np.ndarray, until_steps: np.ndarray, *, seed: int = 0,
                      posterior: bool = False):
    """The identification the intervals are computed on: a hybrid twin's fit of each patient
    (``personalise.identify``); for any other twin, the same choice of windows and no offset
    (an offset with no parameters), since it has nothing to personalise. Either way each
    patient's is their own (windows keyed by ``seed`` and the patient), whoever else is given.
    ``posterior``: also each patient's Laplace posterior (what a trial or a what-if reports;
    intervals' calibration and evaluation do without it)."""
    import torch

    from twinfed.models.personalise import Identified, identification_windows, identify

    patients = np.asarray(patients, dtype=np.int64)
    until_steps = np.asarray(until_steps)
    if twin.hybrid:
        return identify(twin.surrogate, site, patients, until_steps, seed=seed, posterior=posterior)
    starts, counts = identification_windows(site, patients, until_steps, seed=seed)
    return Identified(torch.zeros(len(patients), 0), counts, starts,
                      np.repeat(np.arange(len(patients)), counts), patients)


def _forecast(twin, batch, identified, rows: np.ndarray) -> np.ndarray:
    """The twin's forecast of windows whose patients are ``rows`` of ``identified``."""
    if identified.offset.shape[1] == 0:
        return twin.forecast(batch)
    return twin.forecast(batch, offset=identified.offset[rows])


def _per_patient(owner: np.ndarray) -> list[slice]:
    """The windows of each patient (``owner`` grouped by patient), at most ``CHUNK`` at a time.
    A forecast reads each patient's windows alone: a matrix product rounds a row by where it
    lies in memory, so in a batch shared with other patients a patient's forecast (their scale,
    their scores) would change when another patient is removed (``personalise.by_group``)."""
    cuts = np.flatnonzero(np.diff(owner)) + 1
    bounds = np.concatenate([[0], cuts, [owner.size]]) if owner.size else np.zeros(1, np.int64)
    return [slice(int(a), int(min(a + CHUNK, b))) for lo, b in zip(bounds[:-1], bounds[1:])
            for a in range(int(lo), int(b), CHUNK)]


def _gather(twin, site, starts: np.ndarray, patients: np.ndarray):
    from twinfed.models.windows import gather

    return gather(site, starts, patients, with_context=twin.inputs.with_context)


def identification_scales(twin, site, identified) -> np.ndarray:
    """``[P, K, S]``: each identified patient's error scale per step and state, from their
    (personalised) forecast on the identification's own windows; NaN for a patient the
    identification had no window for."""
    spec = site.spec
    p, k, s = len(identified.n_windows), spec.horizon_steps, len(spec.states)
    total = np.zeros((p, k, s))
    for part in _per_patient(identified.owner):
        rows = identified.owner[part]
        batch = _gather(twin, site, identified.starts[part], identified.patients[rows])
        err = _forecast(twin, batch, identified, rows) - batch.future_states
        np.add.at(total, rows, np.square(err, dtype=np.float64))
    counts = identified.n_windows.astype(np.float64)[:, None, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        rms = np.where(counts > 0, np.sqrt(total / np.maximum(counts, 1)), np.nan)
    # A forecast further ahead is no more certain than a nearer one, whatever a patient's few
    # windows happened to show.
    rms = np.maximum.accumulate(rms, axis=1)
    span = np.array([c.max - c.min for c in spec.states])
    return np.maximum(rms, SCALE_FLOOR * span)  # NaN stays NaN


def identify_steps(spec: TwinSpec, hours: float) -> int:
    return int(round(hours * 60 / spec.step_minutes))


def scored_windows(site, patients: np.ndarray, origin_from: np.ndarray, max_windows: int,
                   eligible: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``max_windows`` window starts per patient whose forecast origin is at or after the
    patient's ``origin_from``, spread evenly over them (only where ``eligible``), and each
    window's position in ``patients``."""
    from twinfed.models.windows import WindowIndex

    index = WindowIndex.build(site)
    h = site.spec.history_steps
    starts, owner = [], []
    for i, p in enumerate(patients):
        if not eligible[i]:
            continue
        own = index.starts[index.ptr[p]: index.ptr[p + 1]]
        own = own[site.steps[own + h - 1] >= origin_from[i]]
        if own.size > max_windows:
            own = own[np.round(np.linspace(0, own.size - 1, max_windows)).astype(np.int64)]
        starts.append(own)
        owner.append(np.full(own.size, i, dtype=np.int64))
    if not starts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(starts), np.concatenate(owner)


def calibration_histogram(twin, site, patients: np.ndarray, config: CalibrationConfig, *,
                          max_windows: int = 64, seed: int = 0) -> tuple[np.ndarray, int]:
    """For the patients given (indices into site): identify each on its first config.identify_hours,
    score up to max_windows windows after that per patient (spread evenly), return the summed
    patient-weighted histogram [S, B] (no noise) and how many patients contributed. Used locally and by
    each node on its held-out patients (the node adds the noise; ``seed``, an int in [0, 2**128),
    is then the release's secret). The sum of :func:`calibration_parts`."""
    parts = calibration_parts(twin, site, patients, config, max_windows=max_windows, seed=seed)
    return parts.sum(axis=0), int(np.count_nonzero(parts.any(axis=(1, 2))))


def calibration_parts(twin, site, patients: np.ndarray, config: CalibrationConfig, *,
                      max_windows: int = 64, seed: int = 0) -> np.ndarray:
    """Each patient's part of :func:`calibration_histogram`: ``[P, S, B]``, mass 1 per state, or
    zeros for a patient with no scored window. A patient's part depends on their record and
    ``seed`` alone (their identification windows are keyed to them, their windows scored are
    chosen from their own record): removing a patient leaves every other part as it was, so
    the histogram moves by that patient's part alone (``privacy.release.histogram_sensitivity``)."""
    spec = site.spec
    patients = np.asarray(patients, dtype=np.int64)
    b = conformal.n_bins(config.edges)
    if patients.size == 0:
        return np.zeros((0, len(spec.states), b))
    first = site.steps[site.offsets[patients]]
    steps = identify_steps(spec, config.identify_hours)
    identified = identify_patients(twin, site, patients, first + steps - 1, seed=seed)
    scales = identification_scales(twin, site, identified)
    starts, owner = scored_windows(site, patients, first + steps, max_windows, identified.n_windows > 0)
    if starts.size == 0:
        return np.zeros((patients.size, len(spec.states), b))
    scores = np.empty((starts.size, spec.horizon_steps, len(spec.states)), np.float64)
    for part in _per_patient(owner):
        rows = owner[part]
        batch = _gather(twin, site, starts[part], patients[rows])
        err = np.abs(_forecast(twin, batch, identified, rows) - batch.future_states)
        scores[part] = err / scales[rows]
    # The histogram sees every window of a patient at once: their mass is spread over all of them.
    return conformal.patient_histograms(scores, owner, len(patients), config.edges)


def interval_bands(forecast: np.ndarray, scales: np.ndarray, cal: IntervalCalibration,
                   spec: TwinSpec, *, structural_sd: np.ndarray | None = None) -> dict:
    """forecast [..., K, S], scales [..., K, S] -> {"80": (lower, upper), "95": (...)} arrays, clipped.
    ``structural_sd`` [..., K, S] (an ensemble twin's spread between its core structures' forecasts):
    added in quadrature, as a normal error at each level (what the calibration's own errors of
    the structures' mean do not say: how far a planned treatment's effect is uncertain)."""
    from statistics import NormalDist

    cal.check_spec(spec)
    lo = np.array([c.min for c in spec.states])
    hi = np.array([c.max for c in spec.states])
    forecast = np.asarray(forecast, dtype=np.float64)
    bands = {}
    for level, key in zip(cal.levels, cal.level_keys()):
        q = np.array([cal.quantile(col, level) for col in spec.state_columns])
        half = q * np.asarray(scales, dtype=np.float64)  # inf: the whole spec range
        if structural_sd is not None:
            z = NormalDist().inv_cdf(0.5 + level / 2)
            half = np.sqrt(half ** 2 + (z * np.asarray(structural_sd, dtype=np.float64)) ** 2)
        bands[key] = (np.clip(forecast - half, lo, hi), np.clip(forecast + half, lo, hi))
    return bands
