"""``twinfed evaluate`` and ``twinfed whatif``: using a trained twin."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from twinfed.cli.table import format_table


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
    wi.set_defaults(func=cmd_whatif)


def evaluate(model_dir: Path, spec_arg: str, data_dir: Path, *, stride: int = 1,
             extra_forecasters: dict | None = None) -> dict:
    from twinfed.models.metrics import evaluate_site
    from twinfed.models.site_data import load_site
    from twinfed.models.spec import load_spec
    from twinfed.models.twin import Twin

    twin = Twin.load(model_dir)
    spec = load_spec(spec_arg)
    twin.check_spec(spec)
    site = load_site(data_dir, spec)
    fns = {"model": lambda b: twin.forecast(b.history, b.future_controls, b.covariates)}
    fns |= extra_forecasters or {}
    return evaluate_site(site, fns, stride=max(1, stride)) | {"privacy": twin.plan.privacy.label()}


def _warn_if_not_private(label: dict) -> None:
    if label.get("warning"):
        print(f"WARNING: {label['warning']}", file=sys.stderr)


def cmd_evaluate(args) -> int:
    report = evaluate(args.model, args.spec, args.data, stride=args.stride)
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
    return 0


def cmd_whatif(args) -> int:
    from twinfed.models.site_data import load_site
    from twinfed.models.twin import Twin
    from twinfed.models.whatif import default_scenarios, parse_scenario, run_whatif

    twin = Twin.load(args.model)
    spec = twin.spec
    _warn_if_not_private(twin.plan.privacy.label())
    scenarios = [parse_scenario(s, spec) for s in args.scenario] or default_scenarios(spec)
    site = load_site(args.data, spec)
    res = run_whatif(twin, site, args.patient, args.at, scenarios)
    if args.plot:
        from twinfed.cli.plots import plot_whatif

        plot_whatif(res, spec, args.plot)
    if args.json:
        print(json.dumps({
            "minutes": res.minutes,
            "recorded_future_known": res.recorded_future_known,
            "scenarios": {name: {"controls": {c: fc[:, j].tolist() for j, c in enumerate(spec.control_columns)},
                                 "states": {c: res.forecasts[name][:, j].tolist()
                                            for j, c in enumerate(spec.state_columns)}}
                          for name, fc in res.controls.items()},
            "privacy": twin.plan.privacy.label(),
            "observed": None if res.observed is None else
            {c: res.observed[:, j].tolist() for j, c in enumerate(spec.state_columns)},
        }))
        return 0
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
    totals = [[c, *(float(res.controls[n][:, j].sum()) for n in names)]
              for j, c in enumerate(spec.control_columns)]
    if totals:
        print("\ntreatment over the horizon (total)")
        print(format_table(["control", *names], totals))
    if args.plot:
        print(f"\nplot: {args.plot}")
    return 0
