"""Virtual type 1 diabetes patients: glucose under subcutaneous insulin and carbohydrate.

Physiology: Bergman's minimal model for glucose (G, mg/dL) and remote insulin action (X, 1/min),
a two-compartment subcutaneous insulin depot (S1, S2, U) feeding plasma insulin (I, mU/L), and a
two-compartment gut (Q1, Q2, g) for carbohydrate (Hovorka et al. 2004 absorption; Bergman 1979
glucose kinetics). Plain care is open loop (basal every step, meal boluses from a carb ratio with
the patient's estimation errors, timing habits and missed doses: ``treatment``). Routine care,
the default, is care as records hold it: on top of that plan, some boluses late and the basal
rate changed for hours or for good (``routine_treatment``), and, closed loop, correction boluses
after high CGM readings and fast carbohydrate after low ones (``GlucoseCare``, which ``simulate``
asks once per step). The controls recorded are the ones given, so replaying ``simulate`` with
changed controls is the exact counterfactual. Only the CGM reading carries noise.

The site profiles (with routine care's habits, ``ROUTINE_CARE``), the care policies, the CGM
(``cgm_reading``) and the cohort assembly (``open_loop_cohort``) are shared with the other type 1
diabetes simulator (:mod:`twinfed.models.sim.hovorka_sim`), so two cohorts made with the same
seed differ in physiology only.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from twinfed.models.sim.base import SimCohort, SiteProfile, check_care, child_rng, lognormal

SUBSTEP_MIN = 1.0
# A pump delivers at most this much insulin in one step (the glucose spec's range): a patient
# whose bolus would exceed it gets the most the pump gives, and their record stays loadable.
PUMP_MAX_U_PER_STEP = 100.0
CGM_RANGE = (40.0, 400.0)
CARBS_MAX_G_PER_STEP = 300.0  # the glucose spec's range: routine care's fast carbs never exceed it

# Routine care's habits (``care="routine"``), per site. Per meal or snack bolus: ``p_late`` the
# chance it is given late, ``late_lo``..``late_hi`` minutes after eating. Corrections: a reading
# above ``correct_above`` mg/dL with no bolus for ``correct_lockout`` minutes is corrected down to
# ``correct_target`` with the prescribed sensitivity (off the true one by ``isf_error``, log
# scale); ``p_notice_high`` is the chance per step that such a reading is acted on. Hypoglycaemia:
# a reading below ``hypo_below`` gets ``hypo_lo``..``hypo_hi`` g of fast carbohydrate (chance per
# step ``p_notice_low``), not again for ``hypo_lockout_lo``..``hypo_lockout_hi`` minutes.
# Temporary basal rates: on ``temp_basal_per_day`` of days, the rate is changed by
# ``temp_basal_lo``..``temp_basal_hi`` (either way) for ``temp_basal_min_lo``..``temp_basal_min_hi``
# minutes; a lasting change of the prescribed rate (by ``basal_change_lo``..``basal_change_hi``,
# either way) starts on ``basal_change_per_day`` of days.
ROUTINE_CARE: dict[str, dict[str, float]] = {
    "paediatric": {"p_late": 0.15, "correct_target": 150.0, "p_notice_high": 0.15, "hypo_lo": 10.0,
                   "hypo_hi": 15.0, "temp_basal_per_day": 0.20, "basal_change_per_day": 0.04},
    "adult": {"p_late": 0.05, "correct_target": 120.0, "p_notice_high": 0.25, "hypo_lo": 15.0,
              "hypo_hi": 20.0, "temp_basal_per_day": 0.10, "basal_change_per_day": 0.02},
    "elderly": {"p_late": 0.10, "correct_target": 150.0, "p_notice_high": 0.10, "hypo_lo": 15.0,
                "hypo_hi": 20.0, "temp_basal_per_day": 0.05, "basal_change_per_day": 0.02},
}
ROUTINE_COMMON: dict[str, float] = {
    "late_lo": 30.0, "late_hi": 90.0, "correct_above": 250.0, "correct_lockout": 180.0,
    "isf_error": 0.20, "hypo_below": 70.0, "p_notice_low": 0.6, "hypo_lockout_lo": 15.0,
    "hypo_lockout_hi": 20.0, "temp_basal_lo": 0.20, "temp_basal_hi": 0.30, "temp_basal_min_lo": 120.0,
    "temp_basal_min_hi": 480.0, "basal_change_lo": 0.10, "basal_change_hi": 0.20,
}

SITE_PROFILES: tuple[SiteProfile, ...] = (
    SiteProfile("paediatric", "children and adolescents: erratic meals, late and missed boluses",
                {"weight_lo": 15, "weight_hi": 60, "age_lo": 4, "age_hi": 17, "si_scale": 1.2,
                 "snacks_per_day": 2.0, "p_miss": 0.15, "bolus_offset": 10.0, "carb_error": 0.30,
                 "meal_jitter": 60.0, "basal_error": 0.20,
                 **ROUTINE_COMMON, **ROUTINE_CARE["paediatric"]}),
    SiteProfile("adult", "adults: regular meals, pre-meal boluses",
                {"weight_lo": 60, "weight_hi": 110, "age_lo": 18, "age_hi": 64, "si_scale": 1.0,
                 "snacks_per_day": 1.0, "p_miss": 0.05, "bolus_offset": -10.0, "carb_error": 0.20,
                 "meal_jitter": 45.0, "basal_error": 0.12,
                 **ROUTINE_COMMON, **ROUTINE_CARE["adult"]}),
    SiteProfile("elderly", "older adults: lower insulin sensitivity, small regular meals, late boluses",
                {"weight_lo": 55, "weight_hi": 95, "age_lo": 65, "age_hi": 90, "si_scale": 0.7,
                 "snacks_per_day": 0.5, "p_miss": 0.10, "bolus_offset": 15.0, "carb_error": 0.20,
                 "meal_jitter": 30.0, "basal_error": 0.15,
                 **ROUTINE_COMMON, **ROUTINE_CARE["elderly"]}),
)

PARAM_NAMES: tuple[str, ...] = ("weight_kg", "p1", "p2", "si", "gb", "tau_i", "ke", "tau_m", "f_bio",
                                "ib", "basal_u_per_h")


def draw_params(profile: SiteProfile, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    s = profile.settings
    weight = rng.uniform(s["weight_lo"], s["weight_hi"], n)
    ke = lognormal(rng, 0.138, 0.15, n)  # plasma insulin clearance, 1/min (Hovorka)
    v_i = 0.12 * weight  # insulin distribution volume, L
    ideal_basal = lognormal(rng, 0.018, 0.2, n) * weight  # U/h that holds X at 0
    ib = ideal_basal / 60.0 * 1000.0 / (v_i * ke)  # plasma insulin at the ideal basal, mU/L
    return {
        "weight_kg": weight,
        "p1": lognormal(rng, 0.008, 0.25, n),  # glucose effectiveness, 1/min
        "p2": lognormal(rng, 0.025, 0.2, n),  # remote insulin action decay, 1/min
        "si": lognormal(rng, 4.5e-4 * s["si_scale"], 0.3, n),  # insulin sensitivity, L/mU/min
        "gb": lognormal(rng, 140.0, 0.12, n),  # glucose at the ideal basal, mg/dL
        "tau_i": lognormal(rng, 55.0, 0.2, n),  # subcutaneous absorption, min
        "ke": ke,
        "tau_m": lognormal(rng, 40.0, 0.2, n),  # gut absorption, min
        "f_bio": np.clip(rng.normal(0.8, 0.05, n), 0.6, 0.95),  # carbohydrate bioavailability
        "ib": ib,
        "basal_u_per_h": ideal_basal * np.exp(rng.normal(0.0, s["basal_error"], n)),
    }


def carb_ratio(params: dict[str, np.ndarray], g_ref: float = 140.0) -> np.ndarray:
    """Grams of carbohydrate one unit of insulin covers for this patient (the 'ideal' ratio)."""
    v_g = 1.6 * params["weight_kg"]
    v_i = 0.12 * params["weight_kg"]
    drop_per_unit = params["si"] * g_ref * 1000.0 / (v_i * params["ke"])  # mg/dL per U
    return drop_per_unit * v_g / (params["f_bio"] * 1000.0)


def treatment(profile: SiteProfile, *, weight_kg: np.ndarray, basal_u_per_h: np.ndarray,
              carb_ratio_g_per_u: np.ndarray, n_steps: int, step_minutes: int,
              rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Open-loop meals and insulin for every patient: [P, T] amounts per step (plain care).

    ``basal_u_per_h`` is the prescribed basal rate; ``carb_ratio_g_per_u`` the ratio that would
    cover a meal for this patient's physiology (the prescribed one deviates from it)."""
    controls, _, _ = _plan(profile, weight_kg=weight_kg, basal_u_per_h=basal_u_per_h,
                           carb_ratio_g_per_u=carb_ratio_g_per_u, n_steps=n_steps,
                           step_minutes=step_minutes, rng=rng, routine_rng=None)
    return controls


def routine_treatment(profile: SiteProfile, *, weight_kg: np.ndarray, basal_u_per_h: np.ndarray,
                      carb_ratio_g_per_u: np.ndarray, n_steps: int, step_minutes: int,
                      rng: np.random.Generator, routine_rng: np.random.Generator
                      ) -> tuple[dict[str, np.ndarray], GlucoseCare]:
    """Routine care: the plan decided beforehand ([P, T] amounts: the same meals, estimates and
    missed boluses ``treatment`` draws from ``rng``, with some boluses late and the basal rate
    changed, temporarily or for good) and the closed-loop care ``simulate`` runs on top of it
    (corrections and hypoglycaemia treatment). Routine care's own draws come from
    ``routine_rng``, so ``rng`` is left as ``treatment`` would leave it."""
    controls, bolus_steps, log = _plan(profile, weight_kg=weight_kg, basal_u_per_h=basal_u_per_h,
                                       carb_ratio_g_per_u=carb_ratio_g_per_u, n_steps=n_steps,
                                       step_minutes=step_minutes, rng=rng, routine_rng=routine_rng)
    s = profile.settings
    # The prescribed sensitivity (mg/dL per U): what a unit does to glucose if a gram of carbs
    # raises it by 1000 * 0.8 / (1.6 dL/kg * weight) mg/dL, times the ideal carb ratio; off, like
    # every prescription.
    isf = carb_ratio_g_per_u * 500.0 / weight_kg * np.exp(routine_rng.normal(0.0, s["isf_error"], weight_kg.size))
    care = GlucoseCare(s, isf_mgdl_per_u=isf, bolus_steps=bolus_steps, step_minutes=step_minutes,
                       rng=routine_rng, log=log)
    return controls, care


def _plan(profile: SiteProfile, *, weight_kg: np.ndarray, basal_u_per_h: np.ndarray,
          carb_ratio_g_per_u: np.ndarray, n_steps: int, step_minutes: int, rng: np.random.Generator,
          routine_rng: np.random.Generator | None
          ) -> tuple[dict[str, np.ndarray], np.ndarray | None, dict[str, np.ndarray]]:
    """The care decided before simulating, the steps holding a meal or snack bolus (routine care
    only) and what routine care changed per patient. Without ``routine_rng``: plain care, drawn
    exactly as before routine care existed."""
    s = profile.settings
    n = weight_kg.size
    days = int(np.ceil(n_steps * step_minutes / 1440.0))
    carbs = np.zeros((n, n_steps))
    insulin = np.repeat((basal_u_per_h * step_minutes / 60.0)[:, None], n_steps, axis=1)
    routine = routine_rng is not None
    bolus_steps = np.zeros((n, n_steps), dtype=bool) if routine else None
    log = {k: np.zeros(n, dtype=np.int64) for k in ("meal_boluses", "late_boluses")} if routine else {}
    if routine:
        insulin = insulin * _basal_changes(s, n, n_steps, step_minutes, routine_rng, log)
    size = np.sqrt(weight_kg / 70.0)  # smaller people eat smaller meals
    icr = carb_ratio_g_per_u * np.exp(rng.normal(0.0, 0.15, n))  # the prescribed ratio is imperfect
    meals = [(7.5 * 60, 55.0), (12.5 * 60, 70.0), (19.0 * 60, 80.0)]
    if profile.name == "elderly":
        meals = [(m, g * 0.75) for m, g in meals]

    def add(minute: np.ndarray, grams: np.ndarray, p_bolus: float) -> None:
        step = (minute // step_minutes).astype(int)
        ok = (step >= 0) & (step < n_steps)
        rows = np.flatnonzero(ok)
        np.add.at(carbs, (rows, step[ok]), grams[ok])
        estimate = grams * np.exp(rng.normal(0.0, s["carb_error"], n))
        bolus_min = minute + rng.normal(s["bolus_offset"], 10.0, n)
        late = np.zeros(n, dtype=bool)
        if routine:  # some boluses come well after the meal (forgotten, remembered later)
            late = routine_rng.random(n) < s["p_late"]
            bolus_min = np.where(late, minute + routine_rng.uniform(s["late_lo"], s["late_hi"], n), bolus_min)
        b_step = (bolus_min // step_minutes).astype(int)
        give = ok & (rng.random(n) < p_bolus) & (b_step >= 0) & (b_step < n_steps)
        rows = np.flatnonzero(give)
        np.add.at(insulin, (rows, b_step[give]), np.round(estimate[give] / icr[give] * 2) / 2)
        if routine:
            bolus_steps[rows, b_step[give]] = True
            log["meal_boluses"] += give
            log["late_boluses"] += give & late

    for d in range(days):
        for base, grams in meals:
            minute = d * 1440 + base + rng.normal(0.0, s["meal_jitter"], n)
            add(minute, grams * size * np.exp(rng.normal(0.0, 0.25, n)), 1.0 - s["p_miss"])
        n_snacks = rng.poisson(s["snacks_per_day"], n)
        for k in range(int(n_snacks.max(initial=0))):
            has = n_snacks > k
            minute = np.where(has, d * 1440 + rng.uniform(9 * 60, 22 * 60, n), -1e9)
            add(minute, rng.uniform(10, 30, n) * size, 0.5)
    return {"insulin_u": np.minimum(insulin, PUMP_MAX_U_PER_STEP), "carbs_g": carbs}, bolus_steps, log


def _basal_changes(s: dict[str, float], n: int, n_steps: int, step_minutes: int,
                   rng: np.random.Generator, log: dict[str, np.ndarray]) -> np.ndarray:
    """[P, T] factors on the prescribed basal rate: temporary rates (exercise, illness) on some
    days, and lasting changes of the prescription from some day on."""
    days = int(np.ceil(n_steps * step_minutes / 1440.0))
    factor = np.ones((n, n_steps))
    minute = np.arange(n_steps)[None, :] * step_minutes
    log["temp_basals"] = np.zeros(n, dtype=np.int64)
    log["basal_changes"] = np.zeros(n, dtype=np.int64)
    for d in range(days):
        has = rng.random(n) < s["temp_basal_per_day"]
        start = d * 1440 + rng.uniform(0, 1440, n)
        stop = start + rng.uniform(s["temp_basal_min_lo"], s["temp_basal_min_hi"], n)
        change = rng.choice([-1.0, 1.0], n) * rng.uniform(s["temp_basal_lo"], s["temp_basal_hi"], n)
        on = has[:, None] & (minute >= start[:, None]) & (minute < stop[:, None])
        factor = np.where(on, factor * (1.0 + change[:, None]), factor)
        log["temp_basals"] += has & on.any(axis=1)
        lasting = rng.random(n) < s["basal_change_per_day"]
        start = d * 1440 + rng.uniform(0, 1440, n)
        change = np.exp(rng.choice([-1.0, 1.0], n) * rng.uniform(s["basal_change_lo"], s["basal_change_hi"], n))
        on = lasting[:, None] & (minute >= start[:, None])
        factor = np.where(on, factor * change[:, None], factor)
        log["basal_changes"] += lasting & on.any(axis=1)
    return factor


class GlucoseCare:
    """Routine care that reacts to the CGM (closed loop): ``simulate`` calls it once per step with
    the reading of the step before and adds the insulin (U) and fast carbohydrate (g) it returns.

    A correction: a reading above ``correct_above`` with no bolus (planned, or a correction) for
    ``correct_lockout`` minutes, acted on with chance ``p_notice_high`` per step, gives
    (reading - ``correct_target``) / prescribed sensitivity, rounded to 0.5 U. A hypoglycaemia
    treatment: a reading below ``hypo_below``, acted on with chance ``p_notice_low`` per step,
    gives ``hypo_lo``..``hypo_hi`` g, and none follows within ``hypo_lockout_lo``..``hypo_lockout_hi``
    minutes. ``log`` counts what care did per patient."""

    def __init__(self, settings: dict[str, float], *, isf_mgdl_per_u: np.ndarray, bolus_steps: np.ndarray,
                 step_minutes: int, rng: np.random.Generator, log: dict[str, np.ndarray] | None = None):
        self.s = settings
        self.isf = isf_mgdl_per_u
        self.bolus_steps = bolus_steps
        self.step_minutes = step_minutes
        self.rng = rng
        n = isf_mgdl_per_u.size
        self.last_bolus = np.full(n, -10**9)
        self.no_hypo_before = np.zeros(n)
        self.lockout = settings["correct_lockout"] / step_minutes
        self.log = dict(log or {})
        self.log |= {"corrections": np.zeros(n, dtype=np.int64), "correction_u": np.zeros(n),
                     "hypo_treatments": np.zeros(n, dtype=np.int64), "hypo_carbs_g": np.zeros(n)}

    def __call__(self, t: int, reading: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s, n = self.s, reading.size
        self.last_bolus = np.where(self.bolus_steps[:, t], t, self.last_bolus)
        units = np.round((reading - s["correct_target"]) / self.isf * 2) / 2
        correct = ((reading > s["correct_above"]) & (t - self.last_bolus >= self.lockout)
                   & (units >= 0.5) & (self.rng.random(n) < s["p_notice_high"]))
        insulin = np.where(correct, units, 0.0)
        self.last_bolus = np.where(correct, t, self.last_bolus)
        low = (reading < s["hypo_below"]) & (t >= self.no_hypo_before) & (self.rng.random(n) < s["p_notice_low"])
        grams = np.where(low, np.round(self.rng.uniform(s["hypo_lo"], s["hypo_hi"], n)), 0.0)
        wait = self.rng.uniform(s["hypo_lockout_lo"], s["hypo_lockout_hi"], n) / self.step_minutes
        self.no_hypo_before = np.where(low, t + wait, self.no_hypo_before)
        self.log["corrections"] += correct
        self.log["correction_u"] += insulin
        self.log["hypo_treatments"] += low
        self.log["hypo_carbs_g"] += grams
        return insulin, grams


def give_care(care: GlucoseCare, t: int, reading: np.ndarray, insulin: np.ndarray, carbs: np.ndarray) -> None:
    """Add what ``care`` gives at step ``t`` (from the reading before it) to the controls, within
    the spec's ranges."""
    more_insulin, more_carbs = care(t, reading)
    insulin[:, t] = np.minimum(insulin[:, t] + more_insulin, PUMP_MAX_U_PER_STEP)
    carbs[:, t] = np.minimum(carbs[:, t] + more_carbs, CARBS_MAX_G_PER_STEP)


def simulate(params: dict[str, np.ndarray], controls: dict[str, np.ndarray], *,
             step_minutes: int = 5, rng: np.random.Generator | None = None,
             care: GlucoseCare | None = None):
    """Glucose [P, T] at the end of each step, from parameters and amounts given per step.

    With ``care`` (closed loop): before each step, ``care`` sees the CGM reading of the step
    before and adds insulin and carbs to the step; returns the states and the controls actually
    given (``controls`` is left unchanged). Without it: the states alone, open loop."""
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    insulin = np.asarray(controls["insulin_u"], dtype=np.float64)
    carbs = np.asarray(controls["carbs_g"], dtype=np.float64)
    n, n_steps = insulin.shape
    if care is not None:
        insulin, carbs = insulin.copy(), carbs.copy()
        noise = _cgm_noise(rng, n, n_steps) if rng is not None else np.zeros((n, n_steps))
    v_g = 1.6 * p["weight_kg"]  # dL
    v_i = 0.12 * p["weight_kg"]  # L
    basal = p["basal_u_per_h"] / 60.0  # U/min
    # Steady state under the patient's basal rate, without food: a pure function of the params.
    s1 = basal * p["tau_i"]
    s2 = s1.copy()
    i_pl = basal * 1000.0 / (v_i * p["ke"])
    x = p["si"] * (i_pl - p["ib"])
    g = p["p1"] * p["gb"] / np.maximum(p["p1"] + x, 1e-4)
    q1 = np.zeros(n)
    q2 = np.zeros(n)
    out = np.empty((n, n_steps))
    sub = int(round(step_minutes / SUBSTEP_MIN))
    dt = step_minutes / sub
    for t in range(n_steps):
        if care is not None and t > 0:
            give_care(care, t, np.clip(out[:, t - 1] + noise[:, t - 1], *CGM_RANGE), insulin, carbs)
        u_ins = insulin[:, t] / step_minutes  # U/min, delivered evenly over the step
        u_carb = carbs[:, t] / step_minutes  # g/min
        for _ in range(sub):
            ra = p["f_bio"] * q2 / p["tau_m"] * 1000.0 / v_g  # mg/dL/min
            dg = -(p["p1"] + x) * g + p["p1"] * p["gb"] + ra
            dx = -p["p2"] * x + p["p2"] * p["si"] * (i_pl - p["ib"])
            di = s2 / p["tau_i"] * 1000.0 / v_i - p["ke"] * i_pl
            ds1 = u_ins - s1 / p["tau_i"]
            ds2 = (s1 - s2) / p["tau_i"]
            dq1 = u_carb - q1 / p["tau_m"]
            dq2 = (q1 - q2) / p["tau_m"]
            g = np.maximum(g + dt * dg, 10.0)
            x = x + dt * dx
            i_pl = np.maximum(i_pl + dt * di, 0.0)
            s1 = s1 + dt * ds1
            s2 = s2 + dt * ds2
            q1 = q1 + dt * dq1
            q2 = q2 + dt * dq2
        out[:, t] = g
    if care is not None:
        return {"glucose_mgdl": np.clip(out + noise, *CGM_RANGE)}, {"insulin_u": insulin, "carbs_g": carbs}
    return {"glucose_mgdl": cgm_reading(out, rng)}


def cgm_reading(glucose_mgdl: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
    """What the sensor exports for true glucose [P, T]: with noise when ``rng`` is given (the
    noise-free replay passes none), always within the sensor's range."""
    if rng is not None:
        glucose_mgdl = glucose_mgdl + _cgm_noise(rng, *glucose_mgdl.shape)
    return np.clip(glucose_mgdl, *CGM_RANGE)


def _cgm_noise(rng: np.random.Generator, n: int, n_steps: int) -> np.ndarray:
    """Correlated sensor error (AR(1), ~6 mg/dL) plus a little white noise."""
    phi, sd = 0.7, 6.0
    e = rng.normal(0.0, sd * np.sqrt(1 - phi**2), (n, n_steps))
    ar = np.empty_like(e)
    ar[:, 0] = rng.normal(0.0, sd, n)
    for t in range(1, n_steps):
        ar[:, t] = phi * ar[:, t - 1] + e[:, t]
    return ar + rng.normal(0.0, 2.0, (n, n_steps))


def generate(profile: SiteProfile, n_patients: int, n_steps: int, *, step_minutes: int = 5,
             rng: np.random.Generator, id_prefix: str = "p", care: str = "routine") -> SimCohort:
    params = draw_params(profile, n_patients, rng)
    return open_loop_cohort(profile, params, carb_ratio(params), simulate, n_steps,
                            step_minutes=step_minutes, rng=rng, id_prefix=id_prefix, care=care)


def open_loop_cohort(profile: SiteProfile, params: dict[str, np.ndarray], carb_ratio_g_per_u: np.ndarray,
                     simulate_fn: Callable[..., dict[str, np.ndarray]], n_steps: int, *, step_minutes: int,
                     rng: np.random.Generator, id_prefix: str, care: str = "routine") -> SimCohort:
    """A type 1 diabetes site once its patients' physiology is drawn: ages, the site's care
    (``params`` holds ``weight_kg`` and the prescribed ``basal_u_per_h``; ``care`` one of
    ``CARE_POLICIES``: routine, partly closed loop, or plain, open loop) and the CGM trace
    ``simulate_fn`` gives under it. The controls recorded are the ones given."""
    check_care(care)
    s = profile.settings
    n_patients = params["weight_kg"].size
    age = rng.uniform(s["age_lo"], s["age_hi"], n_patients).round()
    plan = dict(weight_kg=params["weight_kg"], basal_u_per_h=params["basal_u_per_h"],
                carb_ratio_g_per_u=carb_ratio_g_per_u, n_steps=n_steps, step_minutes=step_minutes, rng=rng)
    log: dict[str, np.ndarray] = {}
    if care == "plain":
        controls = treatment(profile, **plan)
        states = simulate_fn(params, controls, step_minutes=step_minutes, rng=rng)
    else:
        planned, policy = routine_treatment(profile, **plan, routine_rng=child_rng(rng))
        states, controls = simulate_fn(params, planned, step_minutes=step_minutes, rng=rng, care=policy)
        log = policy.log
    return SimCohort(
        patient_ids=[f"{id_prefix}{i:05d}" for i in range(n_patients)],
        covariates={"weight_kg": params["weight_kg"], "age_years": age},
        params=params, states=states, controls=controls, care_log=log,
    )
