"""Section 2: what-if accuracy against the mechanistic truth (what a twin is for), in every
world of every twin (``bench.sizes``: the glucose twin's built-in ``bergman`` world and the
mismatch ``hovorka`` world, whose simulator has another structure than the twin's core).

For held-out virtual patients, at decision times shortly before the usual meals or doses (after
the evaluation's 48 h of identification), the twin forecasts the next hour under alternative
treatments (dose scaled, dose skipped, meal added, an extra dose; for the cardio twin also
activity), as ``twinfed whatif`` does (:func:`twinfed.models.whatif.run_whatif`: a hybrid twin
identifies the patient from their record before the decision). The world's own simulator
(``cohort_simulator``) replays the same patient under the same treatment without sensor noise:
the counterfactual truth. Reported per world and per model (the federated DP twin at the default
budget; the better centralised non-private twin beside it, to tell what DP costs from what
learning from observational data costs):

- counterfactual RMSE per scenario and over all alternatives (forecast vs truth over the hour);
- effect RMSE: the error of the predicted *change* a treatment makes against the recorded one,
  over the hour and at its end;
- ranking agreement: how often the twin orders two treatments as the truth does by time in the
  target range (70-180 mg/dL; systolic 90-140 mmHg), and by mean distance outside that range;
- effect direction agreement: whether the twin moves the state the way the truth does, over all
  alternatives and (glucose) over the insulin changes alone.

Targets (issue 12, DESIGN.md section 6) for the federated DP twin: direction right in 95% of
cases in the built-in world and 90% in the mismatch world (the cardio twin 97%); pairs ranked
as the truth ranks them (time in range) 90% and 85%; the glucose effect RMSE at most 8 mg/dL.
The centralised twin's figures are for reference, without targets.

Hours out (issue 21 item 5): the first hour hides a twin's structural error (a treatment has
barely begun to act). For the same cases, each twin is rolled forward ``LONG_HOURS`` (8 h,
:func:`twinfed.models.rollout.roll_forward` from the same origin, with the same identification
as the what-if) under each scenario: the scenario's hour as in the what-if (an ``@0`` dose in the
first step, a scaled dose over the hour), the recorded controls after it (the patient's usual
care resumes). The world's simulator replays the same 8 h. At +4 h and +8 h (``LONG_AT_HOURS``),
per state: the effect's relative error, the median over effects (each patient, decision time
and alternative with a true effect of at least ``TIE``) of |twin effect - true effect| /
|true effect|, target at most 0.20 at +4 h for the glucose twin's federated DP twin in both
worlds (``LONG_RELATIVE_TARGET``); and the effect RMSE. A case whose record does not run 8 h
past its decision is left out of these figures only (``long_cases`` in their conditions). An
ensemble twin is rolled once per structure and averaged, as its forecasts are.
"""

from __future__ import annotations

import itertools
import math
import time

import numpy as np

from bench.accuracy import central_kind, reference_epsilon, trained, world_cohort
from bench.report import figure, plot_whatif_case
from bench.sizes import Sizes
from bench.studies import HOLDOUT, Workspace, each_world

SCENARIOS = {
    "glucose": ("recorded=recorded", "insulin-x1.5=insulin_u*1.5", "skip-insulin=insulin_u*0",
                "meal-30g=carbs_g+30@0", "bolus-2U=insulin_u+2@0"),
    "cardio": ("recorded=recorded", "skip-dose=dose_mg*0", "dose-x2=dose_mg*2",
               "walk=activity=0.5", "rest=activity=0"),
}
# The scenarios that change one control alone, by figure name: (twin, control column).
ALONE = {"insulin_only": ("glucose", "insulin_u")}
# The state a clinician keeps in range, and the range.
BANDS = {"glucose": ("glucose_mgdl", 70.0, 180.0), "cardio": ("sbp_mmhg", 90.0, 140.0)}
# Decision times, minutes after midnight: half an hour before the usual meals (glucose) or
# around the usual doses and activity (cardio), so treatments act within the forecast hour.
DECISION_CLOCK = {"glucose": (7 * 60, 12 * 60, 18 * 60 + 30), "cardio": (7 * 60 + 30, 13 * 60, 18 * 60)}
# Differences in the truth smaller than this (state units) are ties: no ranking to agree with.
TIE = 1.0
# Issue 12's targets for the federated DP twin, by twin and world (lower bounds, fractions)...
DIRECTION_TARGET = {"glucose": {"bergman": 0.95, "hovorka": 0.90}, "cardio": {"baroreflex": 0.97}}
RANKING_TARGET = {"glucose": {"bergman": 0.90, "hovorka": 0.85}, "cardio": {"baroreflex": 0.90}}
# ... and the effect RMSE's, by state (an upper bound, over the hour).
EFFECT_RMSE_TARGET = {"glucose_mgdl": 8.0}
REGIMES = ("federated_dp", "central")
# Hours out: how far each case is rolled forward, the hours its effects are scored at, and the
# relative error's target at the first of them (glucose twin, federated DP, both worlds).
LONG_HOURS = 8
LONG_AT_HOURS = (4, 8)
LONG_RELATIVE_TARGET = {"glucose": {"glucose_mgdl": 0.20}}


def run(ws: Workspace, sizes: Sizes) -> dict:
    return each_world(ws, sizes, run_world, twins=SCENARIOS)


def alone(scenarios: list, twin: str) -> dict[str, list[str]]:
    """Figure name -> the scenarios that change only that control (``ALONE``)."""
    return {name: [s.name for s in scenarios if s.ops and all(op.column == col for op in s.ops)]
            for name, (t, col) in ALONE.items() if t == twin}


def run_world(ws: Workspace, sizes: Sizes, twin: str, world: str) -> dict:
    from twinfed.models.cohort import cohort_simulator, read_truth
    from twinfed.models.site_data import load_site
    from twinfed.models.twin import Twin
    from twinfed.models.whatif import parse_scenario, run_whatif

    from twinfed.errors import ScenarioError

    cohort = world_cohort(ws, sizes, twin, world)
    spec = ws.spec(cohort)
    scenarios = [parse_scenario(s, spec) for s in SCENARIOS[twin]]
    names = [s.name for s in scenarios]
    models = {regime: Twin.load(trained(ws, sizes, twin, world, regime)) for regime in REGIMES}
    holdout = load_site(cohort / HOLDOUT, spec)
    ids, params = read_truth(cohort / "truth" / f"{HOLDOUT}.csv")
    row_of = {pid: i for i, pid in enumerate(ids)}
    s_count, k = len(spec.states), spec.horizon_steps
    chosen = sorted(set(np.linspace(0, holdout.n_patients - 1, min(sizes.whatif_patients, holdout.n_patients))
                        .round().astype(int).tolist()))

    ws.progress(f"  what-if {twin} ({world}): {len(chosen)} patients x {len(sizes.whatif_days)} day(s)")
    cases = []  # one per (patient, decision time) with every scenario's forecasts and controls
    skipped = 0
    seconds = {r: 0.0 for r in models}
    sources = {r: {} for r in models}  # where each twin's core parameters came from, counted
    for p in chosen:
        pid = holdout.patient_ids[p]
        sl = holdout.patient_slice(p)
        first = int(holdout.steps[sl][0])
        for day in sizes.whatif_days:
            for clock in DECISION_CLOCK[twin]:
                at = float(day * 1440 + clock)
                runs = {}
                try:
                    for r, m in models.items():
                        t0 = time.perf_counter()
                        runs[r] = run_whatif(m, holdout, pid, at, scenarios)
                        seconds[r] += time.perf_counter() - t0
                except ScenarioError:
                    skipped += 1
                    continue
                any_run = next(iter(runs.values()))
                if not any_run.recorded_future_known:
                    skipped += 1
                    continue
                for r, run in runs.items():
                    src = run.parameters_from or "not a hybrid"
                    sources[r][src] = sources[r].get(src, 0) + 1
                h = int(round(at / spec.step_minutes)) - first
                cases.append({"patient": p, "pid": pid, "at": at, "h": h, "slice": sl,
                              "history": any_run.history, "history_minutes": any_run.history_minutes,
                              "minutes": any_run.minutes, "controls": any_run.controls,
                              "forecasts": {r: run.forecasts for r, run in runs.items()}})
    if not cases:
        raise RuntimeError(f"what-if ({twin}, {world}): no decision time fits the held-out records; "
                           "use more days")

    # The truth: the world's simulator replays every (case, scenario) at once, noise-free, up
    # to the end of each case's horizon (what comes later cannot change the past).
    rows = [(c, n) for c in cases for n in names]
    t_max = max(c["h"] + k + 1 for c in cases)
    controls = {col: np.zeros((len(rows), t_max)) for col in spec.control_columns}
    for i, (c, n) in enumerate(rows):
        recorded = holdout.series[c["slice"], s_count:].astype(np.float64)
        full = recorded[: c["h"] + k + 1].copy()
        full[c["h"] + 1: c["h"] + 1 + k] = c["controls"][n]
        for j, col in enumerate(spec.control_columns):
            controls[col][i, : len(full)] = full[:, j]
    prow = np.array([row_of[c["pid"]] for c, _ in rows])
    states = cohort_simulator(cohort).simulate({name: v[prow] for name, v in params.items()}, controls,
                                               step_minutes=spec.step_minutes)
    truth = {}
    for i, (c, n) in enumerate(rows):
        truth[(id(c), n)] = np.stack([states[col][i, c["h"] + 1: c["h"] + 1 + k]
                                      for col in spec.state_columns], axis=1)

    band_col, lo, hi = BANDS[twin]
    b = spec.state_columns.index(band_col)
    base = {"twin": twin, "world": world, "simulator": world, "mismatch_world": world != sizes.worlds[twin][0],
            "cases": len(cases), "patients": len(chosen), "skipped_decision_times": skipped,
            "decision_clock_minutes": list(DECISION_CLOCK[twin]), "days": list(sizes.whatif_days),
            "scenarios": list(SCENARIOS[twin]), "horizon_minutes": spec.horizon_minutes,
            "truth": "the world's simulator replayed for the same patient and treatment, without "
                     "sensor noise", "target_range": [lo, hi], "range_state": band_col}
    subsets = alone(scenarios, twin)
    out: dict = {}
    for regime in models:
        dp = regime == "federated_dp"
        cond = base | {"model": f"federated DP, epsilon {reference_epsilon():g} per site" if dp else
                       f"centralised, no DP: {central_kind(ws, twin, world)} (the better on "
                       f"{spec.state_columns[0]})",
                       "model_kind": models[regime].plan.model.kind, "core_parameters_from": sources[regime],
                       "whatif_seconds_per_case": round(seconds[regime] / len(cases), 3)}
        pred = {(id(c), n): c["forecasts"][regime][n] for c in cases for n in names}
        alts = [n for n in names if n != "recorded"]
        for j, col in enumerate(spec.state_columns):
            unit = spec.states[j].unit
            for n in names:
                err = np.concatenate([pred[(id(c), n)][:, j] - truth[(id(c), n)][:, j] for c in cases])
                out[f"{twin}.{world}.{regime}.counterfactual_rmse.{col}.{n}"] = figure(_rms(err), unit, conditions=cond)
            err = np.concatenate([pred[(id(c), n)][:, j] - truth[(id(c), n)][:, j] for c in cases for n in alts])
            out[f"{twin}.{world}.{regime}.counterfactual_rmse.{col}.all_alternatives"] = figure(
                _rms(err), unit, conditions=cond)
            eff = np.stack([(pred[(id(c), n)][:, j] - pred[(id(c), "recorded")][:, j])
                            - (truth[(id(c), n)][:, j] - truth[(id(c), "recorded")][:, j])
                            for c in cases for n in alts])
            target = EFFECT_RMSE_TARGET.get(col) if dp else None
            out[f"{twin}.{world}.{regime}.effect_rmse.{col}.all_alternatives"] = figure(
                _rms(eff), unit, target=target,
                conditions=cond | {"meaning": "error of (scenario - recorded), twin vs truth, over the hour"})
            out[f"{twin}.{world}.{regime}.effect_rmse_at_60min.{col}.all_alternatives"] = figure(
                _rms(eff[:, -1]), unit, conditions=cond | {
                    "meaning": f"error of (scenario - recorded), twin vs truth, at +{spec.horizon_minutes} min"})
        tir = _agreement(cases, names, pred, truth, b, lambda g: np.mean((g >= lo) & (g <= hi)), 0.5 / k)
        dist = _agreement(cases, names, pred, truth, b,
                          lambda g: np.mean(np.maximum(lo - g, 0) + np.maximum(g - hi, 0)), TIE)
        direction_target = DIRECTION_TARGET[twin][world]
        # label -> ((value, how many compared), target, scenarios compared, state)
        agreement = {"ranking_agreement.time_in_range": (tir, RANKING_TARGET[twin][world], names, band_col),
                     "ranking_agreement.range_distance": (dist, None, names, band_col),
                     "effect_direction_agreement": (_direction(cases, names, pred, truth, b), direction_target,
                                                    alts, band_col)}
        for label, subset in subsets.items():
            agreement[f"effect_direction_agreement.{label}"] = (
                _direction(cases, ["recorded", *subset], pred, truth, b), direction_target, subset, band_col)
        for j, col in enumerate(spec.state_columns):  # the other states' directions (cardio: heart rate)
            if j != b:
                agreement[f"effect_direction_agreement.{col}"] = (
                    _direction(cases, names, pred, truth, j), direction_target, alts, col)
        for label, ((value, n), target, used, col) in agreement.items():
            counted = "pairs" if label.startswith("ranking") else "effects"
            out[f"{twin}.{world}.{regime}.{label}"] = figure(
                value, "fraction", target=target if dp else None, at_least=True,
                conditions=cond | {counted: n, "scenarios_compared": list(used), "state": col})

    out.update(_hours_out(ws, twin, world, cohort, spec, models, holdout, params, row_of, cases, names, base))

    case = _plot_case(cases, twin)
    plot = ws.results / f"whatif_{twin}_{world}.png"
    plot_whatif_case({
        "history_minutes": case["history_minutes"], "history": case["history"][:, b].tolist(),
        "minutes": case["minutes"], "state": band_col, "unit": spec.states[b].unit, "band": (lo, hi),
        "title": f"{twin}, {world} world: held-out patient, {_clock(case['at'])}; federated DP twin "
                 f"(eps {reference_epsilon():g}) vs truth",
        "scenarios": {n: {"twin": case["forecasts"]["federated_dp"][n][:, b].tolist(),
                          "truth": truth[(id(case), n)][:, b].tolist()} for n in names},
    }, plot)
    ws.progress(f"  plot: {plot}")
    return out


def _hours_out(ws: Workspace, twin: str, world: str, cohort, spec, models: dict, holdout, params: dict,
               row_of: dict, cases: list[dict], names: list[str], base: dict) -> dict:
    """The effects ``LONG_AT_HOURS`` after each decision (see the module's docstring), per model
    and state: figures ``...effect_relative_error_at_{H}h.{state}.all_alternatives`` (and per
    alternative) and ``...effect_rmse_at_{H}h.{state}.all_alternatives``."""
    step, k, s_count = spec.step_minutes, spec.horizon_steps, len(spec.states)
    n_long = LONG_HOURS * 60 // step
    long_cases = []
    for c in cases:
        steps = holdout.steps[c["slice"]]
        if c["h"] + n_long < len(steps) and steps[c["h"] + n_long] - steps[c["h"]] == n_long:
            long_cases.append(c)
    if not long_cases:
        ws.progress(f"  what-if {twin} ({world}): no decision time has {LONG_HOURS} h of record after it; "
                    "no figures hours out")
        return {}
    controls = long_controls(long_cases, names, holdout, s_count, k, n_long)  # [A, P, T, C]
    truth = _long_truth(cohort, spec, holdout, params, row_of, long_cases, controls)  # [A, P, T, S]
    at_steps = np.array([int(round(c["at"] / step)) for c in long_cases])
    origins_rows = np.array([c["slice"].start + c["h"] for c in long_cases])
    patients = np.array([c["patient"] for c in long_cases])
    alts = [n for n in names if n != "recorded"]
    cond_long = base | {"long_cases": len(long_cases), "long_hours": LONG_HOURS, "tie": TIE,
                        "controls": f"each scenario's hour as in the what-if, then the recorded controls "
                                    f"to +{LONG_HOURS} h",
                        "truth": f"the world's simulator replayed {LONG_HOURS} h for the same patient and "
                                 "treatment, without sensor noise"}
    out: dict = {}
    for regime, model in models.items():
        t0 = time.perf_counter()
        pred = long_rollout(model, holdout, patients, origins_rows, at_steps, controls)  # [A, P, T, S]
        seconds = time.perf_counter() - t0
        cond = cond_long | {"model_kind": model.plan.model.kind,
                            "rollout_seconds_per_case": round(seconds / len(long_cases), 3)}
        for j, col in enumerate(spec.state_columns):
            unit = spec.states[j].unit
            for hours in LONG_AT_HOURS:
                i = hours * 60 // step - 1
                eff_twin = pred[1:, :, i, j] - pred[:1, :, i, j]  # [alternatives, cases]
                eff_true = truth[1:, :, i, j] - truth[:1, :, i, j]
                key = f"{twin}.{world}.{regime}"
                target = LONG_RELATIVE_TARGET.get(twin, {}).get(col) \
                    if regime == "federated_dp" and hours == LONG_AT_HOURS[0] else None
                rel, n_rel = relative_error(eff_twin, eff_true, TIE)
                out[f"{key}.effect_relative_error_at_{hours}h.{col}.all_alternatives"] = figure(
                    rel, "fraction", target=target, conditions=cond | {
                        "effects": n_rel, "scenarios_compared": alts,
                        "meaning": f"median over effects (patient x decision time x alternative, |true "
                                   f"effect| >= {TIE:g} {unit}) of |twin effect - true effect| / |true "
                                   f"effect| at +{hours} h; effect = scenario - recorded"})
                for a, n in enumerate(alts):
                    rel_n, n_n = relative_error(eff_twin[a:a + 1], eff_true[a:a + 1], TIE)
                    out[f"{key}.effect_relative_error_at_{hours}h.{col}.{n}"] = figure(
                        rel_n, "fraction", conditions=cond | {"effects": n_n})
                out[f"{key}.effect_rmse_at_{hours}h.{col}.all_alternatives"] = figure(
                    _rms(eff_twin - eff_true), unit, conditions=cond | {
                        "meaning": f"RMS error of (scenario - recorded), twin vs truth, at +{hours} h"})
    return out


def long_controls(cases: list[dict], names: list[str], site, s_count: int, k: int, n_long: int) -> np.ndarray:
    """``[A, P, T, C]``: each case's controls under each scenario over ``n_long`` steps after its
    decision: the scenario's hour (``case["controls"]``, ``k`` steps), then the record."""
    out = np.zeros((len(names), len(cases), n_long, site.series.shape[1] - s_count), np.float32)
    for i, c in enumerate(cases):
        recorded = site.series[c["slice"], s_count:][c["h"] + 1: c["h"] + 1 + n_long]
        for a, n in enumerate(names):
            out[a, i] = recorded
            out[a, i, :k] = c["controls"][n]
    return out


def relative_error(eff_twin: np.ndarray, eff_true: np.ndarray, tie: float) -> tuple[float, int]:
    """The median of |twin - true| / |true| over the effects whose |true| reaches ``tie``, and how
    many there were (NaN when none)."""
    eff_twin, eff_true = np.ravel(eff_twin), np.ravel(eff_true)
    keep = np.abs(eff_true) >= tie
    if not keep.any():
        return math.nan, 0
    return float(np.median(np.abs(eff_twin[keep] - eff_true[keep]) / np.abs(eff_true[keep]))), int(keep.sum())


def long_rollout(twin, site, patients: np.ndarray, origin_rows: np.ndarray, at_steps: np.ndarray,
                 controls: np.ndarray) -> np.ndarray:
    """``[A, P, T, S]``: the twin rolled forward from each case's origin under each treatment
    (``controls[0]`` the recorded one, the usual care a hybrid's correction reads), a hybrid with
    the patient identified from the record up to the decision as the what-if does; an ensemble
    once per structure (draw d runs structure d mod M), averaged."""
    from twinfed.models.rollout import Origins, roll_forward
    from twinfed.models.trial import twin_structures

    offset = None
    if twin.hybrid:
        from twinfed.models.personalise import identify

        fitted = identify(twin.surrogate, site, patients, at_steps)
        offset = fitted.offset.detach()
    origins = Origins.at(site, patients, origin_rows)
    draws = max(1, len(twin_structures(twin)))
    states = roll_forward(twin, origins, controls, offset=offset, draws=draws)  # [A, P, D, T, S]
    return states.mean(axis=2)


def _long_truth(cohort, spec, site, params: dict, row_of: dict, cases: list[dict],
                controls: np.ndarray) -> np.ndarray:
    """``[A, P, T, S]``: the world's simulator replaying each case under each treatment's
    controls (``controls`` ``[A, P, T, C]`` after the decision, the record before it)."""
    from twinfed.models.cohort import cohort_simulator

    arms, p, n_long = controls.shape[:3]
    s_count = len(spec.states)
    t_len = max(c["h"] for c in cases) + n_long + 1
    full = {col: np.zeros((arms * p, t_len)) for col in spec.control_columns}
    for a in range(arms):
        for i, c in enumerate(cases):
            before = site.series[c["slice"], s_count:][: c["h"] + 1]
            for j, col in enumerate(spec.control_columns):
                full[col][a * p + i, : c["h"] + 1] = before[:, j]
                full[col][a * p + i, c["h"] + 1: c["h"] + 1 + n_long] = controls[a, i, :, j]
    prow = np.tile(np.array([row_of[c["pid"]] for c in cases]), arms)
    states = cohort_simulator(cohort).simulate({name: v[prow] for name, v in params.items()}, full,
                                               step_minutes=spec.step_minutes)
    out = np.zeros((arms, p, n_long, s_count))
    for a in range(arms):
        for i, c in enumerate(cases):
            out[a, i] = np.stack([states[col][a * p + i, c["h"] + 1: c["h"] + 1 + n_long]
                                  for col in spec.state_columns], axis=1)
    return out


def _rms(err: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(err)))) if err.size else math.nan


def _agreement(cases, names, pred, truth, j, score, tie) -> tuple[float, int]:
    """Share of treatment pairs the twin orders as the truth does, over pairs the truth does not
    tie; a twin tie where the truth has an order counts as disagreement."""
    agree = total = 0
    for c in cases:
        for a, b in itertools.combinations(names, 2):
            dt = score(truth[(id(c), a)][:, j]) - score(truth[(id(c), b)][:, j])
            if abs(dt) < tie:
                continue
            dp = score(pred[(id(c), a)][:, j]) - score(pred[(id(c), b)][:, j])
            total += 1
            agree += int(np.sign(dp) == np.sign(dt))
    return (agree / total if total else math.nan), total


def _direction(cases, names, pred, truth, j) -> tuple[float, int]:
    agree = total = 0
    for c in cases:
        for n in names:
            if n == "recorded":
                continue
            dt = float(np.mean(truth[(id(c), n)][:, j] - truth[(id(c), "recorded")][:, j]))
            if abs(dt) < TIE:
                continue
            dp = float(np.mean(pred[(id(c), n)][:, j] - pred[(id(c), "recorded")][:, j]))
            total += 1
            agree += int(np.sign(dp) == np.sign(dt))
    return (agree / total if total else math.nan), total


def _plot_case(cases: list[dict], twin: str) -> dict:
    """The first midday decision (the clearest meal-and-dose hour), else the first case."""
    midday = DECISION_CLOCK[twin][1]
    return next((c for c in cases if int(c["at"]) % 1440 == midday), cases[0])


def _clock(minutes: float) -> str:
    day, rem = divmod(int(minutes), 1440)
    return f"day {day + 1}, {rem // 60:02d}:{rem % 60:02d}"
