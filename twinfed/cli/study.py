"""``twinfed simulate`` (a whole study on Flower's simulation engine) and ``twinfed demo``."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from twinfed.cli.table import format_table
from twinfed.errors import TwinfedError
from twinfed.models.plan import (CalibrationConfig, ModelConfig, PrivacyConfig, SecAggConfig,
                                 TrainingConfig)


NO_UPDATE = ("no round updated the model: every round was refused by the sites or skipped (fewer "
             "sites trained than the plan's minimum sum); see the refusals above and summary.json")


def register(sub) -> None:
    sim = sub.add_parser("simulate", help="coordinator: run a federated study on one machine",
                         description="Every --site is a simulated hospital node reading only its "
                                     "own directory. Without --site, a built-in glucose cohort is "
                                     "generated under RUN_DIR/cohort and used.")
    sim.add_argument("--spec", help="spec TOML file or built-in twin name (required with --site)")
    sim.add_argument("--site", action="append", default=[], metavar="NAME=DIR",
                     help="a hospital's site directory; repeat per site")
    _study_flags(sim)
    sim.add_argument("--out", type=Path, required=True, help="run directory RUN_DIR")
    sim.add_argument("--state", type=Path,
                     help="node states live in STATE/<site> (default RUN_DIR/nodes); reuse it to run "
                          "another study on the same hospitals and their privacy ledgers")
    sim.add_argument("--approved-only", action="store_true",
                     help="use the node states as their officers left them (twinfed node init, "
                          "twinfed plan approve); by default the operator approves the plan for "
                          "every simulated node, and each node's audit log says so")
    sim.set_defaults(func=cmd_simulate)

    pre = sub.add_parser("pretrain", help="coordinator: pretrain a twin on a public virtual cohort",
                         description="Train a twin non-privately on every site of a virtual cohort "
                                     "(twinfed cohort generate; no patient data) and write OUT/model/. "
                                     "A study started with --pretrained OUT names these weights in its "
                                     "plan by their digest, and every output says so.")
    pre.add_argument("--spec", required=True, help="spec TOML file or built-in twin name")
    pre.add_argument("--cohort", type=Path, required=True, help="a virtual cohort directory")
    pre.add_argument("--out", type=Path, required=True, help="output directory (never overwritten)")
    pre.add_argument("--model", choices=["auto", "hybrid", "mlp-residual"], default="auto", dest="kind")
    pre.add_argument("--hidden", type=int)
    pre.add_argument("--layers", type=int)
    pre.add_argument("--steps", type=int, default=1000, help="Adam steps (default 1000)")
    pre.add_argument("--lr", type=float, default=3e-3, help="learning rate (default 0.003)")
    pre.add_argument("--seed", type=int, default=0)
    pre.set_defaults(func=cmd_pretrain)

    demo = sub.add_parser("demo", help="generate a cohort, train a federated twin, evaluate, what-if",
                          description="End to end on a virtual glucose cohort of 3 hospitals.")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    demo.add_argument("--patients", type=int, default=1000, help="patients per hospital")
    demo.add_argument("--days", type=float, default=7.0)
    _study_flags(demo, rounds=20)
    demo.set_defaults(func=cmd_demo)


def _study_flags(p, rounds: int = 5) -> None:
    p.add_argument("--rounds", type=int, default=rounds, help=f"federated rounds (default {rounds})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", choices=["auto", "hybrid", "mlp-residual"], default="auto", dest="kind",
                   help="the surrogate: hybrid (mechanistic core + encoder + bounded correction; the "
                        "default when the spec has a [twin.core]) or mlp-residual (a neural network)")
    p.add_argument("--hidden", type=int, help="hidden width of its networks (default: hybrid 32, "
                                              "mlp-residual 64)")
    p.add_argument("--layers", type=int, help="hidden layers of its networks (default: hybrid 1, "
                                              "mlp-residual 2)")
    p.add_argument("--pretrained", type=Path, metavar="DIR",
                   help="start from weights pretrained on a public virtual cohort (twinfed pretrain "
                        "--out DIR); the plan names them by their digest")
    p.add_argument("--local-steps", type=int, default=TrainingConfig().local_steps,
                   help="optimiser steps per node per round")
    p.add_argument("--batch-size", type=int, default=TrainingConfig().batch_size,
                   help="patients per step")
    p.add_argument("--lr", type=float, default=TrainingConfig().learning_rate, help="learning rate")
    p.add_argument("--windows-per-patient", type=int, default=TrainingConfig().windows_per_patient,
                   help="windows averaged into one patient's example (still one unit of privacy)")
    dp = PrivacyConfig()
    p.add_argument("--epsilon", type=float, default=dp.epsilon,
                   help=f"privacy budget per site for the whole study (default {dp.epsilon:g})")
    p.add_argument("--delta", type=float, default=dp.delta,
                   help=f"DP delta (default {dp.delta:g}; a site never uses more than 1/N)")
    p.add_argument("--clip", type=float, default=dp.clipping_norm,
                   help=f"per-patient gradient norm bound (default {dp.clipping_norm:g})")
    p.add_argument("--accountant", choices=["rdp", "prv"], default=dp.accountant)
    p.add_argument("--no-dp", action="store_true",
                   help="BASELINES ONLY: train without differential privacy (labelled in every output)")
    p.add_argument("--no-secagg", action="store_true",
                   help="BENCHMARKS ONLY: send updates without secure aggregation")
    cal = CalibrationConfig()
    p.add_argument("--no-calibration", action="store_true",
                   help="no prediction intervals: hold no patients out of training to calibrate them")
    p.add_argument("--calibration-holdout", type=float, default=cal.holdout_fraction, metavar="F",
                   help=f"share of each site's consented patients kept out of training to calibrate the "
                        f"twin's prediction intervals at the study's end (default {cal.holdout_fraction:g})")
    p.add_argument("--calibration-noise", type=float, default=cal.noise_multiplier, metavar="Z",
                   help="noise multiplier of each site's DP release of its calibration histogram, within "
                        f"the study's epsilon (default {cal.noise_multiplier:g})")
    p.add_argument("--secagg-min-sites", type=int, default=SecAggConfig().min_sites, metavar="N",
                   help="never unmask a sum of fewer than N sites that trained (default "
                        f"{SecAggConfig().min_sites}; at least 2): such a round is skipped")


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _plan(spec, args):
    from pydantic import ValidationError

    from twinfed.models.plan import TrainingPlan

    model = ModelConfig(kind=args.kind, hidden=args.hidden, layers=args.layers)
    if args.pretrained is not None:
        from twinfed.models.pretrain import pretrained_config

        model = pretrained_config(model, args.pretrained)
    try:
        return TrainingPlan(
            spec=spec, rounds=args.rounds, seed=args.seed, model=model,
            training=TrainingConfig(local_steps=args.local_steps, batch_size=args.batch_size,
                                    learning_rate=args.lr,
                                    windows_per_patient=args.windows_per_patient),
            privacy=PrivacyConfig(enabled=not args.no_dp, epsilon=args.epsilon, delta=args.delta,
                                  clipping_norm=args.clip, accountant=args.accountant,
                                  secure_aggregation=not args.no_secagg,
                                  secagg=SecAggConfig(min_sites=args.secagg_min_sites)),
            calibration=None if args.no_calibration else CalibrationConfig(
                holdout_fraction=args.calibration_holdout, noise_multiplier=args.calibration_noise),
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(map(str, err["loc"]))
        flag = FLAGS.get(str(err["loc"][-1]) if err["loc"] else where, where)
        msg = "must be a finite number" if err["type"] == "finite_number" else err["msg"]
        raise TwinfedError(f"study settings: {flag}: {msg}") from None


# The flag that sets each plan field, for error messages.
FLAGS = {"holdout_fraction": "--calibration-holdout", "noise_multiplier": "--calibration-noise",
         "rounds": "--rounds", "local_steps": "--local-steps", "batch_size": "--batch-size",
         "learning_rate": "--lr", "windows_per_patient": "--windows-per-patient", "epsilon": "--epsilon",
         "delta": "--delta", "clipping_norm": "--clip", "min_sites": "--secagg-min-sites",
         "hidden": "--hidden", "layers": "--layers", "seed": "--seed"}


def parse_sites(items: list[str]):
    from twinfed.simulate import SiteRef

    sites = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise TwinfedError(f"--site {item!r}: write NAME=DIR, e.g. --site hospital-a=/data/site-a")
        sites.append(SiteRef(name.strip(), Path(path.strip())))
    return sites


def cmd_simulate(args) -> int:
    from twinfed.models.cohort import generate_cohort
    from twinfed.models.spec import load_spec
    from twinfed.simulate import SiteRef, run_simulated_study

    from twinfed.server.app import check_new_run

    check_new_run(args.out)
    if args.site:
        if not args.spec:
            raise TwinfedError("--spec is required with --site; give the spec the sites export")
        sites = parse_sites(args.site)
        spec = load_spec(args.spec)
        plan = _plan(spec, args)
    else:
        spec = load_spec(args.spec or "glucose")
        plan = _plan(spec, args)  # the settings are checked before any cohort is written
        cohort_dir = args.out / "cohort"
        if (cohort_dir / "cohort.json").is_file():
            _progress(f"no --site: using the built-in glucose cohort already in {cohort_dir}")
            names = [n for n in json.loads((cohort_dir / "cohort.json").read_text())["sites"]]
        else:
            _progress(f"no --site: generating the built-in glucose cohort in {cohort_dir}")
            names = list(generate_cohort("glucose", sites=3, patients=200, days=7, seed=args.seed,
                                         out=cohort_dir).sites)
        sites = [SiteRef(name, cohort_dir / name) for name in names]
    from twinfed.simulate import SIMULATION_OPERATOR

    summary = run_simulated_study(plan, sites, args.out, progress=_progress, state_root=args.state,
                                  pretrained=args.pretrained,
                                  approve_as=None if args.approved_only else SIMULATION_OPERATOR)
    _print_sites(summary)
    print(f"wrote {args.out}/summary.json and {args.out}/model/")
    if not summary["rounds_with_update"]:
        raise TwinfedError(NO_UPDATE)
    return 0


def cmd_pretrain(args) -> int:
    from twinfed.models.digest import weights_sha256
    from twinfed.models.pretrain import pretrain
    from twinfed.models.spec import load_spec
    from twinfed.models.surrogate import get_weights
    from twinfed.models.twin import Twin

    if (args.out / "model").exists():
        raise TwinfedError(f"{args.out}/model exists; pretrained weights are never overwritten: choose "
                           "another --out")
    if not args.cohort.is_dir():
        raise TwinfedError(f"{args.cohort}: no such cohort directory")
    if args.steps <= 0 or not 0 < args.lr < 1:
        raise TwinfedError("--steps must be above 0 and --lr between 0 and 1")
    model, plan = pretrain(load_spec(args.spec), args.cohort, ModelConfig(kind=args.kind, hidden=args.hidden,
                                                                          layers=args.layers),
                           steps=args.steps, learning_rate=args.lr, seed=args.seed, progress=_progress)
    Twin(plan, model).save(args.out)
    print(f"wrote {args.out}/model/: {plan.model.kind}, weights digest {weights_sha256(get_weights(model))}")
    print(f"start a study from it with --pretrained {args.out}")
    return 0


def _print_sites(summary: dict) -> None:
    """The site table: ``epsilon`` is each site's total spend (its whole ledger, as ``twinfed
    ledger show`` reports it), then one line per site breaking it down by kind of release."""
    from twinfed.outputs import SiteSpend

    rows, spends = [], {}
    for name, s in summary["sites"].items():
        p = s.get("privacy") or {}
        if s.get("spend"):
            spends[name] = SiteSpend.model_validate(s["spend"])
        # summaries written before spend was reported: the site's total after its last round
        total = s.get("epsilon_spent", p.get("site_epsilon_spent"))
        rows.append([name, s["patients_used"], s["patients_excluded"], s["rounds_joined"],
                     s["rounds_refused"], total, p.get("noise_multiplier")])
    print(format_table(["site", "patients used", "excluded", "rounds joined", "refused", "epsilon",
                        "noise"], rows))
    for name, spend in spends.items():
        print(f"{name}: {spend.label()}")
    if summary.get("privacy", {}).get("warning"):
        print(f"WARNING: {summary['privacy']['warning']}")
    for name, s in summary["sites"].items():
        for r in s["refusals"][:1]:
            print(f"{name} refused round {r['round']}: {_refusal_text(r)} (the node's own console "
                  "and audit log say more)")


def _refusal_text(r: dict) -> str:
    """A coded refusal as summary.json holds it; older summaries kept a reason text."""
    if "code" not in r:
        return str(r.get("reason", ""))
    where = r.get("file", "")
    if where:
        where += f" row {r['row']}" if r.get("row") else ""
        where += f", column {r['column']}" if r.get("column") else ""
        where += ": "
    return where + r["code"]


def cmd_demo(args) -> int:
    from twinfed.cli.plots import plot_whatif
    from twinfed.models.evaluation import evaluate
    from twinfed.models.baselines import LinearARX
    import numpy as np

    from twinfed.models.cohort import HOLDOUT, generate_cohort, replay_truth
    from twinfed.models.site_data import load_site
    from twinfed.models.spec import load_spec
    from twinfed.models.twin import Twin
    from twinfed.models.whatif import parse_scenario, run_whatif
    from twinfed.simulate import SiteRef, run_simulated_study

    t0 = time.perf_counter()
    cohort_dir = args.out / "cohort"
    _progress(f"[1/4] generating a virtual glucose cohort: 3 hospitals x {args.patients} patients x "
              f"{args.days:g} days, {args.patients} held-out patients")
    cohort = generate_cohort("glucose", sites=3, patients=args.patients, days=args.days, seed=args.seed,
                             out=cohort_dir, holdout=args.patients)
    spec = load_spec(cohort_dir / "spec.toml")
    sites = [SiteRef(n, cohort_dir / n) for n in cohort.sites if n != HOLDOUT]
    _progress(f"[2/4] federated training on Flower's simulation engine: {len(sites)} nodes, "
              f"{args.rounds} rounds")
    run_dir = args.out / "run"
    summary = run_simulated_study(_plan(spec, args), sites, run_dir, progress=_progress,
                                  pretrained=args.pretrained)

    _progress("[3/4] evaluating on held-out patients (and fitting the linear ARX baseline on the "
              "pooled training data)")
    arx = LinearARX.fit([load_site(s.data_dir, spec) for s in sites])

    def arx_forecast(b):
        out = arx.predict_outputs(arx.scaler.batch_features(b))
        return arx.scaler.decode(b.history[:, -1, : len(spec.states)], out)

    report = evaluate(run_dir, str(cohort_dir / "spec.toml"), cohort_dir / HOLDOUT,
                      extra_forecasters={"arx": arx_forecast})
    (args.out / "evaluation.json").write_text(json.dumps(report, indent=2))

    _progress("[4/4] what-if for one held-out patient, against the simulator's own answer")
    holdout = load_site(cohort_dir / HOLDOUT, spec)
    twin = Twin.load(run_dir)
    sl = holdout.patient_slice(0)
    at_step = int(holdout.steps[sl][0]) + 24 * 60 // spec.step_minutes // 2  # noon of day 1
    at = float(at_step * spec.step_minutes)
    scenarios = [parse_scenario(s, spec) for s in
                 ("recorded=recorded", "skip-insulin=insulin_u*0", "bolus-2U-now=insulin_u+2@0",
                  "snack-30g-now=carbs_g+30@0")]
    res = run_whatif(twin, holdout, holdout.patient_ids[0], at, scenarios)
    plot_path = args.out / "whatif.png"
    plot_whatif(res, spec, plot_path)
    truth = {}
    recorded = holdout.series[sl, len(spec.states):].astype(np.float64)
    h = at_step - int(holdout.steps[sl][0])
    for name, fut in res.controls.items():
        full = recorded.copy()
        full[h + 1: h + 1 + spec.horizon_steps] = fut
        replay = replay_truth(cohort_dir, HOLDOUT, holdout.patient_ids[0],
                              {c: full[:, j] for j, c in enumerate(spec.control_columns)})
        truth[name] = float(replay[spec.state_columns[0]][h + spec.horizon_steps])

    col = spec.state_columns[0]
    m = report["states"][col]
    print()
    print("sites")
    _print_sites(summary)
    print()
    print(f"forecast of {col} on {report['n_patients']} held-out patients ({report['n_windows']} windows), "
          f"RMSE in {spec.states[0].unit}")
    steps_per_30 = 30 // spec.step_minutes
    rows = []
    for idx in sorted({steps_per_30 - 1, spec.horizon_steps - 1}):
        rows.append([f"+{(idx + 1) * spec.step_minutes} min", m["rmse_by_step"][idx],
                     m["arx_rmse_by_step"][idx], m["persistence_rmse_by_step"][idx],
                     m["persistence_rmse_by_step"][idx] / m["rmse_by_step"][idx]])
    print(format_table(["horizon", "twin", "linear ARX", "persistence", "persistence/twin"], rows))
    print()
    print(f"what-if for one held-out patient from noon: {col} at +{spec.horizon_minutes} min, "
          "twin vs the simulator's noise-free truth")
    print(format_table(["scenario", "twin", "truth"],
                       [[n, float(f[-1, 0]), truth[n]] for n, f in res.forecasts.items()]))
    print(f"plot: {plot_path}")
    print(f"rounds {summary['rounds']}, total {time.perf_counter() - t0:.0f} s; outputs in {args.out}/")
    return 0
