"""Routine care as real records hold it, in the built-in simulators (issue 21 item 4).

Real records hold care that reacts to the patient: correction boluses after high readings (insulin
with no meal), fast carbohydrate after low ones, temporary and lasting basal changes, late and
missed boluses; antihypertensive doses taken late, missed, doubled and titrated. ``care="routine"``
(the default) simulates that care; ``care="plain"`` reproduces the cohorts made before it, byte
for byte.
"""

import hashlib

import numpy as np
import pytest

from twinfed.models.sim import cardio_sim, glucose_sim, hovorka_sim

DAY = 288  # 5-minute steps
SIMS = {"bergman": glucose_sim, "hovorka": hovorka_sim, "baroreflex": cardio_sim}
GLUCOSE_SIMS = pytest.mark.parametrize("gsim", [glucose_sim, hovorka_sim], ids=["bergman", "hovorka"])

# sha256 (first 16 hex digits) of a 3-patient, 1-day cohort per site profile, seed 11, computed
# from the simulators before routine care existed (commit 6603110).
PLAIN_FINGERPRINTS = {
    "bergman": ["1d003dd0ba2ed4aa", "4f4d71aa2d9dc52e", "e4cfd02fbbf714dd"],
    "hovorka": ["2d25c0e91190989e", "981b3cca6734fb14", "1f8a539b2115f4ce"],
    "baroreflex": ["508a6de7bafa4c27", "acf2b92320c20b6b", "af5f3fe539fffd51"],
}
# sha256 of site-a/timeseries.csv of generate_cohort(twin, sites=1, patients=3, days=0.25, seed=3),
# from the same commit.
PLAIN_CSV_FINGERPRINTS = {
    ("glucose", "bergman"): "13b3239baed2f7ae",
    ("glucose", "hovorka"): "5618b8b994d3941a",
    ("cardio", "baroreflex"): "8481a14970f953c8",
}


def _fingerprint(cohort) -> str:
    h = hashlib.sha256()
    h.update("|".join(cohort.patient_ids).encode())
    for part in (cohort.covariates, cohort.params, cohort.states, cohort.controls):
        for k in sorted(part):
            h.update(k.encode())
            h.update(np.ascontiguousarray(part[k], dtype=np.float64).tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("name", list(SIMS))
def test_plain_care_reproduces_the_cohorts_made_before_routine_care(name):
    sim = SIMS[name]
    got = [_fingerprint(sim.generate(p, 3, DAY, rng=np.random.default_rng(11), care="plain"))
           for p in sim.SITE_PROFILES]
    assert got == PLAIN_FINGERPRINTS[name]


@pytest.mark.parametrize("twin, name", list(PLAIN_CSV_FINGERPRINTS))
def test_a_plain_cohort_on_disk_is_byte_for_byte_the_old_one(tmp_path, twin, name):
    from twinfed.models.cohort import generate_cohort

    generate_cohort(twin, sites=1, patients=3, days=0.25, seed=3, out=tmp_path / "c", simulator=name,
                    care="plain")
    digest = hashlib.sha256((tmp_path / "c" / "site-a" / "timeseries.csv").read_bytes()).hexdigest()[:16]
    assert digest == PLAIN_CSV_FINGERPRINTS[(twin, name)]


def test_the_cohort_cli_takes_care_plain_and_records_the_care(tmp_path):
    import json

    from twinfed.cli.main import main

    out = tmp_path / "c"
    assert main(["cohort", "generate", "--twin", "glucose", "--sites", "1", "--patients", "3", "--days", "0.25",
                 "--seed", "3", "--out", str(out), "--care", "plain"]) == 0
    digest = hashlib.sha256((out / "site-a" / "timeseries.csv").read_bytes()).hexdigest()[:16]
    assert digest == PLAIN_CSV_FINGERPRINTS[("glucose", "bergman")]
    assert json.loads((out / "cohort.json").read_text())["care"] == "plain"
    assert main(["cohort", "generate", "--twin", "cardio", "--sites", "1", "--patients", "3", "--days", "0.25",
                 "--seed", "3", "--out", str(tmp_path / "r")]) == 0
    assert json.loads((tmp_path / "r" / "cohort.json").read_text())["care"] == "routine"


def test_an_unknown_care_is_a_one_line_data_error(tmp_path):
    from twinfed.errors import DataError
    from twinfed.models.cohort import generate_cohort

    with pytest.raises(DataError, match="unknown care 'closed'; choose routine or plain"):
        generate_cohort("glucose", sites=1, patients=3, days=0.25, seed=3, out=tmp_path / "c", care="closed")
    assert not (tmp_path / "c").exists()


# -- glucose: the closed-loop part ------------------------------------------------------------------

def _care(**overrides):
    settings = dict(glucose_sim.SITE_PROFILES[1].settings, **overrides)
    n, n_steps = 4, 200
    return glucose_sim.GlucoseCare(settings, isf_mgdl_per_u=np.full(n, 50.0),
                                   bolus_steps=np.zeros((n, n_steps), dtype=bool), step_minutes=5,
                                   rng=np.random.default_rng(0))


def test_a_high_reading_gets_a_correction_bolus_from_the_prescribed_sensitivity_then_none_for_3_hours():
    care = _care(p_notice_high=1.0)
    insulin, carbs = care(10, np.array([300.0, 251.0, 249.0, 120.0]))
    # (300 - 120) / 50 = 3.6 -> 3.5 U; (251 - 120) / 50 = 2.62 -> 2.5 U; none at or below 250.
    assert insulin.tolist() == [3.5, 2.5, 0.0, 0.0] and (carbs == 0).all()
    assert care(11, np.full(4, 300.0))[0].tolist() == [0.0, 0.0, 3.5, 3.5]  # the others' first
    for t in range(12, 10 + 36):  # still high, but the last bolus was under 3 h ago
        assert (care(t, np.full(4, 300.0))[0] == 0).all()
    assert care(10 + 36, np.full(4, 300.0))[0].tolist() == [3.5, 3.5, 0.0, 0.0]
    assert care.log["corrections"].tolist() == [2, 2, 1, 1]


def test_no_correction_within_3_hours_of_a_meal_bolus():
    care = _care(p_notice_high=1.0)
    care.bolus_steps[:, 20] = True
    assert (care(20, np.full(4, 300.0))[0] == 0).all()
    assert (care(55, np.full(4, 300.0))[0] == 0).all()
    assert (care(56, np.full(4, 300.0))[0] == 3.5).all()


def test_a_low_reading_gets_fast_carbs_and_not_again_within_the_lockout():
    care = _care(p_notice_low=1.0)
    low = np.array([55.0, 69.0, 70.0, 150.0])
    insulin, carbs = care(30, low)
    assert (insulin == 0).all()
    assert (15 <= carbs[:2]).all() and (carbs[:2] <= 20).all() and (carbs[2:] == 0).all()
    for t in (31, 32):  # 5 and 10 minutes later: still low, not again
        assert (care(t, low)[1] == 0).all()
    assert (care(34, low)[1][:2] > 0).all()  # 20 minutes later, still low: again


def _routine(gsim, profile, n, days, seed):
    """A routine-care site: its patients, the plan decided beforehand and the care policy."""
    rng = np.random.default_rng(seed)
    params = gsim.draw_params(profile, n, rng)
    rng.uniform(0, 1, n)  # the ages
    plan, policy = glucose_sim.routine_treatment(
        profile, weight_kg=params["weight_kg"], basal_u_per_h=params["basal_u_per_h"],
        carb_ratio_g_per_u=gsim.carb_ratio(params), n_steps=days * DAY, step_minutes=5, rng=rng,
        routine_rng=np.random.default_rng(seed + 1))
    return params, plan, policy, rng


@GLUCOSE_SIMS
def test_in_a_simulation_corrections_follow_readings_above_250_and_carbs_follow_readings_below_70(gsim):
    params, plan, policy, rng = _routine(gsim, gsim.SITE_PROFILES[0], 60, 2, seed=3)
    before = {k: v.copy() for k, v in plan.items()}
    states, given = gsim.simulate(params, plan, rng=rng, care=policy)
    assert all((plan[k] == before[k]).all() for k in plan)  # the plan itself is left alone
    g = states["glucose_mgdl"]
    more_insulin = given["insulin_u"] > plan["insulin_u"] + 1e-9
    more_carbs = given["carbs_g"] > plan["carbs_g"] + 1e-9
    p, t = np.nonzero(more_insulin)
    assert p.size == policy.log["corrections"].sum() > 0
    assert (g[p, t - 1] > 250).all()  # each correction follows a reading above 250
    p, t = np.nonzero(more_carbs)
    assert p.size == policy.log["hypo_treatments"].sum() > 0
    assert (g[p, t - 1] < 70).all()
    gaps = np.diff(t[np.lexsort((t, p))])[np.diff(p[np.lexsort((t, p))]) == 0]
    assert (gaps >= 3).all()  # never twice within 15 minutes
    assert given["insulin_u"].max() <= glucose_sim.PUMP_MAX_U_PER_STEP
    assert given["carbs_g"].max() <= glucose_sim.CARBS_MAX_G_PER_STEP


@GLUCOSE_SIMS
def test_replaying_the_controls_given_open_loop_is_the_closed_loop_simulation(gsim):
    params, plan, policy, _ = _routine(gsim, gsim.SITE_PROFILES[0], 20, 1, seed=5)
    states, given = gsim.simulate(params, plan, care=policy)  # no sensor noise
    assert policy.log["corrections"].sum() + policy.log["hypo_treatments"].sum() > 0
    assert (gsim.simulate(params, given)["glucose_mgdl"] == states["glucose_mgdl"]).all()


@GLUCOSE_SIMS
def test_a_routine_cohort_replays_to_its_truth_with_only_sensor_noise_between(gsim):
    cohort = gsim.generate(gsim.SITE_PROFILES[0], 30, DAY, rng=np.random.default_rng(4))
    truth = gsim.simulate(cohort.params, cohort.controls)["glucose_mgdl"]
    noise = cohort.states["glucose_mgdl"] - truth
    inside = (truth > 50) & (truth < 390)
    assert abs(noise[inside].mean()) < 2 and 3 < noise[inside].std() < 10


def test_basal_changes_and_late_boluses_occur_at_the_rates_the_profile_says():
    n, days = 400, 5
    for profile in glucose_sim.SITE_PROFILES:
        s = profile.settings
        c = glucose_sim.generate(profile, n, days * DAY, rng=np.random.default_rng(7))
        log = c.care_log
        for event, rate in (("temp_basals", s["temp_basal_per_day"]), ("basal_changes", s["basal_change_per_day"])):
            expected = rate * n * days
            assert abs(log[event].sum() - expected) < 4 * np.sqrt(expected) + 2, (profile.name, event)
        late_share = log["late_boluses"].sum() / log["meal_boluses"].sum()
        assert abs(late_share - s["p_late"]) < 0.03, profile.name
        # The basal rate given differs from the prescribed one: lowered below any bolus-free rate.
        prescribed = c.params["basal_u_per_h"][:, None] * 5 / 60
        assert (c.controls["insulin_u"] < 0.85 * prescribed).any()


def test_late_boluses_come_30_to_90_minutes_after_the_meal():
    profile = glucose_sim.SITE_PROFILES[0]
    settings = dict(profile.settings, p_late=1.0, p_miss=0.0, snacks_per_day=0.0,
                    temp_basal_per_day=0.0, basal_change_per_day=0.0)
    late = glucose_sim.SiteProfile(profile.name, profile.description, settings)
    n = 50
    plan, policy = glucose_sim.routine_treatment(
        late, weight_kg=np.full(n, 40.0), basal_u_per_h=np.full(n, 0.6), carb_ratio_g_per_u=np.full(n, 15.0),
        n_steps=DAY, step_minutes=5, rng=np.random.default_rng(1), routine_rng=np.random.default_rng(2))
    meals = [np.flatnonzero(row) for row in plan["carbs_g"]]
    boluses = [np.flatnonzero(row) for row in policy.bolus_steps]
    delays = np.concatenate([(b - m) * 5 for m, b in zip(meals, boluses) if len(m) == len(b) == 3])
    assert delays.size > 100 and (delays >= 25).all() and (delays <= 90).all()
    assert (policy.log["late_boluses"] == 3).all()


def _pure_insulin_steps(cohort) -> int:
    """Boluses with no carbohydrate within 60 minutes either side."""
    insulin, carbs = cohort.controls["insulin_u"], cohort.controls["carbs_g"]
    bolus = insulin > 2 * cohort.params["basal_u_per_h"][:, None] * 5 / 60 + 0.25
    near = np.zeros_like(bolus)
    for shift in range(-12, 13):
        near |= np.roll(carbs > 0, shift, axis=1)
    return int((bolus & ~near).sum())


@GLUCOSE_SIMS
def test_routine_care_gives_insulin_without_food_which_plain_care_never_does(gsim):
    profile = gsim.SITE_PROFILES[0]
    routine = gsim.generate(profile, 100, 2 * DAY, rng=np.random.default_rng(8))
    plain = gsim.generate(profile, 100, 2 * DAY, rng=np.random.default_rng(8), care="plain")
    assert _pure_insulin_steps(plain) == 0
    assert _pure_insulin_steps(routine) > 30


@pytest.mark.studies  # two sites of each simulator: kept out of the 10-minute suite
@GLUCOSE_SIMS
def test_routine_care_lowers_time_above_250_and_below_70_on_the_same_patients(gsim):
    for profile in gsim.SITE_PROFILES[:2]:
        routine = gsim.generate(profile, 150, 3 * DAY, rng=np.random.default_rng(9)).states["glucose_mgdl"]
        plain = gsim.generate(profile, 150, 3 * DAY, rng=np.random.default_rng(9), care="plain").states["glucose_mgdl"]
        assert (routine > 250).mean() < (plain > 250).mean(), profile.name
        assert (routine < 70).mean() < 0.6 * (plain < 70).mean(), profile.name


@pytest.mark.parametrize("name", list(SIMS))
def test_routine_and_plain_cohorts_of_one_seed_hold_the_same_patients(name):
    sim = SIMS[name]
    a = sim.generate(sim.SITE_PROFILES[1], 5, DAY, rng=np.random.default_rng(2))
    b = sim.generate(sim.SITE_PROFILES[1], 5, DAY, rng=np.random.default_rng(2), care="plain")
    assert all((a.params[k] == b.params[k]).all() for k in a.params)
    assert all((a.covariates[k] == b.covariates[k]).all() for k in a.covariates)


# -- cardio ---------------------------------------------------------------------------------------

def test_cardio_routine_care_misses_delays_adds_and_titrates_doses():
    n, days = 300, 7
    for profile in cardio_sim.SITE_PROFILES:
        c = cardio_sim.generate(profile, n, days * DAY, rng=np.random.default_rng(3))
        log, dose = c.care_log, c.controls["dose_mg"]
        for event in ("missed_doses", "late_doses", "extra_doses", "titrations_up"):
            assert log[event].sum() > 0, (profile.name, event)
        assert 0 <= dose.min() and dose.max() <= cardio_sim.DOSE_MAX_MG_PER_STEP
        # A titrated patient's record holds the old dose and, later, the new one (unless every
        # dose after the review was missed).
        base = c.params["maint_mg_per_day"] / profile.settings["doses_per_day"]
        up = np.flatnonzero(log["titrations_up"] > 0)
        first = np.argmax(dose[up] > 0, axis=1)
        raised = [(dose[i][dose[i] > 0] > base[i]).any() for i in up]
        assert (dose[up, first] == base[up]).all() and np.mean(raised) > 0.8, profile.name
        # Titration reacts to pressure: those raised had higher pressure than those never raised.
        sbp = c.states["sbp_mmhg"][:, : 2 * DAY].mean(axis=1)
        assert sbp[up].mean() > sbp[log["titrations_up"] == 0].mean(), profile.name


def test_cardio_titration_doubles_a_dose_when_pressure_stays_above_target_and_halves_it_when_low():
    s = dict(cardio_sim.SITE_PROFILES[1].settings, review_per_day=1.0)
    n, per_day = 3, DAY
    taken = np.ones((n, 3 * per_day))
    care = cardio_sim.CardioCare(s, dose_mg=np.array([20.0, 20.0, 20.0]), taken=taken, step_minutes=5,
                                 rng=np.random.default_rng(0))
    readings = np.array([160.0, 125.0, 100.0])
    for t in range(1, 2 * per_day):
        assert (care(t, readings) == 0).all()  # no review before day 2
    assert care(2 * per_day, readings).tolist() == [20.0, 0.0, -10.0]
    assert care.log["titrations_up"].tolist() == [1, 0, 0]
    assert care.log["titrations_down"].tolist() == [0, 0, 1]


@pytest.mark.parametrize("name", list(SIMS))
def test_routine_cohorts_stay_within_the_spec_ranges(name):
    from twinfed.models.spec import load_spec

    sim = SIMS[name]
    spec = load_spec("cardio" if sim is cardio_sim else "glucose")
    for profile in sim.SITE_PROFILES:
        c = sim.generate(profile, 40, 2 * DAY, rng=np.random.default_rng(6))
        for col in (*spec.states, *spec.controls):
            arr = c.states.get(col.column, c.controls.get(col.column))
            assert col.min <= arr.min() and arr.max() <= col.max, (profile.name, col.column)
