"""Virtual type 1 diabetes patients after Hovorka et al. (2004): the structural-mismatch simulator.

The glucose twin's mechanistic core belongs to the Bergman minimal-model family, like
:mod:`twinfed.models.sim.glucose_sim`, so cohorts from that simulator cannot tell a good twin
from a good guess of our own equations. This simulator makes the same kind of data (the glucose
twin's spec: glucose in mg/dL, insulin in U and carbohydrate in g per step, weight and age) from
a model of a different structure: two glucose compartments, three separate insulin actions,
thresholds for insulin-independent uptake and renal clearance.

Source: R. Hovorka, V. Canonico, L. J. Chassin et al., "Nonlinear model predictive control of
glucose concentration in subjects with type 1 diabetes", Physiol. Meas. 25:905-920 (2004): the
model's equations, and Table 1 for the insulin and gut kinetics and the volumes (ke, tmaxI,
tmaxG, AG, VI, VG). The glucose fluxes and insulin actions (EGP0, F01, k12, ka1..3, SIT, SID, SIE)
take the medians of the type 1 diabetes virtual population of M. E. Wilinska et al.,
"Simulation environment to evaluate closed-loop insulin delivery systems in type 1 diabetes",
J. Diabetes Sci. Technol. 4:132-144 (2010); Table 1's values there would hold fasting glucose
with half that population's basal insulin, less than people with type 1 diabetes use. Spreads
are log-normal, cut at 2.5 log-scale SDs. Time in minutes, glucose in mmol, insulin in mU,
per-kg quantities times weight:

    glucose  dQ1/dt = -F01c - x1 Q1 + k12 Q2 - FR + UG + EGP0 max(0, 1 - x3),   G = Q1 / VG
             dQ2/dt = x1 Q1 - (k12 + x2) Q2
             F01c = F01 min(G, 4.5) / 4.5;   FR = 0.003 (G - 9) VG above 9 mmol/L, else 0
    action   dxk/dt = -kak xk + kbk I, kbk = SIk kak   (k = 1 transport, 2 disposal, 3 EGP;
                                                        SI1..3 = SIT, SID, SIE)
    insulin  dS1/dt = u - S1/tmaxI;  dS2/dt = (S1 - S2)/tmaxI;  dI/dt = S2/(tmaxI VI) - ke I
    gut      dD1/dt = AG d - D1/tmaxG;  dD2/dt = (D1 - D2)/tmaxG;  UG = D2/tmaxG

One departure: endogenous production is kept at or above zero (the paper's EGP0 (1 - x3) turns
negative at high insulin, which no liver does). Care follows each patient's own physiology: the
basal rate is the one whose fasting steady state is the patient's ``gb_mmol`` (basal is titrated
to fasting glucose, so the site's basal error spreads that glucose), and the carb ratio is the one
that brings glucose back to fasting five hours after a test meal (``carb_ratio``).

Site profiles, care (plain, or routine with its closed-loop corrections and hypoglycaemia
treatment) and the CGM are glucose_sim's (imported, not copied): the two simulators differ in
physiology only. Replaying ``simulate`` with changed controls is the exact, noise-free
counterfactual.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from twinfed.models.sim.base import SimCohort, SiteProfile, lognormal
from twinfed.models.sim.glucose_sim import SITE_PROFILES  # noqa: F401  (the same sites and care habits)
from twinfed.models.sim.glucose_sim import (CGM_RANGE, GlucoseCare, _cgm_noise, cgm_reading, give_care,
                                             open_loop_cohort)

SUBSTEP_MIN = 1.0
MGDL_PER_MMOL = 18.0
MMOL_PER_G = 1000.0 / 180.16  # glucose
F01_BELOW = 4.5  # mmol/L: insulin-independent uptake falls off below this
RENAL_ABOVE = 9.0  # mmol/L: renal clearance above this
RENAL_RATE = 0.003  # 1/min
TEST_MEAL_G = 70.0  # a main meal of the care policy for a 70 kg patient, scaled like its meals
RATIO_CHECK_MIN = 300  # a ratio is right when glucose is back to fasting this long after the meal
RATIO_BISECTIONS = 16

PARAM_NAMES: tuple[str, ...] = ("weight_kg", "egp0", "f01", "k12", "ka1", "ka2", "ka3", "sit", "sid",
                                "sie", "vg", "vi", "ke", "tmax_i", "tmax_g", "ag", "gb_mmol",
                                "basal_u_per_h")


def draw_params(profile: SiteProfile, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    s = profile.settings
    weight = rng.uniform(s["weight_lo"], s["weight_hi"], n)
    egp0 = lognormal(rng, 0.0169, 0.24, n, within_sd=2.5)  # mmol/kg/min at zero insulin
    # One sensitivity factor for the patient and one per action keeps SIT, SID and SIE correlated.
    sens = s["si_scale"] * lognormal(rng, 1.0, 0.3, n, within_sd=2.5)
    p = {
        "weight_kg": weight,
        "egp0": egp0,
        # F01 as a share of EGP0 (median 11.1/16.9): production always exceeds the uptake that
        # needs no insulin, so every patient needs basal insulin, as in type 1 diabetes.
        "f01": egp0 * lognormal(rng, 0.657, 0.12, n, within_sd=2.5),  # mmol/kg/min
        "k12": lognormal(rng, 0.060, 0.3, n, within_sd=2.5),  # 1/min
        "ka1": lognormal(rng, 0.0034, 0.4, n, within_sd=2.5),  # 1/min
        "ka2": lognormal(rng, 0.056, 0.4, n, within_sd=2.5),
        "ka3": lognormal(rng, 0.024, 0.4, n, within_sd=2.5),
        "sit": sens * lognormal(rng, 18.41e-4, 0.3, n, within_sd=2.5),  # 1/min per mU/L
        "sid": sens * lognormal(rng, 5.05e-4, 0.3, n, within_sd=2.5),  # 1/min per mU/L
        "sie": sens * lognormal(rng, 190e-4, 0.3, n, within_sd=2.5),  # L/mU
        "vg": lognormal(rng, 0.16, 0.12, n, within_sd=2.5),  # L/kg
        "vi": lognormal(rng, 0.12, 0.1, n, within_sd=2.5),  # L/kg
        "ke": lognormal(rng, 0.138, 0.15, n, within_sd=2.5),  # 1/min
        "tmax_i": lognormal(rng, 55.0, 0.2, n, within_sd=2.5),  # min
        "tmax_g": lognormal(rng, 40.0, 0.2, n, within_sd=2.5),  # min
        "ag": np.clip(rng.normal(0.8, 0.05, n), 0.65, 0.95),  # carbohydrate bioavailability
        # Basal is titrated to fasting glucose, so the site's basal error is a spread of the
        # fasting glucose the prescribed rate holds (median 135 mg/dL).
        "gb_mmol": lognormal(rng, 7.5, s["basal_error"], n, within_sd=2.5),
    }
    i_b = _basal_insulin(_absolute(p), p["gb_mmol"])  # plasma insulin, mU/L
    p["basal_u_per_h"] = i_b * p["ke"] * p["vi"] * weight * 60.0 / 1000.0
    return p


def carb_ratio(params: dict[str, np.ndarray]) -> np.ndarray:
    """Grams of carbohydrate one unit of insulin covers for this patient (the 'ideal' ratio): the
    ratio whose bolus, given with a test meal at the fasting steady state, brings glucose back to
    its fasting level five hours later, found by bisection on this model (the clinical rule for
    checking a ratio; a linearised ratio would miss how strongly x1 x2 grows with insulin)."""
    step_minutes = 5
    n = np.asarray(params["weight_kg"]).size
    n_steps = 1 + RATIO_CHECK_MIN // step_minutes
    basal = np.repeat((np.asarray(params["basal_u_per_h"]) * step_minutes / 60.0)[:, None], n_steps, axis=1)
    meal = TEST_MEAL_G * np.sqrt(np.asarray(params["weight_kg"]) / 70.0)
    carbs = np.zeros((n, n_steps))
    carbs[:, 0] = meal
    fasting = np.asarray(params["gb_mmol"]) * MGDL_PER_MMOL
    lo, hi = np.full(n, np.log(1.0)), np.full(n, np.log(200.0))
    for _ in range(RATIO_BISECTIONS):
        mid = (lo + hi) / 2
        insulin = basal.copy()
        insulin[:, 0] += meal / np.exp(mid)
        after = simulate(params, {"insulin_u": insulin, "carbs_g": carbs}, step_minutes=step_minutes)
        too_much_insulin = after["glucose_mgdl"][:, -1] < fasting
        lo = np.where(too_much_insulin, mid, lo)
        hi = np.where(too_much_insulin, hi, mid)
    return np.exp((lo + hi) / 2)


def simulate(params: dict[str, np.ndarray], controls: dict[str, np.ndarray], *,
             step_minutes: int = 5, rng: np.random.Generator | None = None,
             care: GlucoseCare | None = None):
    """Glucose [P, T] (mg/dL) at the end of each step, from parameters and amounts given per step,
    starting at the steady state of each patient's basal rate, fasting.

    With ``care`` (closed loop, glucose_sim's routine care): before each step, ``care`` sees the
    CGM reading of the step before and adds insulin and carbs to the step; returns the states and
    the controls actually given (``controls`` is left unchanged). Without it: the states alone."""
    m = _absolute(params)
    insulin = np.asarray(controls["insulin_u"], dtype=np.float64)
    carbs = np.asarray(controls["carbs_g"], dtype=np.float64)
    n, n_steps = insulin.shape
    if care is not None:
        insulin, carbs = insulin.copy(), carbs.copy()
        noise = _cgm_noise(rng, n, n_steps) if rng is not None else np.zeros((n, n_steps))
    i_pl = _basal_mu_per_min(m) / (m["ke"] * m["vi"])
    x1, x2, x3 = m["sit"] * i_pl, m["sid"] * i_pl, m["sie"] * i_pl
    q1 = _steady_glucose(m, i_pl) * m["vg"]
    q2 = x1 * q1 / (m["k12"] + x2)
    out = np.empty((n, n_steps))
    sub, dt = _substeps(step_minutes)
    for k, (ins_rate, gut_rate, _, _) in enumerate(_absorption(m, insulin, carbs, step_minutes)):
        egp = m["egp0"] * np.maximum(1.0 - x3, 0.0)
        gain = m["k12"] * q2 + gut_rate + egp - _insulin_free_loss(m, q1 / m["vg"])
        # The insulin-driven outflows x1 Q1 and x2 Q2 are taken implicitly: at any dose they
        # stay stable and the compartments non-negative, and the steady state is unchanged.
        q1, q2 = (np.maximum(q1 + dt * gain, 0.0) / (1.0 + dt * x1),
                  (q2 + dt * x1 * q1) / (1.0 + dt * (m["k12"] + x2)))
        x1 = x1 + dt * m["ka1"] * (m["sit"] * i_pl - x1)
        x2 = x2 + dt * m["ka2"] * (m["sid"] * i_pl - x2)
        x3 = x3 + dt * m["ka3"] * (m["sie"] * i_pl - x3)
        i_pl = i_pl + dt * (ins_rate / m["vi"] - m["ke"] * i_pl)
        if (k + 1) % sub == 0:
            t = k // sub
            out[:, t] = q1 / m["vg"]
            if care is not None and t + 1 < n_steps:
                # _absorption reads step t + 1's amounts only once asked for its first substep.
                reading = np.clip(out[:, t] * MGDL_PER_MMOL + noise[:, t], *CGM_RANGE)
                give_care(care, t + 1, reading, insulin, carbs)
    if care is not None:
        return ({"glucose_mgdl": np.clip(out * MGDL_PER_MMOL + noise, *CGM_RANGE)},
                {"insulin_u": insulin, "carbs_g": carbs})
    return {"glucose_mgdl": cgm_reading(out * MGDL_PER_MMOL, rng)}


def absorbed(params: dict[str, np.ndarray], controls: dict[str, np.ndarray], *,
             step_minutes: int = 5) -> dict[str, np.ndarray]:
    """Where the insulin and carbohydrate are at the end of each step [P, T], as ``simulate``
    integrates them: ``insulin_depot_u`` under the skin (the basal steady state's at the start),
    ``insulin_absorbed_u`` reached plasma so far; ``carbs_gut_g`` and ``carbs_absorbed_g`` as
    grams of glucose (bioavailable share only)."""
    m = _absolute(params)
    insulin = np.asarray(controls["insulin_u"], dtype=np.float64)
    carbs = np.asarray(controls["carbs_g"], dtype=np.float64)
    sub, dt = _substeps(step_minutes)
    names = ("insulin_depot_u", "insulin_absorbed_u", "carbs_gut_g", "carbs_absorbed_g")
    out = {k: np.empty(insulin.shape) for k in names}
    ins_total = np.zeros(insulin.shape[0])
    gut_total = np.zeros(insulin.shape[0])
    flows = _absorption(m, insulin, carbs, step_minutes)
    for k, (ins_rate, gut_rate, ins_depot, gut_depot) in enumerate(flows):
        ins_total = ins_total + dt * ins_rate
        gut_total = gut_total + dt * gut_rate
        if (k + 1) % sub == 0:
            t = k // sub
            out["insulin_depot_u"][:, t] = ins_depot / 1000.0
            out["insulin_absorbed_u"][:, t] = ins_total / 1000.0
            out["carbs_gut_g"][:, t] = gut_depot / MMOL_PER_G
            out["carbs_absorbed_g"][:, t] = gut_total / MMOL_PER_G
    return out


def generate(profile: SiteProfile, n_patients: int, n_steps: int, *, step_minutes: int = 5,
             rng: np.random.Generator, id_prefix: str = "p", care: str = "routine") -> SimCohort:
    params = draw_params(profile, n_patients, rng)
    return open_loop_cohort(profile, params, carb_ratio(params), simulate, n_steps,
                            step_minutes=step_minutes, rng=rng, id_prefix=id_prefix, care=care)


def _absolute(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Parameters as arrays with per-kg quantities made whole-body (L, mmol/min)."""
    m = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    for k in ("egp0", "f01", "vg", "vi"):
        m[k] = m[k] * m["weight_kg"]
    return m


def _basal_mu_per_min(m: dict[str, np.ndarray]) -> np.ndarray:
    return m["basal_u_per_h"] * 1000.0 / 60.0


def _insulin_free_loss(m: dict[str, np.ndarray], g: np.ndarray) -> np.ndarray:
    """F01c + FR (mmol/min) at glucose ``g`` (mmol/L): uptake that needs no insulin, and urine."""
    renal = RENAL_RATE * m["vg"] * np.maximum(g - RENAL_ABOVE, 0.0)
    return m["f01"] * np.minimum(g, F01_BELOW) / F01_BELOW + renal


def _steady_glucose(m: dict[str, np.ndarray], i_pl: np.ndarray) -> np.ndarray:
    """Fasting steady-state glucose (mmol/L) under constant plasma insulin ``i_pl`` (mU/L).

    At rest dQ2 = 0 gives Q2 = x1 Q1 / (k12 + x2), and dQ1 = 0 then reads
    a VG G + F01c(G) + FR(G) = EGP, with a = x1 x2 / (k12 + x2): the left side grows with G, so
    one of its three linear pieces holds the only root."""
    x2 = m["sid"] * i_pl
    a = m["sit"] * i_pl * x2 / (m["k12"] + x2) * m["vg"]
    egp = m["egp0"] * np.maximum(1.0 - m["sie"] * i_pl, 0.0)
    low = egp / (a + m["f01"] / F01_BELOW)
    high = (egp - m["f01"] + RENAL_RATE * RENAL_ABOVE * m["vg"]) / (a + RENAL_RATE * m["vg"])
    with np.errstate(divide="ignore", invalid="ignore"):
        mid = (egp - m["f01"]) / a
    return np.where(egp < a * F01_BELOW + m["f01"], low,
                    np.where(egp > a * RENAL_ABOVE + m["f01"], high, mid))


def _basal_insulin(m: dict[str, np.ndarray], g: np.ndarray) -> np.ndarray:
    """The plasma insulin (mU/L) whose fasting steady state is glucose ``g`` (mmol/L).

    With c = F01c(g) + FR(g) < EGP0 (``short`` = c - EGP0) and v = VG g, the steady state
    SIT SID I^2 v / (k12 + SID I) + c = EGP0 (1 - SIE I) is a quadratic in I with one positive
    root."""
    short = _insulin_free_loss(m, g) - m["egp0"]
    qa = m["sit"] * m["sid"] * m["vg"] * g + m["egp0"] * m["sie"] * m["sid"]
    qb = short * m["sid"] + m["egp0"] * m["sie"] * m["k12"]
    qc = short * m["k12"]
    return (-qb + np.sqrt(qb * qb - 4.0 * qa * qc)) / (2.0 * qa)


def _substeps(step_minutes: int) -> tuple[int, float]:
    sub = max(1, int(round(step_minutes / SUBSTEP_MIN)))
    return sub, step_minutes / sub


def _absorption(m: dict[str, np.ndarray], insulin_u: np.ndarray, carbs_g: np.ndarray,
                step_minutes: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Each substep (explicit Euler, every rate from the state before it): insulin reaching plasma
    (mU/min) and glucose appearing from the gut (mmol/min) during the substep, then the insulin
    (mU) and glucose (mmol) left in the depots after it. Amounts given in a step arrive evenly
    over it; the depots start at the basal steady state, the gut empty. The two depots are
    linear and independent of glucose, which is why they can run ahead of ``simulate``."""
    sub, dt = _substeps(step_minutes)
    tmax_i, tmax_g = m["tmax_i"], m["tmax_g"]
    s1 = _basal_mu_per_min(m) * tmax_i
    s2 = s1.copy()
    d1 = np.zeros_like(s1)
    d2 = np.zeros_like(s1)
    for t in range(insulin_u.shape[1]):
        u = insulin_u[:, t] * 1000.0 / step_minutes
        meal = m["ag"] * carbs_g[:, t] * MMOL_PER_G / step_minutes
        for _ in range(sub):
            ins_rate, gut_rate = s2 / tmax_i, d2 / tmax_g
            s1, s2 = s1 + dt * (u - s1 / tmax_i), s2 + dt * (s1 / tmax_i - ins_rate)
            d1, d2 = d1 + dt * (meal - d1 / tmax_g), d2 + dt * (d1 / tmax_g - gut_rate)
            yield ins_rate, gut_rate, s1 + s2, d1 + d2
