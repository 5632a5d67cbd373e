"""Section 1: the twin's accuracy against its privacy budget, for every built-in twin.

Forecast RMSE 60 minutes ahead on held-out patients (every population, none of them at any site)
for: federated studies with patient-level DP at each epsilon, a federated study without DP, the
centralised upper bound (all sites' patients pooled, no DP), and each site training alone with
the same budget (a one-site study: the same plan without secure aggregation, which needs three
nodes). Targets (DESIGN.md section 6): federated DP at the default epsilon within 1.15x of
centralised, and at most 0.8x of the average site alone.
"""

from __future__ import annotations

import statistics

from bench.report import figure, plot_accuracy
from bench.sizes import Sizes
from bench.studies import Workspace, default_plan, plan_conditions, rmse_at
from twinfed.models.plan import PrivacyConfig

TARGET_VS_CENTRAL = 1.15
TARGET_VS_SITE_ALONE = 0.8
HORIZON_MIN = 60


def reference_epsilon() -> float:
    """The default budget per site, read from the plan so the benchmark follows it."""
    return PrivacyConfig().epsilon


def run(ws: Workspace, sizes: Sizes) -> dict:
    out: dict = {}
    curves: dict = {}
    for twin in sizes.twins:
        figs, twin_curves = run_twin(ws, sizes, twin)
        out.update(figs)
        curves.update(twin_curves)
    plot = ws.results / "accuracy_vs_epsilon.png"
    plot_accuracy(curves, plot)
    ws.progress(f"  plot: {plot}")
    return out


def run_twin(ws: Workspace, sizes: Sizes, twin: str) -> tuple[dict, dict]:
    ref_eps = reference_epsilon()
    epsilons = sorted({*sizes.epsilons, ref_eps})
    cohort = ws.cohort(twin, sites=sizes.sites, patients=sizes.patients[twin], days=sizes.days,
                       holdout=sizes.holdout[twin])
    spec = ws.spec(cohort)
    sites = ws.site_names(cohort)
    base = {"twin": twin, "cohort": {"sites": sizes.sites, "patients_per_site": sizes.patients[twin],
                                     "days": sizes.days, "held_out_patients": sizes.holdout[twin], "seed": 0},
            "horizon_minutes": HORIZON_MIN, "eval_window_stride": sizes.eval_stride}

    def evaluate(run_dir):
        return rmse_at(run_dir, cohort, minutes=HORIZON_MIN, stride=sizes.eval_stride)

    results: dict[str, dict] = {}  # regime label -> rmse_at() report
    conds: dict[str, dict] = {}
    for eps in epsilons:
        plan = default_plan(spec, sizes.rounds, dp=True, epsilon=eps)
        study = ws.federated(plan, cohort, f"{twin}-federated-dp-eps{eps:g}")
        ws.models[(twin, "federated_dp", eps)] = study.run_dir
        results[f"federated_dp_eps{eps:g}"] = evaluate(study.run_dir)
        conds[f"federated_dp_eps{eps:g}"] = plan_conditions(plan) | {
            "sites": len(sites), "noise_multiplier": study.noise_multipliers(),
            "study_seconds": round(study.seconds, 1)}
    plan = default_plan(spec, sizes.rounds, dp=False)
    study = ws.federated(plan, cohort, f"{twin}-federated-nodp")
    ws.models[(twin, "federated_nodp", None)] = study.run_dir
    results["federated_nodp"] = evaluate(study.run_dir)
    conds["federated_nodp"] = plan_conditions(plan) | {"sites": len(sites),
                                                       "study_seconds": round(study.seconds, 1)}

    central = ws.central(spec, cohort, f"{twin}-central", steps=sizes.central_steps,
                         learning_rate=sizes.central_learning_rate)
    ws.models[(twin, "central", None)] = central
    results["central"] = evaluate(central)
    conds["central"] = {"pooled_sites": len(sites), "differential_privacy": False,
                        "steps": sizes.central_steps, "learning_rate": sizes.central_learning_rate,
                        "training": "non-private Adam on all sites' patients pooled; otherwise the "
                                    "plan's default model, batch and windows per patient"}

    alone_sites = sites[: sizes.site_alone_sites] if sizes.site_alone_sites else sites
    for eps in sorted({*sizes.site_alone_epsilons, ref_eps}):
        plan = default_plan(spec, sizes.rounds, dp=True, epsilon=eps, secure_aggregation=False)
        for site in alone_sites:
            study = ws.federated(plan, cohort, f"{twin}-{site}-alone-eps{eps:g}", sites=[site])
            results[f"site_alone_eps{eps:g}.{site}"] = evaluate(study.run_dir)
            conds[f"site_alone_eps{eps:g}.{site}"] = plan_conditions(plan) | {
                "sites": 1, "site": site, "noise_multiplier": study.noise_multipliers()[site],
                "note": "a one-site study: the federated plan without secure aggregation "
                        "(SecAgg+ needs three nodes), same budget, rounds and local steps",
                "study_seconds": round(study.seconds, 1)}

    figs: dict = {}
    curves: dict = {}
    any_report = next(iter(results.values()))
    cond_eval = {"held_out_patients": any_report["n_patients"], "held_out_windows": any_report["n_windows"]}
    for col in spec.state_columns:
        unit = next(s.unit for s in spec.states if s.column == col)
        key = f"{twin}.{col}"
        rmse = {label: rep["states"][col]["model"] for label, rep in results.items()}
        for label, value in rmse.items():
            figs[f"{key}.rmse60.{label}"] = figure(value, unit, conditions=base | cond_eval | conds[label])
        persistence = any_report["states"][col]["persistence"]
        figs[f"{key}.rmse60.persistence"] = figure(persistence, unit, conditions=base | cond_eval)
        site_alone_ref = [rmse[f"site_alone_eps{ref_eps:g}.{s}"] for s in alone_sites]
        mean_alone = statistics.fmean(site_alone_ref)
        figs[f"{key}.rmse60.site_alone_eps{ref_eps:g}.mean"] = figure(
            mean_alone, unit, conditions=base | cond_eval | {"sites": alone_sites, "epsilon": ref_eps})
        fed = rmse[f"federated_dp_eps{ref_eps:g}"]
        figs[f"{key}.ratio.federated_dp_vs_central"] = figure(
            fed / rmse["central"], "x", target=TARGET_VS_CENTRAL,
            conditions=base | {"epsilon": ref_eps, "federated_dp_rmse": fed, "central_rmse": rmse["central"],
                               "meaning": "RMSE of the federated DP twin / RMSE of the centralised "
                                          "non-private twin (lower is better)"})
        figs[f"{key}.ratio.federated_dp_vs_site_alone"] = figure(
            fed / mean_alone, "x", target=TARGET_VS_SITE_ALONE,
            conditions=base | {"epsilon": ref_eps, "federated_dp_rmse": fed,
                               "site_alone_rmse_mean": mean_alone,
                               "site_alone_rmse": dict(zip(alone_sites, site_alone_ref)),
                               "meaning": "RMSE of the federated DP twin / mean RMSE of the sites "
                                          "each training alone with the same budget (lower is better)"})
        figs[f"{key}.ratio.federated_nodp_vs_central"] = figure(
            rmse["federated_nodp"] / rmse["central"], "x",
            conditions=base | {"meaning": "the cost of federation alone, without DP"})
        curves[f"{twin}: {col}"] = {
            "unit": unit, "epsilons": epsilons,
            "federated_dp": [rmse[f"federated_dp_eps{e:g}"] for e in epsilons],
            "federated_nodp": rmse["federated_nodp"], "central": rmse["central"],
            "persistence": persistence,
            "site_alone": {s: [rmse.get(f"site_alone_eps{e:g}.{s}") for e in epsilons] for s in alone_sites},
        }
    return figs, curves
