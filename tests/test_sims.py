"""The built-in virtual-patient simulators behave like physiology."""

import numpy as np
import pytest

from twinfed.models.sim import cardio_sim, glucose_sim, hovorka_sim
from twinfed.models.spec import load_spec

T = 288  # one day of 5-minute steps
# Both glucose simulators (the default, and the one of a different structure) obey the same physiology.
GLUCOSE_SIMS = pytest.mark.parametrize("gsim", [glucose_sim, hovorka_sim], ids=["bergman", "hovorka"])


def _glucose_patients(gsim=glucose_sim, n=20, seed=0):
    return gsim.draw_params(gsim.SITE_PROFILES[1], n, np.random.default_rng(seed))


def _flat(params, n_steps=T):
    n = params["weight_kg"].size
    basal = np.repeat((params["basal_u_per_h"] * 5 / 60)[:, None], n_steps, axis=1)
    return {"insulin_u": basal, "carbs_g": np.zeros((n, n_steps))}


@GLUCOSE_SIMS
def test_glucose_rises_after_a_meal_without_insulin(gsim):
    p = _glucose_patients(gsim)
    base = _flat(p)
    meal = {k: v.copy() for k, v in base.items()}
    meal["carbs_g"][:, 100] = 60
    g0 = gsim.simulate(p, base)["glucose_mgdl"]
    g1 = gsim.simulate(p, meal)["glucose_mgdl"]
    assert (g1[:, 124] - g0[:, 124] > 40).all()  # two hours later, clearly higher


@GLUCOSE_SIMS
def test_glucose_falls_after_insulin_without_food(gsim):
    p = _glucose_patients(gsim)
    base = _flat(p)
    bolus = {k: v.copy() for k, v in base.items()}
    bolus["insulin_u"][:, 100] += 3
    g0 = gsim.simulate(p, base)["glucose_mgdl"]
    g1 = gsim.simulate(p, bolus)["glucose_mgdl"]
    assert (g1[:, 136] < g0[:, 136] - 10).all()


@GLUCOSE_SIMS
def test_more_insulin_never_gives_higher_glucose(gsim):
    p = _glucose_patients(gsim, n=10)
    ctrl = _flat(p)
    ctrl["carbs_g"][:, [90, 150, 220]] = 50
    ctrl["insulin_u"][:, [90, 150, 220]] += 4
    lower = gsim.simulate(p, ctrl)["glucose_mgdl"]
    ctrl["insulin_u"] = ctrl["insulin_u"] * 1.3
    higher_dose = gsim.simulate(p, ctrl)["glucose_mgdl"]
    assert (higher_dose <= lower + 1e-9).all()


@GLUCOSE_SIMS
def test_a_patient_at_basal_without_food_stays_at_steady_state(gsim):
    p = _glucose_patients(gsim)
    g = gsim.simulate(p, _flat(p))["glucose_mgdl"]
    assert np.abs(g[:, -1] - g[:, 0]).max() < 1.0


@GLUCOSE_SIMS
def test_simulate_is_the_noise_free_replay_of_generate(gsim):
    cohort = gsim.generate(gsim.SITE_PROFILES[0], 30, T, rng=np.random.default_rng(4))
    truth = gsim.simulate(cohort.params, cohort.controls)["glucose_mgdl"]
    again = gsim.simulate(cohort.params, cohort.controls)["glucose_mgdl"]
    assert (truth == again).all()
    noise = cohort.states["glucose_mgdl"] - truth
    inside = (truth > 50) & (truth < 390)  # away from the sensor's clipping
    assert abs(noise[inside].mean()) < 2 and 3 < noise[inside].std() < 10


@pytest.mark.parametrize("sim, twin", [(glucose_sim, "glucose"), (hovorka_sim, "glucose"), (cardio_sim, "cardio")])
def test_generated_cohorts_match_the_spec_columns_and_ranges(sim, twin):
    spec = load_spec(twin)
    for profile in sim.SITE_PROFILES:
        c = sim.generate(profile, 15, T, rng=np.random.default_rng(1))
        assert set(c.states) == set(spec.state_columns)
        assert set(c.controls) == set(spec.control_columns)
        assert set(c.covariates) == set(spec.covariate_columns)
        assert set(sim.PARAM_NAMES) <= set(c.params)
        for col in (*spec.states, *spec.controls):
            arr = c.states.get(col.column, c.controls.get(col.column))
            assert arr.shape == (15, T)
            assert col.min <= arr.min() and arr.max() <= col.max


@pytest.mark.parametrize("sim", [glucose_sim, hovorka_sim, cardio_sim])
def test_sites_differ_like_hospitals(sim):
    paed, _, elderly = (sim.generate(p, 200, T, rng=np.random.default_rng(2)) for p in sim.SITE_PROFILES)
    assert paed.covariates["age_years"].max() < 18 <= 65 <= elderly.covariates["age_years"].min()
    assert paed.covariates["weight_kg"].mean() < elderly.covariates["weight_kg"].mean()


def test_elderly_hypertensives_have_higher_pressure_than_adolescents():
    young = cardio_sim.generate(cardio_sim.SITE_PROFILES[0], 200, T, rng=np.random.default_rng(3))
    old = cardio_sim.generate(cardio_sim.SITE_PROFILES[2], 200, T, rng=np.random.default_rng(3))
    assert old.states["sbp_mmhg"].mean() > young.states["sbp_mmhg"].mean() + 10


def _cardio(n=20):
    prof = cardio_sim.SITE_PROFILES[1]
    p = cardio_sim.draw_params(prof, n, np.random.default_rng(5))
    p["maint_mg_per_day"] = np.zeros(n)  # start untreated
    zero = {"dose_mg": np.zeros((n, T)), "activity": np.zeros((n, T))}
    return p, zero


def test_a_dose_lowers_pressure_within_hours_and_the_heart_rate_rises_reflexively():
    p, zero = _cardio()
    dosed = {k: v.copy() for k, v in zero.items()}
    dosed["dose_mg"][:, 50] = 40
    a = cardio_sim.simulate(p, zero)
    b = cardio_sim.simulate(p, dosed)
    assert (b["sbp_mmhg"][:, 50 + 36] < a["sbp_mmhg"][:, 50 + 36] - 3).all()  # 3 h after the dose
    assert (b["hr_bpm"][:, 50 + 36] > a["hr_bpm"][:, 50 + 36]).all()


def test_activity_raises_heart_rate():
    p, zero = _cardio()
    active = {k: v.copy() for k, v in zero.items()}
    active["activity"][:, 100:110] = 0.7
    a = cardio_sim.simulate(p, zero)["hr_bpm"]
    b = cardio_sim.simulate(p, active)["hr_bpm"]
    assert (b[:, 108] > a[:, 108] + 15).all()


def test_drug_amounts_are_conserved():
    p, zero = _cardio()
    dose = zero["dose_mg"].copy()
    dose[:, 10] = 40
    dose[:, 150] = 20
    gut, central, eliminated = cardio_sim.pk_amounts(p, dose)
    assert (gut >= -1e-9).all() and (central >= -1e-9).all()
    given = np.cumsum(dose, axis=1)
    np.testing.assert_allclose(gut + central + eliminated, given, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("simulator", ["bergman", "hovorka"])
def test_a_generated_cohort_can_be_replayed_to_its_mechanistic_truth(tmp_path, simulator):
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from twinfed.models.cohort import generate_cohort, replay_truth

    generate_cohort("glucose", sites=1, patients=3, days=0.5, seed=3, out=tmp_path, simulator=simulator)
    table = pacsv.read_csv(tmp_path / "site-a" / "timeseries.csv",
                           convert_options=pacsv.ConvertOptions(column_types={"patient_id": pa.string()}))
    ids = table.column("patient_id").to_pylist()
    rows = [i for i, pid in enumerate(ids) if pid == ids[0]]
    ctrl = {c: table.column(c).to_numpy()[rows] for c in ("insulin_u", "carbs_g")}
    truth = replay_truth(tmp_path, "site-a", ids[0], ctrl)["glucose_mgdl"]
    measured = table.column("glucose_mgdl").to_numpy()[rows]
    assert np.abs(measured - truth).mean() < 10  # only sensor noise separates them
    more = dict(ctrl, carbs_g=ctrl["carbs_g"] + np.where(np.arange(len(rows)) == 60, 40.0, 0.0))
    assert replay_truth(tmp_path, "site-a", ids[0], more)["glucose_mgdl"][84] > truth[84] + 30


def test_a_patient_with_an_extreme_carb_ratio_is_never_given_more_insulin_than_the_spec_allows():
    """A pump delivers at most the spec's insulin per step: a generated patient whose carb ratio
    is extreme (1 g/U here; a 1,500-patient cohort held one at 1.1 g/U, bolused 112.6 U) keeps a
    record the site can load, instead of failing the whole site's export."""
    spec = load_spec("glucose")
    top = spec.controls[spec.control_columns.index("insulin_u")].max
    n = 200
    doses = glucose_sim.treatment(glucose_sim.SITE_PROFILES[2], weight_kg=np.full(n, 110.0),
                                  basal_u_per_h=np.full(n, 1.0), carb_ratio_g_per_u=np.full(n, 1.0),
                                  n_steps=288 * 2, step_minutes=spec.step_minutes,
                                  rng=np.random.default_rng(0))
    assert doses["insulin_u"].max() <= top
    assert doses["insulin_u"].max() > 50  # still the large boluses such a patient takes
