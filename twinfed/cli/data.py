"""``twinfed cohort generate`` and ``twinfed data validate``."""

from __future__ import annotations

from pathlib import Path



def register(sub) -> None:
    cohort = sub.add_parser("cohort", help="virtual-patient cohorts from the built-in simulators")
    csub = cohort.add_subparsers(dest="cohort_command", metavar="COMMAND", required=True)
    gen = csub.add_parser("generate", help="write a virtual multi-hospital cohort in the data contract's layout",
                          description="Write DIR/spec.toml, one site directory per hospital "
                                      "(timeseries.csv, patients.csv, consent.csv), and the "
                                      "simulator's per-patient parameters under DIR/truth/; "
                                      "DIR/cohort.json names the simulator, and replaying the "
                                      "truth uses that one.")
    gen.add_argument("--twin", choices=["glucose", "cardio"], required=True)
    gen.add_argument("--simulator", metavar="NAME",
                     help="glucose twin: bergman (default; Bergman minimal model, the family of the "
                          "twin's own core) or hovorka (Hovorka 2004, a different structure, to judge "
                          "a twin under structural mismatch); cardio twin: baroreflex, its only one")
    gen.add_argument("--sites", type=int, default=3, help="hospitals (default 3)")
    gen.add_argument("--patients", type=int, default=200, help="patients per hospital (default 200)")
    gen.add_argument("--days", type=float, default=7.0, help="days of data per patient (default 7)")
    gen.add_argument("--seed", type=int, default=0, help="0 or more (default 0)")
    gen.add_argument("--holdout", type=int, default=0,
                     help="also write DIR/holdout with this many patients from every population, for testing")
    gen.add_argument("--out", type=Path, required=True,
                     help="output directory DIR (new or empty; never overwritten without --force)")
    gen.add_argument("--care", choices=["routine", "plain"], default="routine",
                     help="routine (default): care as records hold it: correction boluses after high "
                          "readings, fast carbs after low ones, basal changes, late and missed "
                          "boluses; late, missed, extra and titrated doses. plain: the open-loop care "
                          "of cohorts made before routine care, reproduced exactly")
    gen.add_argument("--force", action="store_true",
                     help="replace DIR if it holds a cohort (written whole first; never any other directory)")
    gen.set_defaults(func=cmd_generate)

    data = sub.add_parser("data", help="hospital IT: check a site export")
    dsub = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
    val = dsub.add_parser("validate", help="check a site directory against a twin spec",
                          description="Exit 0 with a one-line summary when the site directory "
                                      "meets the spec; otherwise one line naming file, row and column.")
    val.add_argument("--spec", required=True, help="spec TOML file or built-in twin name")
    val.add_argument("--data", type=Path, required=True, help="site directory")
    val.set_defaults(func=cmd_validate)


def cmd_generate(args) -> int:
    from twinfed.models.cohort import generate_cohort

    summary = generate_cohort(args.twin, sites=args.sites, patients=args.patients, days=args.days,
                              seed=args.seed, out=args.out, holdout=args.holdout, simulator=args.simulator,
                              force=args.force, care=args.care)
    for name, info in summary.sites.items():
        print(f"{name}: {info['patients']} patients ({', '.join(info['profiles'])}), {info['rows']} rows")
    print(f"wrote {args.out}/spec.toml, {len(summary.sites)} site directories and {args.out}/truth/ "
          f"(simulator {summary.simulator_name})")
    return 0


def cmd_validate(args) -> int:
    from twinfed.governance.consent import granted, site_consent
    from twinfed.models.site_data import load_site
    from twinfed.models.spec import load_spec
    from twinfed.models.windows import WindowIndex

    spec = load_spec(args.spec)
    site = load_site(args.data, spec)
    consented = granted(site_consent(args.data), spec.purpose) & set(site.patient_ids)
    windows = WindowIndex.build(site).n_windows
    print(f"ok: {args.data}: {site.n_patients} patients, {site.n_rows} rows, {windows} windows, "
          f"{len(consented)} consented for {spec.purpose!r}")
    return 0
