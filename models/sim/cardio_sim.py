"""Virtual hypertensive patients: blood pressure and heart rate under an oral antihypertensive.

Physiology: oral one-compartment pharmacokinetics (gut depot -> central, first-order absorption
and elimination) with an effect compartment (ke0) and an Emax reduction of vascular resistance;
mean arterial pressure follows resistance and heart rate with a short lag; a baroreflex raises
heart rate when pressure falls below the patient's set point, with a gain that weakens with age;
activity (a planned control) raises heart rate and pressure. SBP = MAP + 2/3 pulse pressure, and
pulse pressure widens with age (stiffer arteries). Plain dosing is open loop (habitual times,
missed doses); routine dosing (the default) adds late and extra doses and titration by the
readings (closed loop, ``CardioCare``). Either way the controls recorded are the ones given, so
replaying ``simulate`` with changed controls is the exact counterfactual. Only the readings
carry noise.
"""

from __future__ import annotations

import numpy as np

from twinfed.models.sim.base import SimCohort, SiteProfile, check_care, child_rng, lognormal

SUBSTEP_MIN = 1.0
SBP_RANGE = (60.0, 250.0)
HR_RANGE = (30.0, 200.0)
DOSE_MAX_MG_PER_STEP = 200.0  # the cardio spec's range: doses taken together never exceed it

# Routine care's habits (``care="routine"``), per site. Per scheduled dose: ``p_late`` the chance
# it is taken ``late_lo``..``late_hi`` minutes late (missed doses, ``p_miss``, exist under plain
# care too); on ``extra_per_day`` of days an extra dose is taken ``late_lo``..``late_hi`` minutes
# after the habitual time (forgetting it was taken). Titration (closed loop): from day
# ``review_from_day`` on, on ``review_per_day`` of days the dose is reviewed against the mean SBP
# of the last ``review_window_days``: above ``sbp_target`` it is doubled (at most ``titrate_max``
# times the site's top dose), below ``sbp_low`` halved (at least 5 mg), in 5 mg steps.
ROUTINE_CARE: dict[str, dict[str, float]] = {
    "paediatric": {"p_late": 0.10, "extra_per_day": 0.02, "review_per_day": 0.05, "sbp_target": 130.0},
    "adult": {"p_late": 0.05, "extra_per_day": 0.01, "review_per_day": 0.08, "sbp_target": 140.0},
    "elderly": {"p_late": 0.15, "extra_per_day": 0.03, "review_per_day": 0.08, "sbp_target": 150.0},
}
ROUTINE_COMMON: dict[str, float] = {"late_lo": 60.0, "late_hi": 240.0, "review_from_day": 2.0,
                                    "review_window_days": 2.0, "sbp_low": 110.0, "titrate_max": 2.0}

SITE_PROFILES: tuple[SiteProfile, ...] = (
    SiteProfile("paediatric", "adolescents: milder hypertension, strong baroreflex, active",
                {"age_lo": 12, "age_hi": 17, "weight_lo": 40, "weight_hi": 80, "sbp_mu": 138.0,
                 "sbp_sd": 8.0, "baro": 0.9, "p_miss": 0.12, "doses_per_day": 1, "dose_lo": 5,
                 "dose_hi": 20, "activity_per_day": 3.0, **ROUTINE_COMMON, **ROUTINE_CARE["paediatric"]}),
    SiteProfile("adult", "adults: once-daily dosing, good adherence",
                {"age_lo": 30, "age_hi": 64, "weight_lo": 55, "weight_hi": 120, "sbp_mu": 155.0,
                 "sbp_sd": 12.0, "baro": 0.6, "p_miss": 0.08, "doses_per_day": 1, "dose_lo": 10,
                 "dose_hi": 80, "activity_per_day": 1.5, **ROUTINE_COMMON, **ROUTINE_CARE["adult"]}),
    SiteProfile("elderly", "older adults: stiff arteries, weak baroreflex, twice-daily dosing, poorer adherence",
                {"age_lo": 65, "age_hi": 90, "weight_lo": 50, "weight_hi": 100, "sbp_mu": 165.0,
                 "sbp_sd": 14.0, "baro": 0.3, "p_miss": 0.20, "doses_per_day": 2, "dose_lo": 10,
                 "dose_hi": 40, "activity_per_day": 0.8, **ROUTINE_COMMON, **ROUTINE_CARE["elderly"]}),
)

PARAM_NAMES: tuple[str, ...] = ("weight_kg", "age_years", "ka", "ke", "ke0", "vd", "f_bio", "emax",
                                "ec50", "map0", "pp", "hr0", "baro_gain", "tau_p", "tau_h",
                                "act_hr", "act_map", "maint_mg_per_day")



def draw_params(profile: SiteProfile, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    s = profile.settings
    weight = rng.uniform(s["weight_lo"], s["weight_hi"], n)
    age = rng.uniform(s["age_lo"], s["age_hi"], n).round()
    pp = np.clip(35.0 + 0.55 * np.maximum(age - 30.0, 0.0) + rng.normal(0.0, 6.0, n), 30.0, 100.0)
    sbp0 = rng.normal(s["sbp_mu"], s["sbp_sd"], n)
    return {
        "weight_kg": weight,
        "age_years": age,
        "ka": lognormal(rng, 0.02, 0.25, n),  # absorption, 1/min (t1/2 ~35 min)
        "ke": lognormal(rng, np.log(2) / (8 * 60), 0.3, n),  # elimination, 1/min (t1/2 ~8 h)
        "ke0": lognormal(rng, 0.012, 0.3, n),  # effect-site equilibration, 1/min
        "vd": 1.5 * weight * np.exp(rng.normal(0.0, 0.2, n)),  # L
        "f_bio": np.clip(rng.normal(0.7, 0.08, n), 0.4, 0.95),
        "emax": np.clip(rng.normal(0.28, 0.06, n), 0.1, 0.45),  # max fractional fall in resistance
        "ec50": lognormal(rng, 0.12, 0.35, n),  # mg/L
        "map0": sbp0 - 2.0 / 3.0 * pp,  # untreated mean arterial pressure, mmHg
        "pp": pp,  # pulse pressure, mmHg
        "hr0": rng.normal(72.0, 8.0, n),  # bpm at the set point
        "baro_gain": lognormal(rng, s["baro"], 0.25, n),  # bpm per mmHg below set point
        "tau_p": lognormal(rng, 8.0, 0.2, n),  # min
        "tau_h": lognormal(rng, 3.0, 0.2, n),  # min
        "act_hr": rng.uniform(30.0, 55.0, n),  # bpm at full activity
        "act_map": rng.uniform(10.0, 20.0, n),  # mmHg at full activity
        "maint_mg_per_day": np.zeros(n),  # filled in by the treatment
    }


def treatment(profile: SiteProfile, params: dict[str, np.ndarray], n_steps: int, step_minutes: int,
              rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Open-loop doses and activity for every patient: [P, T] per step (plain care). Sets
    ``params["maint_mg_per_day"]``, the prescribed daily dose."""
    controls, _, _ = _plan(profile, params, n_steps, step_minutes, rng, None)
    return controls


def routine_treatment(profile: SiteProfile, params: dict[str, np.ndarray], n_steps: int, step_minutes: int,
                      rng: np.random.Generator, routine_rng: np.random.Generator
                      ) -> tuple[dict[str, np.ndarray], CardioCare]:
    """Routine care: the plan decided beforehand (the doses and activity ``treatment`` draws from
    ``rng``, with some doses late and some extra ones) and the titration ``simulate`` runs on top
    of it. Routine care's own draws come from ``routine_rng``, so ``rng`` is left as
    ``treatment`` would leave it."""
    controls, taken, log = _plan(profile, params, n_steps, step_minutes, rng, routine_rng)
    dose = params["maint_mg_per_day"] / int(profile.settings["doses_per_day"])
    return controls, CardioCare(profile.settings, dose_mg=dose, taken=taken, step_minutes=step_minutes,
                                rng=routine_rng, log=log)


def _plan(profile: SiteProfile, params: dict[str, np.ndarray], n_steps: int, step_minutes: int,
          rng: np.random.Generator, routine_rng: np.random.Generator | None
          ) -> tuple[dict[str, np.ndarray], np.ndarray | None, dict[str, np.ndarray]]:
    """The care decided before simulating, how many doses are taken in each step (routine care
    only) and what routine care changed per patient. Without ``routine_rng``: plain care, drawn
    exactly as before routine care existed."""
    s = profile.settings
    n = params["weight_kg"].size
    days = int(np.ceil(n_steps * step_minutes / 1440.0))
    per_day = int(s["doses_per_day"])
    dose = np.round(rng.uniform(s["dose_lo"], s["dose_hi"], n) / 5.0) * 5.0
    params["maint_mg_per_day"] = dose * per_day
    habit = rng.normal(8 * 60, 40, n)  # habitual morning time, min after midnight
    dose_mg = np.zeros((n, n_steps))
    activity = np.zeros((n, n_steps))
    routine = routine_rng is not None
    taken = np.zeros((n, n_steps)) if routine else None
    log = {k: np.zeros(n, dtype=np.int64) for k in ("missed_doses", "late_doses", "extra_doses")} if routine else {}
    for d in range(days):
        for k in range(per_day):
            minute = d * 1440 + habit + k * 12 * 60 + rng.normal(0.0, 30.0, n)
            late = np.zeros(n, dtype=bool)
            if routine:
                late = routine_rng.random(n) < s["p_late"]
                minute = minute + np.where(late, routine_rng.uniform(s["late_lo"], s["late_hi"], n), 0.0)
            step = (minute // step_minutes).astype(int)
            taking = rng.random(n) >= s["p_miss"]
            ok = taking & (step >= 0) & (step < n_steps)
            rows = np.flatnonzero(ok)
            np.add.at(dose_mg, (rows, step[ok]), dose[ok])
            if routine:
                np.add.at(taken, (rows, step[ok]), 1.0)
                log["missed_doses"] += ~taking & (step >= 0) & (step < n_steps)
                log["late_doses"] += ok & late
        if routine:  # an extra dose, some hours after the habitual time
            extra = routine_rng.random(n) < s["extra_per_day"]
            step = ((d * 1440 + habit + routine_rng.uniform(s["late_lo"], s["late_hi"], n))
                    // step_minutes).astype(int)
            ok = extra & (step >= 0) & (step < n_steps)
            rows = np.flatnonzero(ok)
            np.add.at(taken, (rows, step[ok]), 1.0)
            log["extra_doses"] += ok
        n_ep = rng.poisson(s["activity_per_day"], n)
        for k in range(int(n_ep.max(initial=0))):
            has = n_ep > k
            start = ((d * 1440 + rng.uniform(7 * 60, 21 * 60, n)) // step_minutes).astype(int)
            length = (rng.uniform(15, 60, n) // step_minutes).astype(int) + 1
            level = np.round(rng.uniform(0.3, 0.8, n), 2)
            for j in range(int(length.max())):
                idx = start + j
                ok = has & (j < length) & (idx < n_steps)
                rows = np.flatnonzero(ok)
                activity[rows, idx[ok]] = np.maximum(activity[rows, idx[ok]], level[ok])
    if routine:
        dose_mg = np.minimum(taken * dose[:, None], DOSE_MAX_MG_PER_STEP)
    return {"dose_mg": dose_mg, "activity": activity}, taken, log


class CardioCare:
    """Titration as clinics do it (closed loop): ``simulate`` calls it once per step with the SBP
    reading of the step before; at the start of a day with a review (from ``review_from_day``
    on, chance ``review_per_day``) the dose changes by the mean SBP of the last
    ``review_window_days`` (see ``ROUTINE_CARE``). Returns the dose to add to the planned one in
    the step (negative after a dose is lowered). ``log`` counts what care did per patient."""

    def __init__(self, settings: dict[str, float], *, dose_mg: np.ndarray, taken: np.ndarray,
                 step_minutes: int, rng: np.random.Generator, log: dict[str, np.ndarray] | None = None):
        self.s = settings
        self.base = dose_mg
        self.dose = dose_mg.copy()
        self.taken = taken
        self.rng = rng
        self.per_day = int(round(1440 / step_minutes))
        self.window = int(round(settings["review_window_days"] * self.per_day))
        self.readings = np.zeros((dose_mg.size, self.window))  # the last window's readings, a ring
        self.top = settings["titrate_max"] * settings["dose_hi"]
        self.log = dict(log or {})
        self.log |= {"titrations_up": np.zeros(dose_mg.size, dtype=np.int64),
                     "titrations_down": np.zeros(dose_mg.size, dtype=np.int64)}

    def __call__(self, t: int, sbp_reading: np.ndarray) -> np.ndarray:
        s = self.s
        self.readings[:, (t - 1) % self.window] = sbp_reading
        if t % self.per_day == 0 and t // self.per_day >= s["review_from_day"] and t >= self.window:
            review = self.rng.random(self.dose.size) < s["review_per_day"]
            mean = self.readings.mean(axis=1)
            up = review & (mean > s["sbp_target"]) & (self.dose < self.top)
            down = review & (mean < s["sbp_low"]) & (self.dose > 5.0)
            self.dose = np.where(up, np.minimum(self.dose * 2, self.top), self.dose)
            self.dose = np.where(down, np.maximum(np.round(self.dose / 2 / 5) * 5, 5.0), self.dose)
            self.log["titrations_up"] += up
            self.log["titrations_down"] += down
        return self.taken[:, t] * (self.dose - self.base)


def simulate(params: dict[str, np.ndarray], controls: dict[str, np.ndarray], *,
             step_minutes: int = 5, rng: np.random.Generator | None = None,
             care: CardioCare | None = None):
    """SBP and HR [P, T] at the end of each step, from parameters and per-step controls.

    With ``care`` (closed loop): before each step, ``care`` sees the SBP reading of the step before
    and changes the step's dose; returns the states and the controls actually given
    (``controls`` is left unchanged). Without it: the states alone, open loop."""
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    dose = np.asarray(controls["dose_mg"], dtype=np.float64)
    act = np.asarray(controls["activity"], dtype=np.float64)
    n, n_steps = dose.shape
    if care is not None:
        dose = dose.copy()
        noise_sbp = rng.normal(0.0, 4.0, (n, n_steps)) if rng is not None else np.zeros((n, n_steps))
        noise_hr = rng.normal(0.0, 2.0, (n, n_steps)) if rng is not None else np.zeros((n, n_steps))
    # Start at the average steady state of the patient's maintenance dosing: a function of params.
    a_c = p["f_bio"] * p["maint_mg_per_day"] / 1440.0 / p["ke"]
    a_g = p["maint_mg_per_day"] / 1440.0 / p["ka"]
    c_e = a_c / p["vd"]
    effect = p["emax"] * c_e / (p["ec50"] + c_e)
    mean_p = p["map0"] * (1.0 - effect)
    hr = p["hr0"] + p["baro_gain"] * (p["map0"] - mean_p)
    sbp = np.empty((n, n_steps))
    hrs = np.empty((n, n_steps))
    sub = int(round(step_minutes / SUBSTEP_MIN))
    dt = step_minutes / sub
    for t in range(n_steps):
        if care is not None and t > 0:
            reading = np.clip(sbp[:, t - 1] + noise_sbp[:, t - 1], *SBP_RANGE)
            dose[:, t] = np.clip(dose[:, t] + care(t, reading), 0.0, DOSE_MAX_MG_PER_STEP)
        u = dose[:, t] / step_minutes
        a = act[:, t]
        for _ in range(sub):
            c = a_c / p["vd"]
            effect = p["emax"] * c_e / (p["ec50"] + np.maximum(c_e, 0.0))
            # Pressure follows resistance and, weakly, heart rate (cardiac output).
            target_p = p["map0"] * (1.0 - effect) * (hr / p["hr0"]) ** 0.25 + p["act_map"] * a
            # Exercise resets the baroreflex set point upwards (central command), so the
            # reflex does not fight the pressure rise that activity itself causes.
            set_point = p["map0"] + p["act_map"] * a
            target_h = p["hr0"] + p["baro_gain"] * (set_point - mean_p) + p["act_hr"] * a
            a_g, a_c, _ = _pk_step(p, a_g, a_c, u, dt)
            c_e = c_e + dt * p["ke0"] * (c - c_e)
            mean_p = mean_p + dt * (target_p - mean_p) / p["tau_p"]
            hr = hr + dt * (target_h - hr) / p["tau_h"]
        sbp[:, t] = mean_p + 2.0 / 3.0 * p["pp"]
        hrs[:, t] = hr
    if care is not None:
        return ({"sbp_mmhg": np.clip(sbp + noise_sbp, *SBP_RANGE), "hr_bpm": np.clip(hrs + noise_hr, *HR_RANGE)},
                {"dose_mg": dose, "activity": np.asarray(controls["activity"], dtype=np.float64)})
    if rng is not None:
        sbp = sbp + rng.normal(0.0, 4.0, sbp.shape)
        hrs = hrs + rng.normal(0.0, 2.0, hrs.shape)
    return {"sbp_mmhg": np.clip(sbp, *SBP_RANGE), "hr_bpm": np.clip(hrs, *HR_RANGE)}


def _pk_step(p: dict[str, np.ndarray], a_g: np.ndarray, a_c: np.ndarray, u: np.ndarray,
             dt: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One Euler step of gut and central amounts (mg); also what left the body (eliminated, or
    never absorbed because of incomplete bioavailability)."""
    absorbed = p["ka"] * a_g
    out = p["ke"] * a_c
    lost = dt * (out + (1 - p["f_bio"]) * absorbed)
    return a_g + dt * (u - absorbed), a_c + dt * (p["f_bio"] * absorbed - out), lost


def pk_amounts(params: dict[str, np.ndarray], dose_mg: np.ndarray, *, step_minutes: int = 5,
               start_empty: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gut and central drug amounts [P, T] and cumulative elimination, for mass-balance checks."""
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    n, n_steps = dose_mg.shape
    a_g = np.zeros(n)
    a_c = np.zeros(n)
    gone = np.zeros(n)
    gut = np.empty((n, n_steps))
    central = np.empty((n, n_steps))
    elim = np.empty((n, n_steps))
    sub = int(round(step_minutes / SUBSTEP_MIN))
    dt = step_minutes / sub
    for t in range(n_steps):
        u = dose_mg[:, t] / step_minutes
        for _ in range(sub):
            a_g, a_c, lost = _pk_step(p, a_g, a_c, u, dt)
            gone = gone + lost
        gut[:, t], central[:, t], elim[:, t] = a_g, a_c, gone
    return gut, central, elim


def generate(profile: SiteProfile, n_patients: int, n_steps: int, *, step_minutes: int = 5,
             rng: np.random.Generator, id_prefix: str = "p", care: str = "routine") -> SimCohort:
    """A site's patients under ``care`` (one of ``CARE_POLICIES``: routine, with titration closed
    loop, or plain, open loop); the controls recorded are the ones given."""
    check_care(care)
    params = draw_params(profile, n_patients, rng)
    log: dict[str, np.ndarray] = {}
    if care == "plain":
        controls = treatment(profile, params, n_steps, step_minutes, rng)
        states = simulate(params, controls, step_minutes=step_minutes, rng=rng)
    else:
        planned, policy = routine_treatment(profile, params, n_steps, step_minutes, rng, child_rng(rng))
        states, controls = simulate(params, planned, step_minutes=step_minutes, rng=rng, care=policy)
        log = policy.log
    return SimCohort(
        patient_ids=[f"{id_prefix}{i:05d}" for i in range(n_patients)],
        covariates={"weight_kg": params["weight_kg"], "age_years": params["age_years"]},
        params=params, states=states, controls=controls, care_log=log,
    )
