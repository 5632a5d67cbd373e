"""``twinfed evaluate``, ``twinfed whatif`` and ``twinfed calibrate``: using a trained twin."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from twinfed.cli.table import format_table
from twinfed.models.evaluation import IDENTIFY_HOURS


def register(sub) -> None:
    ev = sub.add_parser("evaluate", help="forecast accuracy of a trained twin on a site directory",
                        description="RMSE and MAE per forecast step over every window of every "
                                    "patient in DIR (the model given the true future controls), "
                                    "against persistence (the last observed value).")
    ev.add_argument("--model", type=Path, required=True, help="run directory of a study")
    ev.add_argument("--spec", required=True, help="spec TOML file or built-in twin name")
    ev.add_argument("--data", type=Path, required=True, help="site directory with held-out patients")
    ev.add_argument("--json", action="store_true", help="print JSON for machines")
    ev.add_argument("--stride", type=int, default=1, help="use every n-th window (default 1: all)")
    ev.add_argument("--identify-hours", type=float, default=IDENTIFY_HOURS, metavar="H",
                    help="each patient's first H hours are the identification period: personalisation "
                         f"reads only them, and only later windows are scored (default {IDENTIFY_HOURS:g}; "
                         "0 scores every window with the population twin)")
    ev.add_argument("--no-personalise", action="store_true",
                    help="score the population twin only (no per-patient identification)")
    ev.set_defaults(func=cmd_evaluate)

    wi = sub.add_parser("whatif", help="forecast one patient under several treatment plans",
                        description="Scenarios are NAME=OP[,OP...] over the twin's controls: "
                                    "'recorded', COL*F (scale), COL=V (every step), COL+V@MIN "
                                    "(add at minute MIN of the horizon), COL=V@MIN. Without "
                                    "--scenario: recorded, first control x0.8, x1.2 and skipped.")
    wi.add_argument("--model", type=Path, required=True, help="run directory of a study")
    wi.add_argument("--data", type=Path, required=True, help="site directory holding the patient")
    wi.add_argument("--patient", required=True, help="patient id")
    wi.add_argument("--at", type=float, required=True, help="time_min of the last observed step")
    wi.add_argument("--scenario", action="append", default=[], metavar="NAME=OPS")
    wi.add_argument("--plot", type=Path, help="write a PNG plot of the scenarios")
    wi.add_argument("--json", action="store_true", help="print JSON for machines")
    wi.add_argument("--no-personalise", action="store_true",
                    help="use the population twin's parameters, not the patient's own (identified "
                         "from the record before --at)")
    wi.set_defaults(func=cmd_whatif)

    ca = sub.add_parser("calibrate", help="calibrate a twin's prediction intervals on a site's patients",
                        description="Split conformal calibration of the twin's prediction intervals "
                                    "(80% and 95%, or the plan's levels) on the patients in DIR, all "
                                    "of them: they must be patients the twin was NOT trained on (e.g. "
                                    "a cohort's holdout), or the intervals come out too narrow. Each "
                                    "patient's first hours (the plan's identify_hours, default 48) "
                                    "identify them; later windows are scored. Writes "
                                    "RUN/model/calibration.json (the histogram of normalised errors and "
                                    "its quantiles; no differential privacy: made from this site alone), "
                                    "which evaluate and whatif then use.")
    ca.add_argument("--model", type=Path, required=True, metavar="RUN", help="run directory of a study")
    ca.add_argument("--data", type=Path, required=True, metavar="DIR",
                    help="site directory of patients the twin was not trained on")
    ca.add_argument("--force", action="store_true", help="replace an existing calibration")
    ca.add_argument("--json", action="store_true", help="print JSON for machines")
    ca.set_defaults(func=cmd_calibrate)


def _warn_if_not_private(label: dict) -> None:
    if label.get("warning"):
        print(f"WARNING: {label['warning']}", file=sys.stderr)


def cmd_evaluate(args) -> int:
    from twinfed.models.evaluation import evaluate

    report = evaluate(args.model, args.spec, args.data, stride=args.stride,
                      personalise=not args.no_personalise, identify_hours=args.identify_hours)
    _warn_if_not_private(report["privacy"])
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{report['n_patients']} patients, {report['n_windows']} windows, "
          f"horizon {report['horizon_minutes']} min")
    for col, m in report["states"].items():
        k = len(m["rmse_by_step"])
        step = report["horizon_minutes"] // k
        rows = [[f"+{(i + 1) * step} min", m["rmse_by_step"][i], m["persistence_rmse_by_step"][i],
                 m["mae_by_step"][i]] for i in range(k)]
        print(f"\n{col}")
        print(format_table(["horizon", "RMSE twin", "RMSE persistence", "MAE twin"], rows))
        if m.get("coverage"):
            print("interval coverage: " + ", ".join(
                f"{key}% -> {m['coverage'][key]:.1%} of patients' steps ({m['coverage_windows'][key]:.1%} "
                "of windows)" for key in m["coverage"]))
    if report.get("intervals_note"):
        print(f"\nno prediction intervals: {report['intervals_note']}")
    return 0


def cmd_whatif(args) -> int:
    from twinfed.models.calibration import load_calibration
    from twinfed.models.site_data import load_site
    from twinfed.models.twin import Twin
    from twinfed.models.whatif import default_scenarios, parse_scenario, run_whatif

    twin = Twin.load(args.model)
    spec = twin.spec
    _warn_if_not_private(twin.plan.privacy.label())
    scenarios = [parse_scenario(s, spec) for s in args.scenario] or default_scenarios(spec)
    site = load_site(args.data, spec)
    res = run_whatif(twin, site, args.patient, args.at, scenarios, personalise=not args.no_personalise,
                     calibration=load_calibration(args.model))
    if args.plot:
        from twinfed.cli.plots import plot_whatif

        plot_whatif(res, spec, args.plot)
    if args.json:
        print(json.dumps(whatif_json(res, twin, spec)))
        return 0
    if res.clinical is not None:
        how = ("identified from this patient's record before --at "
               f"({res.identification_windows} windows)" if res.parameters_from == "personalised"
               else "the population twin's (no full window of record before --at to identify from)")
        print(f"the patient's twin, {how}:")
        print(format_table(["parameter", "value"], [[k, v] for k, v in res.clinical.items()]))
        if res.posterior is not None:
            key = res.posterior["identifiability"]
            print(f"posterior relative SD of {key['parameter']}: {key['relative_sd']:g} "
                  f"({'identified' if key['identifiable'] else 'NOT identified'} by the record: "
                  f"threshold {key['threshold_relative_sd']:g})")
        print()
    if not res.recorded_future_known:
        print("note: the record ends here; 'recorded' means no further treatment")
    names = list(res.forecasts)
    for j, col in enumerate(spec.state_columns):
        unit = spec.states[j].unit
        headers = ["minute", *names] + (["observed"] if res.observed is not None else [])
        rows = []
        for i, m in enumerate(res.minutes):
            row = [f"+{m}", *(float(res.forecasts[n][i, j]) for n in names)]
            if res.observed is not None:
                row.append(float(res.observed[i, j]))
            rows.append(row)
        print(f"{col} ({unit}), forecast from time_min {args.at:g}")
        print(format_table(headers, rows))
    _print_last_intervals(res, spec)
    totals = [[c, *(float(res.controls[n][:, j].sum()) for n in names)]
              for j, c in enumerate(spec.control_columns)]
    if totals:
        print("\ntreatment over the horizon (total)")
        print(format_table(["control", *names], totals))
    if args.plot:
        print(f"\nplot: {args.plot}")
    return 0


def whatif_json(res, twin, spec) -> dict:
    """``twinfed whatif --json``: the forecasts, their intervals and the patient's parameters
    (with their posterior spread when personalised)."""
    return {
        "minutes": res.minutes,
        "recorded_future_known": res.recorded_future_known,
        "scenarios": {name: {"controls": {c: fc[:, j].tolist() for j, c in enumerate(spec.control_columns)},
                             "states": {c: res.forecasts[name][:, j].tolist()
                                        for j, c in enumerate(spec.state_columns)},
                             "intervals": _bands_json(res, name, spec),
                             "structures": _structures_json(res, name, spec)}
                      for name, fc in res.controls.items()},
        "intervals": res.intervals,
        "intervals_note": res.intervals_note,
        "privacy": twin.plan.privacy.label(),
        "observed": None if res.observed is None else
        {c: res.observed[:, j].tolist() for j, c in enumerate(spec.state_columns)},
        "model": {"kind": twin.plan.model.kind, "pretrained_sha256": twin.plan.model.pretrained_sha256},
        "parameters": None if res.clinical is None else {
            "from": res.parameters_from, "identification_windows": res.identification_windows,
            "clinical": res.clinical, "posterior": res.posterior},
    }


def _structures_json(res, name: str, spec) -> dict | None:
    """An ensemble twin's forecast by core structure: {STRUCTURE: {STATE: [...]}} (the scenario's
    ``states`` are their mean), None for a twin of one structure."""
    if res.structure_forecasts is None:
        return None
    fc = res.structure_forecasts[name]
    return {s: {c: fc[m, :, j].tolist() for j, c in enumerate(spec.state_columns)}
            for m, s in enumerate(res.structures)}


def _bands_json(res, name: str, spec) -> dict | None:
    """One scenario's intervals: {STATE: {"80": {"lower": [...], "upper": [...]}, ...}}."""
    if res.bands is None:
        return None
    return {col: {key: {"lower": lo[:, j].tolist(), "upper": hi[:, j].tolist()}
                  for key, (lo, hi) in res.bands[name].items()}
            for j, col in enumerate(spec.state_columns)}


def _print_last_intervals(res, spec) -> None:
    """The widest interval of each scenario at the horizon's last step, one line per state."""
    if res.bands is None:
        print(f"no prediction intervals: {res.intervals_note}")
        return
    key = list(next(iter(res.bands.values())))[-1]  # the highest level
    for j, col in enumerate(spec.state_columns):
        spans = ", ".join(f"{name} {lo[-1, j]:.4g}-{hi[-1, j]:.4g}"
                          for name, (lo, hi) in ((n, b[key]) for n, b in res.bands.items()))
        print(f"{key}% interval at +{res.minutes[-1]} min, {col} ({spec.states[j].unit}): {spans}")


def cmd_calibrate(args) -> int:
    import numpy as np

    from twinfed.errors import ModelError
    from twinfed.models.calibration import (IntervalCalibration, calibration_histogram, calibration_path,
                                            save_calibration, twin_weights_sha256)
    from twinfed.models.plan import CalibrationConfig
    from twinfed.models.site_data import load_site
    from twinfed.models.twin import Twin

    from twinfed.models.calibration import load_calibration

    twin = Twin.load(args.model)
    path = calibration_path(args.model)
    if path.exists() and not args.force:
        raise ModelError(f"{path} already exists; pass --force to replace it")
    if path.exists() and (path.parent.parent / "coordinator").is_dir() \
            and load_calibration(args.model).source.startswith("federated"):
        # The study's own calibration: its coordinator recorded the file's hash at study_finished,
        # so replacing it in the run would make the run fail `twinfed audit verify`.
        raise ModelError(f"{path} is the study's federated calibration, recorded in its audit log; "
                         "copy the model directory and calibrate the copy")
    spec = twin.spec
    site = load_site(args.data, spec)
    config = twin.plan.calibration or CalibrationConfig()
    histogram, n = calibration_histogram(twin, site, np.arange(site.n_patients), config)
    if n == 0:
        raise ModelError(f"{args.data}: no patient has {config.identify_hours:g} h of record to identify "
                         "them from and a full window after it; calibrate on longer records")
    cal = IntervalCalibration.from_histogram(histogram, spec, config, differential_privacy=False,
                                             noise_multiplier=None, sites=1,
                                             source=f"local: {args.data.name}'s patients, no DP",
                                             weights_sha256=twin_weights_sha256(twin))
    path = save_calibration(args.model, cal)
    if args.json:
        print(json.dumps({"path": str(path), "patients": n, "intervals": cal.label(),
                          "states": {col: st.model_dump() for col, st in cal.states.items()}}))
        return 0
    print(f"calibrated on {n} patients of {args.data} (local, no differential privacy): {path}")
    keys = cal.level_keys()
    print(format_table(["state", *(f"{k}% quantile (x scale)" for k in keys)],
                       [[col, *(st.quantiles[k] if st.quantiles[k] is not None else "inf" for k in keys)]
                        for col, st in cal.states.items()]))
    for col, st in cal.states.items():
        for key, note in st.notes.items():
            print(f"note: {col} {key}%: {note}")
    return 0
