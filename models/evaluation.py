"""A trained twin's forecast accuracy on a site's patients (``twinfed evaluate``).

Protocol, the same for every kind of twin so that figures compare: each patient's first
``identify_hours`` of record are the identification period (what personalisation may read), and
every window whose forecast origin comes after it is scored, against persistence and any extra
forecasters on exactly those windows. A hybrid twin is scored personalised (each patient's core
parameters fitted on their identification period only, see ``twinfed.models.personalise``) and,
beside it, as the population twin (the encoder's parameters): ``population_rmse_by_step``.
``identify_hours = 0`` scores every window with the population twin.

With a calibration (``model/calibration.json``, see ``twinfed.models.calibration``), the scored
windows also measure the prediction intervals of the twin they are calibrated for (the
personalised one; a twin that is not a hybrid, its plain forecast): per state and level, the
coverage weighted by patient (each patient's windows weigh 1 in total, as in the calibration)
and per window, overall and by step, and the mean width by step. Patients the identification
had no window for have no interval and are left out of these figures only.
"""

from __future__ import annotations

import time

import numpy as np

IDENTIFY_HOURS = 48.0  # (imported by the CLI for its help: this module's top stays light)


def evaluate(model_dir, spec_arg, data_dir, *, stride: int = 1, personalise: bool = True,
             identify_hours: float = IDENTIFY_HOURS, extra_forecasters: dict | None = None) -> dict:
    """``twinfed evaluate``: load the twin, its calibration if any, the spec and the site, then
    :func:`evaluate_twin`."""
    from twinfed.models.calibration import load_calibration
    from twinfed.models.site_data import load_site
    from twinfed.models.spec import load_spec
    from twinfed.models.twin import Twin

    twin = Twin.load(model_dir)
    spec = load_spec(spec_arg)
    twin.check_spec(spec)
    calibration = load_calibration(model_dir)
    return evaluate_twin(twin, load_site(data_dir, spec), stride=stride, personalise=personalise,
                         identify_hours=identify_hours, extra_forecasters=extra_forecasters,
                         calibration=calibration)


def evaluate_twin(twin, site, *, stride: int = 1, personalise: bool = True,
                  identify_hours: float = IDENTIFY_HOURS, extra_forecasters: dict | None = None,
                  calibration=None) -> dict:
    from twinfed.models.metrics import evaluate_site

    spec = site.spec
    first = site.steps[site.offsets[:-1]]
    identify_steps = int(round(identify_hours * 60 / spec.step_minutes))
    origin_from = first + identify_steps if identify_steps > 0 else None
    forecasters = {"model": twin.forecast} | (extra_forecasters or {})
    info: dict = {"identify_hours": identify_hours, "personalised": False}
    fitted = None
    if twin.hybrid and personalise and identify_steps > 0:
        from twinfed.models.personalise import identify

        t0 = time.perf_counter()
        fitted = identify(twin.surrogate, site, np.arange(site.n_patients), first + identify_steps - 1)
        seconds = time.perf_counter() - t0
        info = {"identify_hours": identify_hours, "personalised": True,
                "patients_fitted": int((fitted.n_windows > 0).sum()),
                "seconds_per_patient": seconds / max(1, site.n_patients)}
        forecasters = {"model": lambda b: twin.forecast(b, offset=fitted.offset[b.patients]),
                       "population": twin.forecast} | (extra_forecasters or {})
    tally, note = None, _no_intervals(twin, calibration, personalise, identify_steps)
    if note is None:
        tally = _IntervalTally(twin, site, calibration, fitted, first + identify_steps - 1)
    report = evaluate_site(site, forecasters, stride=max(1, stride),
                           with_context=twin.inputs.with_context, origin_from=origin_from,
                           observe=None if tally is None else tally.observe)
    if tally is not None and tally.n_windows == 0:
        tally, note = None, ("no scored patient had a window in their identification period to compute "
                             "an error scale from")
    for col, figures in report["states"].items():
        figures |= tally.state(col) if tally is not None else dict.fromkeys(_IntervalTally.KEYS)
    return report | {"personalisation": info, "model": _model_label(twin),
                     "privacy": twin.plan.privacy.label(),
                     "intervals": None if tally is None else tally.label(),
                     "intervals_note": note}


def _no_intervals(twin, calibration, personalise: bool, identify_steps: int) -> str | None:
    """Why this evaluation has no interval figures (None: it has them)."""
    if calibration is None:
        return ("the model has no calibration (model/calibration.json); `twinfed calibrate` makes one "
                "from patients the twin was not trained on")
    calibration.check_twin(twin)
    if identify_steps <= 0:
        return "no identification period (--identify-hours 0): no patient has an error scale"
    if twin.hybrid and not personalise:
        return ("the intervals are calibrated for the personalised twin; drop --no-personalise to "
                "measure them")
    return None


class _IntervalTally:
    """The intervals' coverage and width over the scored windows, for the ``model`` forecast."""

    KEYS = ("coverage", "coverage_windows", "coverage_by_step", "coverage_windows_by_step",
            "interval_width_by_step")

    def __init__(self, twin, site, calibration, fitted, until_steps: np.ndarray):
        from twinfed.models.calibration import identification_scales, identify_patients
        from twinfed.models.conformal import CoverageCounter

        if fitted is None:  # not a hybrid: the same windows, the plain forecast
            fitted = identify_patients(twin, site, np.arange(site.n_patients), until_steps)
        self.spec, self.calibration = site.spec, calibration
        self.scales = identification_scales(twin, site, fitted)  # [P, K, S]
        shape = (self.spec.horizon_steps, len(self.spec.states))
        self.counters = {key: CoverageCounter(site.n_patients, shape) for key in calibration.level_keys()}
        self.width = {key: np.zeros(shape) for key in calibration.level_keys()}
        self.n_windows = 0

    def observe(self, batch, preds: dict) -> None:
        from twinfed.models.calibration import interval_bands

        scales = self.scales[batch.patients]
        ok = np.isfinite(scales).all(axis=(1, 2))
        if not ok.any():
            return
        truth, patients = batch.future_states[ok], batch.patients[ok]
        for key, (lower, upper) in interval_bands(preds["model"][ok], scales[ok], self.calibration,
                                                  self.spec).items():
            self.counters[key].add((truth >= lower) & (truth <= upper), patients)
            self.width[key] += (upper - lower).sum(axis=0)
        self.n_windows += int(ok.sum())

    def state(self, col: str) -> dict:
        j = self.spec.state_columns.index(col)
        out = {k: {} for k in self.KEYS}
        for key, counter in self.counters.items():
            r = counter.result()
            if r["n_windows"] == 0:
                out = dict.fromkeys(self.KEYS)
                break
            out["coverage"][key] = float(r["patients"][j])
            out["coverage_windows"][key] = float(r["windows"][j])
            out["coverage_by_step"][key] = [float(v) for v in r["patients_by_step"][:, j]]
            out["coverage_windows_by_step"][key] = [float(v) for v in r["windows_by_step"][:, j]]
            out["interval_width_by_step"][key] = [float(v) for v in self.width[key][:, j] / self.n_windows]
        return out

    def label(self) -> dict:
        first = next(iter(self.counters.values())).result()
        return self.calibration.label() | {"patients": first["n_patients"], "windows": first["n_windows"]}


def _model_label(twin) -> dict:
    from twinfed.models.hybrid import n_trained_weights

    return {"kind": twin.plan.model.kind, "trained_weights": n_trained_weights(twin.surrogate),
            "pretrained_sha256": twin.plan.model.pretrained_sha256}
