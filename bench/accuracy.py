"""Section 1: the twin's accuracy against its privacy budget, for every built-in twin in each of
its virtual worlds.

A *world* is the cohorts one simulator makes (``bench.sizes``: the glucose twin's built-in
``bergman`` and the mismatch ``hovorka``, of another structure than the twin's core; the cardio
twin's ``baroreflex``). In each world the twins are trained on its sites and scored on its
held-out patients (every population, none of them at any site) by the product's protocol
(:mod:`twinfed.models.evaluation`: each patient's first 48 h identify them, the later windows are
scored; a hybrid twin personalised, its population forecast beside it). Forecast RMSE 60 minutes
ahead for:

- federated studies with patient-level DP, the plan's default model (the hybrid), at each
  epsilon (the first world; the others at the plan's default epsilon only), and without DP;
- the same DP study started from weights pretrained on a public cohort of the twin's built-in
  simulator (another seed: other patients). The mismatch world's study is pretrained on the
  built-in simulator too, never on the world it is scored in; conditions say which;
- the centralised upper bounds (every site's patients pooled, no DP): the hybrid and the neural
  surrogate (``mlp-residual``); ``central`` is the better of the two, state by state;
- a pooled non-private linear ARX (:class:`twinfed.models.baselines.LinearARX`, fitted on the
  world's sites pooled), scored on the same windows;
- each site training alone with the same budget (a one-site study: the same plan without secure
  aggregation, which needs three nodes).

Targets (issue 12, DESIGN.md section 6) for the federated DP twin at the default epsilon: within
1.15x of central, at most 1.0x the pooled ARX, at most 0.8x the average site alone; personalised
at most 0.9x the population twin, identified in under 1 s per patient. The pretrained study's
ratios carry the same targets, beside the ones from scratch.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path

from twinfed.models.plan import PrivacyConfig, TrainingPlan

from bench.report import figure, plot_accuracy
from bench.sizes import Sizes
from bench.studies import StudyRun, Workspace, plan_conditions, rmse_at

TARGET_VS_CENTRAL = 1.15
TARGET_VS_ARX = 1.0
TARGET_VS_SITE_ALONE = 0.8
TARGET_PERSONALISED = 0.9
TARGET_FIT_SECONDS = 1.0
HORIZON_MIN = 60
# The centralised twins: label -> (model kind, the Sizes field with its Adam steps)
CENTRAL = {"central_hybrid": ("hybrid", "central_hybrid_steps"), "central_neural": ("mlp-residual", "central_steps")}

Evaluate = Callable[[Path], dict]


def reference_epsilon() -> float:
    """The default budget per site, read from the plan so the benchmark follows it."""
    return PrivacyConfig().epsilon


def run(ws: Workspace, sizes: Sizes) -> dict:
    out: dict = {}
    curves: dict = {}
    for twin in sizes.twins:
        for world in sizes.worlds[twin]:
            figs, world_curves = run_world(ws, sizes, twin, world)
            out.update(figs)
            curves.update(world_curves)
    plot = ws.results / "accuracy_vs_epsilon.png"
    plot_accuracy(curves, plot)
    ws.progress(f"  plot: {plot}")
    return out


# -- the twins of a world, shared with the what-if and cost sections ----------------------------

def world_cohort(ws: Workspace, sizes: Sizes, twin: str, world: str) -> Path:
    return ws.cohort(twin, sites=sizes.sites, patients=sizes.patients[twin], days=sizes.days,
                     holdout=sizes.holdout[twin], simulator=world)


def pretraining(sizes: Sizes, twin: str) -> dict:
    """Where a twin's pretrained weights come from: a cohort of its built-in simulator."""
    return {"simulator": sizes.worlds[twin][0], "sites": sizes.pretrain_sites,
            "patients_per_site": sizes.pretrain_patients, "days": sizes.pretrain_days,
            "seed": sizes.pretrain_seed, "steps": sizes.pretrain_steps,
            "learning_rate": sizes.pretrain_learning_rate}


def pretrained_start(ws: Workspace, sizes: Sizes, twin: str) -> Path:
    p = pretraining(sizes, twin)
    return ws.pretrained(twin, sites=p["sites"], patients=p["patients_per_site"], days=p["days"],
                         seed=p["seed"], steps=p["steps"], learning_rate=p["learning_rate"])


def federated_dp(ws: Workspace, sizes: Sizes, twin: str, world: str, *, epsilon: float | None = None,
                 pretrained: bool = False) -> tuple[StudyRun, TrainingPlan]:
    """A federated DP study of the default plan in ``world``, kept in ``ws.models`` under
    ``(twin, world, "federated_dp" or "federated_dp_pretrained", epsilon)``."""
    eps = epsilon or reference_epsilon()
    cohort = world_cohort(ws, sizes, twin, world)
    start = pretrained_start(ws, sizes, twin) if pretrained else None
    plan = ws.plan(ws.spec(cohort), sizes.rounds, dp=True, epsilon=eps, pretrained=start)
    regime = "federated_dp_pretrained" if pretrained else "federated_dp"
    study = ws.federated(plan, cohort, f"{twin}-{world}-{regime.replace('_', '-')}-eps{eps:g}", pretrained=start)
    ws.models[(twin, world, regime, eps)] = study.run_dir
    return study, plan


def central(ws: Workspace, sizes: Sizes, twin: str, world: str, evaluate: Evaluate) -> dict[str, dict]:
    """Both centralised twins of ``world``, trained and evaluated (reports by label); the better
    one on the spec's first state is kept in ``ws.models`` as ``(twin, world, "central", None)``."""
    cohort = world_cohort(ws, sizes, twin, world)
    spec = ws.spec(cohort)
    reports = {}
    for label, (kind, steps) in CENTRAL.items():
        run_dir = ws.central(spec, cohort, f"{twin}-{world}-{label.replace('_', '-')}", kind=kind,
                             steps=getattr(sizes, steps), learning_rate=sizes.central_learning_rate)
        ws.models[(twin, world, label, None)] = run_dir
        reports[label] = evaluate(run_dir)
    first = spec.state_columns[0]
    best = min(reports, key=lambda label: reports[label]["states"][first]["model"])
    ws.models[(twin, world, "central", None)] = ws.models[(twin, world, best, None)]
    return reports


def trained(ws: Workspace, sizes: Sizes, twin: str, world: str, regime: str) -> Path:
    """The run directory of this run's ``regime`` twin of ``world``: ``federated_dp`` (the
    default epsilon) or ``central`` (the better centralised twin), trained now if no earlier
    section trained it (e.g. ``--only whatif``)."""
    key = (twin, world, regime, reference_epsilon() if regime == "federated_dp" else None)
    if key not in ws.models:
        if regime == "federated_dp":
            federated_dp(ws, sizes, twin, world)
        else:
            cohort = world_cohort(ws, sizes, twin, world)
            central(ws, sizes, twin, world,
                    lambda run_dir: rmse_at(run_dir, cohort, minutes=HORIZON_MIN, stride=sizes.eval_stride))
    return ws.models[key]


def central_kind(ws: Workspace, twin: str, world: str) -> str:
    """Which centralised twin is ``central`` (after :func:`central`)."""
    best = ws.models[(twin, world, "central", None)]
    return next(label for label in CENTRAL if ws.models.get((twin, world, label, None)) == best)


def pooled_arx(cohort: Path, sites: list[str]) -> tuple[Callable, int]:
    """The non-private linear ARX fitted on ``sites`` pooled, as a forecaster, and its weight count."""
    from twinfed.models.baselines import LinearARX
    from twinfed.models.site_data import load_site
    from twinfed.models.spec import load_spec

    spec = load_spec(cohort / "spec.toml")
    arx = LinearARX.fit([load_site(cohort / name, spec) for name in sites])
    s = len(spec.states)

    def forecast(batch):
        return arx.scaler.decode(batch.history[:, -1, :s], arx.predict_outputs(arx.scaler.batch_features(batch)))
    return forecast, int(arx.weights.size)


# -- one world ----------------------------------------------------------------------------------

def run_world(ws: Workspace, sizes: Sizes, twin: str, world: str) -> tuple[dict, dict]:
    ref_eps = reference_epsilon()
    builtin = world == sizes.worlds[twin][0]
    epsilons = sorted({*sizes.epsilons, ref_eps}) if builtin else [ref_eps]
    cohort = world_cohort(ws, sizes, twin, world)
    spec = ws.spec(cohort)
    sites = ws.site_names(cohort)
    base = {"twin": twin, "world": world, "simulator": world,
            "mismatch_world": not builtin,  # a simulator of another structure than the twin's core
            "cohort": {"sites": sizes.sites, "patients_per_site": sizes.patients[twin], "days": sizes.days,
                       "held_out_patients": sizes.holdout[twin], "seed": 0},
            "horizon_minutes": HORIZON_MIN, "eval_window_stride": sizes.eval_stride}
    arx, arx_weights = pooled_arx(cohort, sites)

    def evaluate(run_dir: Path) -> dict:
        return rmse_at(run_dir, cohort, minutes=HORIZON_MIN, stride=sizes.eval_stride,
                       extra_forecasters={"linear_arx": arx})

    reports: dict[str, dict] = {}  # regime label -> rmse_at() report
    conds: dict[str, dict] = {}

    def add_study(label: str, study: StudyRun, plan: TrainingPlan, **extra) -> None:
        ws.progress(f"  evaluating {label}")
        reports[label] = evaluate(study.run_dir)
        conds[label] = plan_conditions(plan) | {
            "sites": len(study.summary["sites"]), "noise_multiplier": study.noise_multipliers(),
            "study_seconds": round(study.seconds, 1),
            "summary_trained_weights": study.summary["model"]["trained_weights"]} | extra

    for eps in epsilons:
        add_study(f"federated_dp_eps{eps:g}", *federated_dp(ws, sizes, twin, world, epsilon=eps))
    # kept for the trial section's coverage figures (the same twin, the same held-out windows)
    ws.evaluations[(twin, world, "federated_dp", ref_eps)] = reports[f"federated_dp_eps{ref_eps:g}"]
    plan = ws.plan(spec, sizes.rounds, dp=False)
    study = ws.federated(plan, cohort, f"{twin}-{world}-federated-nodp")
    ws.models[(twin, world, "federated_nodp", None)] = study.run_dir
    add_study("federated_nodp", study, plan)
    pre = pretraining(sizes, twin)
    add_study(f"federated_dp_pretrained_eps{ref_eps:g}",
              *federated_dp(ws, sizes, twin, world, pretrained=True),
              pretrained_on=pre | {"scored_world_is_the_pretraining_simulator": pre["simulator"] == world,
                                   "note": f"pretrained on a separate {pre['simulator']} cohort (seed "
                                           f"{pre['seed']}: other patients); scored on {world}"})

    ws.progress("  centralised twins")
    reports |= central(ws, sizes, twin, world, evaluate)
    for label, (kind, steps) in CENTRAL.items():
        conds[label] = {"pooled_sites": len(sites), "differential_privacy": False, "model": kind,
                        "steps": getattr(sizes, steps), "learning_rate": sizes.central_learning_rate,
                        "training": "non-private Adam on all sites' patients pooled "
                                    "(twinfed.models.pretrain.pretrain); the plan's default batch "
                                    "and windows per patient"}

    alone_sites = sites[: sizes.site_alone_sites] if sizes.site_alone_sites else sites
    for eps in sorted({*sizes.site_alone_epsilons, ref_eps}):
        plan = ws.plan(spec, sizes.rounds, dp=True, epsilon=eps, secure_aggregation=False)
        for site in alone_sites:
            study = ws.federated(plan, cohort, f"{twin}-{world}-{site}-alone-eps{eps:g}", sites=[site])
            add_study(f"site_alone_eps{eps:g}.{site}", study, plan, site=site,
                      note="a one-site study: the federated plan without secure aggregation "
                           "(SecAgg+ needs three nodes), same budget, rounds and local steps")

    fed_label = f"federated_dp_eps{ref_eps:g}"
    pre_label = f"federated_dp_pretrained_eps{ref_eps:g}"
    fed_rep = reports[fed_label]
    fed_twin, pre_twin = "the federated DP twin", "the federated DP twin started from pretrained weights"
    # (figure name, numerator, denominator, meaning, target): RMSE ratios, the labels of ``rmse``
    ratios = [
        ("federated_dp_vs_central", fed_label, "central",
         f"RMSE of {fed_twin} / RMSE of the better centralised non-private twin", TARGET_VS_CENTRAL),
        ("federated_dp_vs_linear_arx", fed_label, "linear_arx",
         f"RMSE of {fed_twin} / RMSE of the pooled non-private linear ARX", TARGET_VS_ARX),
        ("federated_dp_vs_site_alone", fed_label, "site_alone_mean",
         f"RMSE of {fed_twin} / mean RMSE of the sites each training alone with the same budget", TARGET_VS_SITE_ALONE),
        ("federated_dp_pretrained_vs_central", pre_label, "central",
         f"RMSE of {pre_twin} / RMSE of the better centralised non-private twin", TARGET_VS_CENTRAL),
        ("federated_dp_pretrained_vs_linear_arx", pre_label, "linear_arx",
         f"RMSE of {pre_twin} / RMSE of the pooled non-private linear ARX", TARGET_VS_ARX),
        ("federated_dp_pretrained_vs_federated_dp", pre_label, fed_label,
         "what public pretraining changes, same budget", None),
        ("federated_nodp_vs_central", "federated_nodp", "central", "the cost of federation alone, without DP", None),
        ("central_hybrid_vs_central_neural", "central_hybrid", "central_neural",
         "the hybrid against the neural surrogate, both centralised without DP", None),
    ]
    figs: dict = {}
    curves: dict = {}
    for col in spec.state_columns:
        unit = next(s.unit for s in spec.states if s.column == col)
        key = f"{twin}.{world}.{col}"
        rmse = {label: rep["states"][col]["model"] for label, rep in reports.items()}
        for label, rep in reports.items():
            cond = base | _evaluated(rep) | conds[label]
            figs[f"{key}.rmse60.{label}"] = figure(rmse[label], unit, conditions=cond)
            if "population" in rep["states"][col]:
                figs[f"{key}.rmse60_population.{label}"] = figure(
                    rep["states"][col]["population"], unit,
                    conditions=cond | {"meaning": "the population twin (the encoder's parameters, no "
                                                  "identification) on the same windows"})
        best = min(CENTRAL, key=rmse.get)
        rmse["central"] = rmse[best]
        figs[f"{key}.rmse60.central"] = figure(rmse["central"], unit, conditions=base | _evaluated(reports[best]) | {
            "from": best, **{f"{label}_rmse": rmse[label] for label in CENTRAL},
            "meaning": "the better of the centralised hybrid and neural twins for this state"})
        rmse["linear_arx"] = fed_rep["states"][col]["linear_arx"]
        figs[f"{key}.rmse60.linear_arx"] = figure(rmse["linear_arx"], unit, conditions=base | _evaluated(fed_rep) | {
            "model": "LinearARX (ridge least squares on the neural surrogate's features)",
            "fitted_on": f"the {len(sites)} training sites pooled, no DP", "trained_weights": arx_weights})
        persistence = fed_rep["states"][col]["persistence"]
        figs[f"{key}.rmse60.persistence"] = figure(persistence, unit, conditions=base | _evaluated(fed_rep))
        site_alone = {s: rmse[f"site_alone_eps{ref_eps:g}.{s}"] for s in alone_sites}
        mean_alone = statistics.fmean(site_alone.values())
        figs[f"{key}.rmse60.site_alone_eps{ref_eps:g}.mean"] = figure(
            mean_alone, unit, conditions=base | {"sites": alone_sites, "epsilon": ref_eps})
        rmse["site_alone_mean"] = mean_alone
        for name, num, den, meaning, target in ratios:
            figs[f"{key}.ratio.{name}"] = figure(
                rmse[num] / rmse[den], "x", target=target,
                conditions=base | {"epsilon": ref_eps, f"{num}_rmse": rmse[num], f"{den}_rmse": rmse[den],
                                   "meaning": f"{meaning} (lower is better)"})
        figs[f"{key}.ratio.federated_dp_vs_site_alone"]["conditions"]["site_alone_rmse"] = site_alone
        population = fed_rep["states"][col].get("population")
        if population is not None:
            figs[f"{key}.ratio.personalised_vs_population"] = figure(
                rmse[fed_label] / population, "x", target=TARGET_PERSONALISED,
                conditions=base | _evaluated(fed_rep) | {
                    "epsilon": ref_eps, "personalised_rmse": rmse[fed_label], "population_rmse": population,
                    "meaning": "the federated DP twin personalised at the hospital (each held-out "
                               "patient identified from their first hours) / the same twin with the "
                               "encoder's parameters (lower is better)"})
        curves[f"{twin} ({world}): {col}"] = {
            "unit": unit, "epsilons": epsilons, "reference_epsilon": ref_eps,
            "federated_dp": [rmse[f"federated_dp_eps{e:g}"] for e in epsilons],
            "federated_dp_pretrained": rmse[pre_label],
            "federated_nodp": rmse["federated_nodp"], "central": rmse["central"],
            "linear_arx": rmse["linear_arx"], "persistence": persistence,
            "site_alone": {s: [rmse.get(f"site_alone_eps{e:g}.{s}") for e in epsilons] for s in alone_sites},
        }

    if fed_rep["seconds_per_patient"] is not None:
        figs[f"{twin}.{world}.personalisation.fit_seconds_per_patient"] = figure(
            fed_rep["seconds_per_patient"], "s", target=TARGET_FIT_SECONDS, conditions=base | _evaluated(fed_rep) | {
                "model": fed_label, "timing": "wall time of identifying every held-out patient at once "
                                              "(vectorised), divided by the number of patients"})
    by_kind: dict[str, dict] = {}
    for label, rep in reports.items():
        entry = by_kind.setdefault(rep["kind"], {"weights": rep["trained_weights"], "twins": []})
        entry["twins"].append(label)
    by_kind["linear_arx"] = {"weights": arx_weights, "twins": ["linear_arx"]}
    for kind, entry in by_kind.items():
        figs[f"{twin}.{world}.trained_weights.{kind}"] = figure(entry["weights"], "weights", conditions=base | {
            "twins": entry["twins"], "meaning": "trained parameters (for the hybrid: its encoder and "
                                                "correction; the core has none)"})
    return figs, curves


def _evaluated(rep: dict) -> dict:
    """How a report was measured, for a figure's conditions."""
    return {"held_out_patients": rep["n_patients"], "held_out_windows": rep["n_windows"],
            "personalised": rep["personalised"], "identify_hours": rep["identify_hours"],
            "evaluation_seconds": round(rep["seconds"], 1)}
