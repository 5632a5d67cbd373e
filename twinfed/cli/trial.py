"""``twinfed trial``: an in-silico trial on patients' twins, on one machine or across hospitals."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from twinfed.cli.table import format_table
from twinfed.errors import TrialError

DESCRIPTION = """\
Run every arm of an arms file (TOML, see examples/trials/) on every consented patient's twin,
rolled forward over the trial's duration from each patient's start, and compare the outcomes with
the reference arm, paired by patient, with 95% intervals.

  one machine:      --data DIR [--data DIR ...]  (the sites' exports are here: no data leaves)
  across hospitals: --site NAME=DIR [...]        (a federated trial: each node runs the arms on
                    its own patients and releases only DP aggregates, charged to its ledger, under
                    an officer-approved trial plan; --engine simulation (default) or deployment)
  the plan only:    --site ... --write-plan FILE (for the officers: twinfed plan approve --plan FILE)
"""


def register(sub) -> None:
    from twinfed.models.trial_plan import TrialPrivacy
    from twinfed.models.plan import SecAggConfig

    p = sub.add_parser("trial", help="run an in-silico trial on patients' twins (one machine or federated)",
                       description=DESCRIPTION, formatter_class=_raw())
    p.add_argument("--model", type=Path, required=True, help="run directory of the twin's study")
    p.add_argument("--arms", type=Path, required=True, help="the arms file (TOML)")
    p.add_argument("--data", type=Path, action="append", default=[], metavar="DIR",
                   help="a site directory on this machine; repeat for several")
    p.add_argument("--site", action="append", default=[], metavar="NAME=DIR",
                   help="a hospital node's site directory for a federated trial; repeat per site")
    p.add_argument("--out", type=Path, help="results directory (default RUN/trials/<trial name>); never "
                                            "overwritten")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--plot", type=Path, help="the plot's path (default OUT/trial.png)")
    dp = TrialPrivacy()
    p.add_argument("--epsilon", type=float, default=dp.epsilon,
                   help=f"federated: what the trial may cost each site (default {dp.epsilon:g})")
    p.add_argument("--delta", type=float, default=dp.delta, help=f"federated: DP delta (default {dp.delta:g})")
    p.add_argument("--no-dp", action="store_true",
                   help="federated, BASELINES ONLY: exact aggregates leave the simulated sites (labelled)")
    p.add_argument("--no-secagg", action="store_true",
                   help="federated, BENCHMARKS ONLY: aggregates sent without secure aggregation")
    p.add_argument("--secagg-min-sites", type=int, default=SecAggConfig().min_sites, metavar="N",
                   help="federated: never unmask a sum of fewer than N sites")
    p.add_argument("--engine", choices=["simulation", "deployment"], default="simulation",
                   help="federated: Flower's simulation engine, or real SuperLink and SuperNode processes "
                        "with TLS on this machine")
    p.add_argument("--state", type=Path,
                   help="federated: the nodes' states live in STATE/<site> (e.g. the study's RUN/nodes, "
                        "with their ledgers); default OUT/nodes")
    p.add_argument("--approved-only", action="store_true",
                   help="federated: use the node states as their officers left them (the trial plan "
                        "approved with twinfed plan approve); by default the operator approves it")
    p.add_argument("--write-plan", type=Path, metavar="FILE",
                   help="federated: write the trial plan for the officers to approve, and stop")
    p.set_defaults(func=cmd_trial)


def _raw():
    import argparse

    return argparse.RawDescriptionHelpFormatter


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_trial(args) -> int:
    from twinfed.models.arms import load_design
    from twinfed.models.calibration import load_calibration
    from twinfed.models.twin import Twin

    if bool(args.data) == bool(args.site):
        raise TrialError("give the patients either with --data DIR (one machine) or with --site NAME=DIR "
                         "(a federated trial), not both and not neither")
    twin = Twin.load(args.model)
    design = load_design(args.arms, twin.spec)
    calibration = load_calibration(args.model)
    if calibration is not None:
        calibration.check_twin(twin)
    if args.site:
        return _federated(args, twin, design, calibration)
    out = _out_dir(args, design)
    report, values = _local(args, twin, design, calibration)
    return _show(args, report, out, values)


def _out_dir(args, design) -> Path:
    from twinfed.server.trial import check_new_trial

    out = args.out or (Path(args.model) / "trials" / design.name)
    check_new_trial(out)
    return out


def _local(args, twin, design, calibration) -> tuple[dict, object]:
    import numpy as np

    from twinfed.governance.consent import granted, site_consent
    from twinfed.models.site_data import load_site
    from twinfed.models.trial import contributions, run_site_trial, summarise, twin_structures

    _one_thread()
    parts, by_structure, excluded, not_consented, unidentified = [], [], 0, 0, None
    for d in args.data:
        site = load_site(d, twin.spec)
        consented = site.subset(granted(site_consent(d), design.purpose), reuse=True)
        not_consented += site.n_patients - consented.n_patients
        if consented.n_patients == 0:
            _progress(f"{d}: no patient consented for {design.purpose!r}")
            continue
        _progress(f"{d}: {consented.n_patients} patients consented for {design.purpose!r}; rolling "
                  f"{len(design.arms)} arms forward over {design.duration_days:g} days")
        outcomes = run_site_trial(twin, consented, design, calibration=calibration)
        parts.append(outcomes.values)
        by_structure.append(outcomes.structure_values)
        excluded += outcomes.n_excluded
        if outcomes.n_not_identifiable is not None:
            unidentified = (unidentified or 0) + outcomes.n_not_identifiable
    values = np.concatenate(parts) if parts else np.zeros((0, len(design.arms), len(design.outcomes)))
    if values.shape[0] < 2:
        raise TrialError(f"fewer than 2 patients could take part ({values.shape[0]}): they need consent for "
                         f"{design.purpose!r}, {twin.spec.history_steps} steps of record before hour "
                         f"{design.start_hours:g} and a day of record after it")
    structures = twin_structures(twin)
    structure_values = np.concatenate(by_structure) if structures else None
    report = summarise(contributions(values, design, structure_values).sum(axis=0), design, twin.spec,
                       structures=structures)
    report |= {"privacy": {"differential_privacy": False,
                           "note": "one machine: the sites' data never left it; results are exact "
                                   "aggregates over its patients"},
               "patients_excluded": excluded, "patients_not_consented": not_consented,
               "patients_not_identifiable": _not_identifiable(twin, unidentified),
               "uncertainty": _uncertainty(design, calibration), "engine": "local",
               "design": {"start_hours": design.start_hours, "duration_days": design.duration_days,
                          "draws": design.draws if calibration is not None else 1,
                          "purpose": design.purpose},
               "model": _model_label(twin)}
    return report, values


def _not_identifiable(twin, count: int | None) -> dict | None:
    """How many taking part have a record that leaves the core's key parameter unidentified
    (a hybrid twin only; a local trial's figure, never a federated release's)."""
    if count is None or not twin.hybrid:
        return None
    from twinfed.models.personalise import IDENTIFIABLE_REL_SD, key_parameter

    return {"count": count, "parameter": key_parameter(twin.surrogate.binding),
            "threshold_relative_sd": IDENTIFIABLE_REL_SD}


def _federated(args, twin, design, calibration) -> int:
    from twinfed.cli.study import parse_sites
    from twinfed.models.digest import weights_sha256
    from twinfed.models.plan import SecAggConfig
    from twinfed.models.surrogate import get_weights
    from twinfed.models.trial_plan import TrialPlan, TrialPrivacy, TrialTwin
    from pydantic import ValidationError

    weights = get_weights(twin.surrogate)
    try:
        plan = TrialPlan(design=design, twin=TrialTwin(training_plan_json=twin.plan.canonical_json(),
                                                        weights_sha256=weights_sha256(weights),
                                                        calibration=calibration),
                         privacy=TrialPrivacy(enabled=not args.no_dp, epsilon=args.epsilon, delta=args.delta,
                                              secure_aggregation=not args.no_secagg,
                                              secagg=SecAggConfig(min_sites=args.secagg_min_sites)))
    except ValidationError as exc:
        err = exc.errors()[0]
        raise TrialError(f"trial settings: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    if args.write_plan:
        from twinfed.models.twin import write_text_atomic

        write_text_atomic(args.write_plan, json.dumps(json.loads(plan.canonical_json()), indent=2) + "\n")
        print(f"wrote trial plan {plan.sha256()} to {args.write_plan}; each site's officer approves it with "
              f"'twinfed plan approve --state STATE --plan {args.write_plan}'")
        return 0
    out = _out_dir(args, design)
    sites = parse_sites(args.site)
    approve = None if args.approved_only else "operator:twinfed-trial"
    if args.engine == "simulation":
        from twinfed.simulate import run_simulated_trial

        report = run_simulated_trial(plan, weights, sites, out, progress=_progress, state_root=args.state,
                                     approve_as=approve)
    else:
        from twinfed.deploy.launcher import run_deployed_trial, site_map

        report = run_deployed_trial(site_map(sites), out, plan, Path(args.model), state_root=args.state,
                                    approve_as=approve, progress=_progress)
    # trial.json as the coordinator wrote it (its hash is in the audit log), the model included:
    # what --json prints is that document
    from twinfed.server.trial import RESULTS_FILE

    report = json.loads((out / RESULTS_FILE).read_text())
    if not report.get("arms"):
        raise TrialError(report.get("note", "the trial gave no result"))
    return _show(args, report, out, None, written=True)


def _show(args, report: dict, out: Path, values, *, written: bool = False) -> int:
    from twinfed.cli.plots import plot_trial
    from twinfed.models.twin import write_text_atomic
    from twinfed.server.trial import RESULTS_FILE

    from twinfed.outputs import TrialReport

    out.mkdir(parents=True, exist_ok=True)
    report = TrialReport.model_validate(report).document()  # the typed document: trial.json, --json
    if not written:
        write_text_atomic(out / RESULTS_FILE, json.dumps(report, indent=2) + "\n")
    plot = args.plot or out / "trial.png"
    plot_trial(report, plot, values)
    warning = (report.get("privacy") or {}).get("warning")
    if warning:
        print(f"WARNING: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"in-silico trial {report['trial']}: {report['n_patients']} patients' twins, "
          f"reference arm {report['reference']}")
    for name, unit in report["units"].items():
        rows = [[arm, r["outcomes"][name]["mean"], _ci(r["outcomes"][name]["ci95"])]
                for arm, r in report["arms"].items()]
        rows += [[f"{arm} - {report['reference']}", c[name]["mean"], _ci(c[name]["ci95"])]
                 for arm, c in report["contrasts"].items()]
        print(f"\n{name} ({unit})")
        print(format_table(["arm", "mean", "95% interval"], rows))
    print(f"\n{report['interval']}; uncertainty: {report['uncertainty']}")
    from twinfed.outputs import SiteSpend

    for name, site in (report.get("sites") or {}).items():  # a federated trial: each site's ledger total
        if site.get("spend"):
            print(f"{name}: {SiteSpend.model_validate(site['spend']).label()}")
    print(f"results: {out / RESULTS_FILE}; plot: {plot}")
    return 0


def _ci(ci) -> str:
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def _uncertainty(design, calibration) -> str:
    if calibration is None:
        return ("none propagated: the twin has no calibrated intervals (twinfed calibrate), so each patient's "
                "arm is the twin's expected path; the intervals reflect the patients' spread only")
    return (f"each patient's forecast errors drawn from the twin's calibration ({calibration.source}), "
            f"{design.draws} draws per patient, the same draws in every arm")


def _model_label(twin) -> dict:
    return {"kind": twin.plan.model.kind, "training_plan_sha256": twin.plan.sha256(),
            "privacy": twin.plan.privacy.label()}


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)  # identification runs many small operations: one thread is faster
