"""What-if: one patient's forecast under several treatment plans, side by side.

A scenario is ``NAME=OP[,OP...]`` over the spec's controls, applied to the recorded future:
``recorded`` (no change), ``COL*F`` (scale every future amount), ``COL=V`` (every step V),
``COL+V@M`` (add V at minute M of the horizon), ``COL=V@M`` (set the amount at minute M).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from twinfed.errors import ScenarioError
from twinfed.models.site_data import SiteData
from twinfed.models.spec import TwinSpec
from twinfed.models.windows import Batch, context_at

if TYPE_CHECKING:  # annotations only: parsing and applying scenarios (trial arms) needs no torch
    from twinfed.models.twin import Twin

_OP = re.compile(r"^(?P<col>[A-Za-z_][A-Za-z0-9_]*)\s*(?P<op>[*=+])\s*(?P<val>[-+0-9.eE]+)"
                 r"(?:\s*@\s*(?P<at>[0-9]+))?$")


@dataclass(frozen=True)
class Op:
    column: str
    op: str
    value: float
    minute: int | None = None


@dataclass(frozen=True)
class Scenario:
    name: str
    ops: tuple[Op, ...] = field(default_factory=tuple)

    def apply(self, spec: TwinSpec, future_controls: np.ndarray, *, check_range: bool = True) -> np.ndarray:
        """``future_controls`` ``[T, C]`` (or ``[..., T, C]``) changed by the scenario's operations;
        ``@MIN`` counts minutes from the first of the ``T`` steps. ``check_range=False``: a
        result outside the spec's control ranges is returned, for the caller to judge."""
        out = future_controls.copy()
        cols = spec.control_columns
        for op in self.ops:
            j = cols.index(op.column)
            if op.minute is None:
                rows = slice(None)
            else:
                span = out.shape[-2] * spec.step_minutes  # the horizon in a what-if, a trial's duration
                if op.minute % spec.step_minutes or not 0 <= op.minute < span:
                    raise ScenarioError(f"scenario {self.name}: minute {op.minute} must be a multiple of "
                                        f"{spec.step_minutes} below {span} min (the span it applies to)")
                rows = slice(op.minute // spec.step_minutes, op.minute // spec.step_minutes + 1)
            if op.op == "*":
                out[..., rows, j] *= op.value
            elif op.op == "=":
                out[..., rows, j] = op.value
            else:
                out[..., rows, j] += op.value
            c = spec.controls[j]
            if check_range and ((out[..., j] < c.min).any() or (out[..., j] > c.max).any()):
                raise ScenarioError(f"scenario {self.name}: {op.column} leaves the spec's range "
                                    f"[{c.min:g}, {c.max:g}] {c.unit}; choose a smaller change")
        return out


def parse_scenario(text: str, spec: TwinSpec) -> Scenario:
    if "=" not in text:
        raise ScenarioError(f"scenario {text!r}: write NAME=OP[,OP...], e.g. low={spec.control_columns[0] if spec.controls else 'COL'}*0.8")
    name, _, body = text.partition("=")
    name = name.strip()
    if not name:
        raise ScenarioError(f"scenario {text!r}: the name before '=' is empty")
    ops = []
    for part in (p.strip() for p in body.split(",")):
        if part in ("", "recorded"):
            continue
        m = _OP.match(part)
        if not m:
            raise ScenarioError(f"scenario {name}: cannot read {part!r}; use COL*F, COL=V, COL+V@MIN "
                                "or COL=V@MIN")
        if m["col"] not in spec.control_columns:
            raise ScenarioError(f"scenario {name}: {m['col']!r} is not a control of the twin "
                                f"(controls: {', '.join(spec.control_columns)})")
        if m["op"] == "+" and m["at"] is None:
            raise ScenarioError(f"scenario {name}: '+' needs a minute, e.g. {m['col']}+{m['val']}@0")
        try:
            value = float(m["val"])
        except ValueError:
            raise ScenarioError(f"scenario {name}: {m['val']!r} is not a number") from None
        ops.append(Op(m["col"], m["op"], value, int(m["at"]) if m["at"] else None))
    return Scenario(name, tuple(ops))


def default_scenarios(spec: TwinSpec) -> list[Scenario]:
    """Recorded, the first control scaled by 0.8 and 1.2, and skipped."""
    if not spec.controls:
        return [Scenario("recorded")]
    c = spec.control_columns[0]
    return [Scenario("recorded"), Scenario(f"{c}x0.8", (Op(c, "*", 0.8),)),
            Scenario(f"{c}x1.2", (Op(c, "*", 1.2),)), Scenario(f"skip-{c}", (Op(c, "*", 0.0),))]


@dataclass
class WhatIf:
    minutes: list[int]  # minutes after --at
    history_minutes: list[int]
    history: np.ndarray  # [H, S]
    observed: np.ndarray | None  # [K, S] if the record continues
    forecasts: dict[str, np.ndarray]  # scenario -> [K, S]
    controls: dict[str, np.ndarray]  # scenario -> [K, C]
    recorded_future_known: bool
    # Hybrid twins: the patient's core parameters in clinical terms at --at, and how they were
    # obtained ("personalised" from the record before --at, or the "population" encoder's).
    clinical: dict[str, float] | None = None
    parameters_from: str | None = None
    identification_windows: int = 0
    # Prediction intervals (twinfed.models.calibration), when the model has a calibration and the
    # patient an error scale: the scale [K, S], each scenario's bands by level key ("80", "95":
    # (lower, upper), each [K, S]) and the calibration's label; otherwise why not.
    scales: np.ndarray | None = None
    bands: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] | None = None
    intervals: dict | None = None
    intervals_note: str | None = None
    # A personalised hybrid: the Laplace posterior's spread of each core parameter at --at
    # (twinfed.models.personalise.parameter_spread) and the identifiability flag of the key one.
    posterior: dict | None = None
    # An ensemble twin: each core structure's forecast per scenario (``[M, K, S]``; ``forecasts``
    # holds their mean) and the structures' names; the intervals include their spread.
    structure_forecasts: dict[str, np.ndarray] | None = None
    structures: tuple[str, ...] = ()


def origin_batch(site: SiteData, p: int, end: int, history: np.ndarray) -> Batch:
    """One window at patient ``p``'s row ``end`` (relative to the patient's first row), with its
    context and no planned controls yet (``Batch.with_future_controls`` sets them)."""
    spec = site.spec
    k, s, c = spec.horizon_steps, len(spec.states), len(spec.controls)
    ends, patients = np.array([int(site.offsets[p]) + end]), np.array([p])
    context, mask = context_at(site, ends, patients)
    return Batch(history=history[None], future_controls=np.zeros((1, k, c), np.float32),
                 future_states=np.zeros((1, k, s), np.float32), covariates=site.covariates[p: p + 1],
                 context=context, context_mask=mask)


def run_whatif(twin: Twin, site: SiteData, patient_id: str, at_min: float,
               scenarios: list[Scenario], *, personalise: bool = True, calibration=None) -> WhatIf:
    """Forecast the patient from ``at_min`` under each scenario. A hybrid twin identifies the
    patient's core parameters from their record up to ``at_min`` (never after it) unless
    ``personalise`` is off. With a ``calibration`` (``IntervalCalibration``) each scenario gets
    prediction intervals around its forecast, from the patient's error scale on the
    identification's windows (a personalised patient only)."""
    spec = twin.spec
    if calibration is not None:
        calibration.check_twin(twin)
    if patient_id not in site.patient_ids:
        raise ScenarioError("no such patient in the site data; check --patient")
    p = site.patient_ids.index(patient_id)
    sl = site.patient_slice(p)
    steps = site.steps[sl]
    if at_min % spec.step_minutes:
        raise ScenarioError(f"--at {at_min:g} is not a multiple of the step ({spec.step_minutes} min)")
    at = int(round(at_min / spec.step_minutes))
    pos = np.flatnonzero(steps == at)
    if pos.size == 0:
        raise ScenarioError(f"the patient has no row at time_min {at_min:g}; choose a recorded time")
    end = int(pos[0])
    h, k, s = spec.history_steps, spec.horizon_steps, len(spec.states)
    if end + 1 < h or steps[end] - steps[end + 1 - h] != h - 1:
        raise ScenarioError(f"fewer than {h} contiguous steps ({h * spec.step_minutes} min) of history "
                            f"end at time_min {at_min:g}; choose a later time")
    series = site.series[sl]
    history = series[end + 1 - h: end + 1]
    future_known = end + k < len(steps) and steps[end + k] - steps[end] == k
    recorded = series[end + 1: end + 1 + k, s:] if future_known else np.zeros((k, len(spec.controls)), np.float32)
    observed = series[end + 1: end + 1 + k, :s] if future_known else None
    origin = origin_batch(site, p, end, history)
    offset, clinical, source, n_fit, fitted, posterior = None, None, None, 0, None, None
    if twin.hybrid:
        offset, source, n_fit, fitted = _identification(twin, site, p, at, personalise)
        clinical = _clinical(twin, origin, offset)
        if fitted is not None and fitted.posterior_cov is not None:
            posterior = _posterior(twin, origin, fitted)
    forecasts, controls, by_structure = {}, {}, {}
    for sc in scenarios:
        fc = sc.apply(spec, recorded.astype(np.float32))
        controls[sc.name] = fc
        batch = origin.with_future_controls(fc[None])
        forecasts[sc.name] = twin.forecast(batch, offset=offset)[0]
        members = twin.structure_forecasts(batch, offset=offset)
        if members is not None:
            by_structure[sc.name] = members[0]
    scales, note = _scales(twin, site, p, at, fitted, calibration)
    bands = None
    if scales is not None:
        from twinfed.models.calibration import interval_bands

        bands = {name: interval_bands(fc, scales, calibration, spec,
                                      structural_sd=by_structure[name].std(axis=0, ddof=1)
                                      if name in by_structure else None)
                 for name, fc in forecasts.items()}
    return WhatIf(
        minutes=[(i + 1) * spec.step_minutes for i in range(k)],
        history_minutes=[(i - h + 1) * spec.step_minutes for i in range(h)],
        history=history[:, :s], observed=observed, forecasts=forecasts, controls=controls,
        recorded_future_known=bool(future_known), clinical=clinical, parameters_from=source,
        identification_windows=n_fit, scales=scales, bands=bands,
        intervals=None if bands is None else calibration.label(), intervals_note=note,
        posterior=posterior, structure_forecasts=by_structure or None,
        structures=tuple(twin.surrogate.binding.names) if by_structure else (),
    )


def _scales(twin: Twin, site: SiteData, p: int, at_step: int, fitted, calibration):
    """The patient's error scale ``[K, S]`` for the intervals, or None and why there is none."""
    if calibration is None:
        return None, ("the model has no calibration (model/calibration.json); `twinfed calibrate` "
                      "makes one from patients the twin was not trained on")
    from twinfed.models.calibration import identification_scales, identify_patients

    if twin.hybrid and fitted is None:
        return None, ("the patient was not personalised (no full window of record before --at, or "
                      "--no-personalise): the intervals are calibrated for the personalised twin")
    if fitted is None:  # not a hybrid: the same windows, the plain forecast
        fitted = identify_patients(twin, site, np.array([p]), np.array([at_step]))
        if fitted.n_windows[0] == 0:
            return None, "no full window of record before --at to compute the patient's error scale from"
    return identification_scales(twin, site, fitted)[0], None


def _identification(twin: Twin, site: SiteData, p: int, at_step: int, personalise: bool):
    """The patient's identification for this what-if (from the record up to ``at_step``), or
    none when there is no full window before it or personalisation is off."""
    if personalise:
        from twinfed.models.personalise import identify

        fitted = identify(twin.surrogate, site, np.array([p]), np.array([at_step]), posterior=True)
        if fitted.n_windows[0] > 0:
            return fitted.offset, "personalised", int(fitted.n_windows[0]), fitted
    return None, "population", 0, None


def _clinical(twin: Twin, origin: Batch, offset) -> dict[str, float]:
    import torch

    model = twin.surrogate
    with torch.no_grad():
        u = model.unpack(torch.from_numpy(twin.inputs.batch_features(origin)))
        z = model.parameters_of(u)
        terms = model.binding.clinical(z if offset is None else z + offset, u)
    return {name: round(float(v[0]), 4) for name, v in terms.items()}


def _posterior(twin: Twin, origin: Batch, fitted) -> dict:
    """Each core parameter's posterior value, SD and relative SD at the origin, and whether the
    record identifies the key parameter (relative SD below the threshold)."""
    import torch

    from twinfed.models.personalise import IDENTIFIABLE_REL_SD, key_parameter, parameter_spread

    model = twin.surrogate
    with torch.no_grad():
        u = model.unpack(torch.from_numpy(twin.inputs.batch_features(origin)))
        z = model.parameters_of(u)
    spreads = {p.name: parameter_spread(model, None, fitted, p.name, reference=(u, z))
               for p in model.binding.params}
    key = spreads[key_parameter(model.binding)]
    return {"method": "laplace",
            "parameters": {name: {"value": round(float(s.value[0]), 6), "sd": round(float(s.sd[0]), 6),
                                  "relative_sd": round(float(s.relative_sd[0]), 4)}
                           for name, s in spreads.items()},
            "identifiability": {"parameter": key.name, "relative_sd": round(float(key.relative_sd[0]), 4),
                                "identifiable": bool(key.identifiable[0]),
                                "threshold_relative_sd": IDENTIFIABLE_REL_SD}}
