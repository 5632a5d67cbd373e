"""The Hovorka (2004) glucose simulator: physiology, care that fits each patient, and cohorts that
name the simulator that made them (so their truth is replayed with it)."""

import json

import numpy as np
import pytest

from twinfed.cli.main import main
from twinfed.errors import TwinfedError
from twinfed.models.cohort import cohort_simulator, generate_cohort
from twinfed.models.sim import glucose_sim, hovorka_sim
from twinfed.models.site_data import load_site
from twinfed.models.spec import load_spec

DAY = 288  # 5-minute steps
PAED, ADULT, ELDERLY = hovorka_sim.SITE_PROFILES


def _patients(profile=ADULT, n=20, seed=0):
    return hovorka_sim.draw_params(profile, n, np.random.default_rng(seed))


def _basal_only(params, n_steps=DAY):
    n = params["weight_kg"].size
    return {"insulin_u": np.repeat((params["basal_u_per_h"] * 5 / 60)[:, None], n_steps, axis=1),
            "carbs_g": np.zeros((n, n_steps))}


def test_the_basal_rate_holds_each_patient_at_their_own_fasting_glucose():
    p = _patients()
    g = hovorka_sim.simulate(p, _basal_only(p))["glucose_mgdl"]
    np.testing.assert_allclose(g, np.repeat(p["gb_mmol"][:, None] * 18.0, DAY, axis=1), atol=1e-6)


def test_the_carb_ratio_brings_glucose_back_to_fasting_five_hours_after_the_test_meal():
    p = _patients()
    ctrl = _basal_only(p, n_steps=61)
    meal = hovorka_sim.TEST_MEAL_G * np.sqrt(p["weight_kg"] / 70.0)
    ctrl["carbs_g"][:, 0] = meal
    ctrl["insulin_u"][:, 0] += meal / hovorka_sim.carb_ratio(p)
    g = hovorka_sim.simulate(p, ctrl)["glucose_mgdl"]
    assert (g.max(axis=1) > p["gb_mmol"] * 18 + 30).all()  # the meal shows...
    np.testing.assert_allclose(g[:, -1], p["gb_mmol"] * 18, atol=0.5)  # ...and its bolus covers it


def test_insulin_and_carbohydrate_absorbed_never_exceed_what_was_given():
    p = _patients(n=10)
    ctrl = _basal_only(p)
    ctrl["carbs_g"][:, [20, 100, 101, 230]] = [[60, 30, 30, 80]]
    ctrl["insulin_u"][:, [20, 100, 229]] += [[5, 6, 8]]
    a = hovorka_sim.absorbed(p, ctrl)
    given_u = np.cumsum(ctrl["insulin_u"], axis=1)
    given_g = np.cumsum(ctrl["carbs_g"], axis=1)
    at_start = a["insulin_depot_u"][:, :1] + a["insulin_absorbed_u"][:, :1] - given_u[:, :1]  # basal depot
    assert all((v >= -1e-12).all() for v in a.values())
    assert (a["insulin_absorbed_u"] <= at_start + given_u + 1e-9).all()
    np.testing.assert_allclose(a["insulin_depot_u"] + a["insulin_absorbed_u"], at_start + given_u, rtol=1e-9)
    assert (a["carbs_absorbed_g"] <= given_g * p["ag"][:, None] + 1e-9).all()
    np.testing.assert_allclose(a["carbs_gut_g"] + a["carbs_absorbed_g"], given_g * p["ag"][:, None], atol=1e-9)


def test_a_week_of_1000_patients_simulates_without_nan_or_inf():
    p = _patients(PAED, n=1000, seed=1)
    ctrl = glucose_sim.treatment(PAED, weight_kg=p["weight_kg"], basal_u_per_h=p["basal_u_per_h"],
                                 carb_ratio_g_per_u=np.full(1000, 15.0), n_steps=7 * DAY, step_minutes=5,
                                 rng=np.random.default_rng(2))
    g = hovorka_sim.simulate(p, ctrl)["glucose_mgdl"]
    assert g.shape == (1000, 7 * DAY) and np.isfinite(g).all()


def test_an_absurd_dose_bottoms_glucose_out_at_the_sensor_floor_without_nan():
    p = _patients(PAED)
    ctrl = _basal_only(p)
    ctrl["insulin_u"][:, 10:12] = 100  # the spec's maximum, twice
    g = hovorka_sim.simulate(p, ctrl)["glucose_mgdl"]
    assert np.isfinite(g).all() and (g[:, 60] == 40).all()


def test_children_are_more_insulin_sensitive_than_the_elderly_and_need_less_insulin():
    paed, elderly = _patients(PAED, n=200), _patients(ELDERLY, n=200)
    for k in ("sit", "sid", "sie"):
        assert np.median(paed[k]) > 1.3 * np.median(elderly[k])
    assert np.median(paed["basal_u_per_h"] / paed["weight_kg"]) < np.median(elderly["basal_u_per_h"] / elderly["weight_kg"])
    assert np.median(hovorka_sim.carb_ratio(paed)) > np.median(hovorka_sim.carb_ratio(elderly))  # g per U


def test_open_loop_care_gives_realistic_glucose_at_every_site():
    in_range = {}
    for profile in hovorka_sim.SITE_PROFILES:
        g = hovorka_sim.generate(profile, 120, 3 * DAY, rng=np.random.default_rng(5)).states["glucose_mgdl"]
        in_range[profile.name] = ((g >= 70) & (g <= 180)).mean()
        assert ((g > 40) & (g < 400)).mean() > 0.9, profile.name  # the sensor rarely saturates
        assert 120 < g.mean() < 210 and (g < 70).mean() < 0.12, profile.name
    assert all(0.35 < v < 0.8 for v in in_range.values()), in_range
    assert 0.5 < in_range["adult"] < 0.75, in_range


# -- cohorts --------------------------------------------------------------------------------------

def _generate(out, *extra):
    return main(["cohort", "generate", "--twin", "glucose", "--sites", "2", "--patients", "3",
                 "--days", "0.25", "--seed", "1", "--out", str(out), *extra])


def test_cohort_generate_with_the_hovorka_simulator_names_it_and_loads_under_the_glucose_spec(tmp_path, capsys):
    out = tmp_path / "c"
    assert _generate(out, "--simulator", "hovorka") == 0
    assert "(simulator hovorka)" in capsys.readouterr().out
    manifest = json.loads((out / "cohort.json").read_text())
    assert manifest["simulator_name"] == "hovorka"
    assert manifest["simulator"] == "twinfed.models.sim.hovorka_sim"
    assert cohort_simulator(out) is hovorka_sim
    spec = load_spec("glucose")
    for site in ("site-a", "site-b"):
        assert load_site(out / site, spec).n_patients == 3


def test_cohort_generate_defaults_to_the_bergman_simulator(tmp_path):
    assert _generate(tmp_path / "c") == 0
    manifest = json.loads((tmp_path / "c" / "cohort.json").read_text())
    assert (manifest["simulator_name"], manifest["simulator"]) == ("bergman", "twinfed.models.sim.glucose_sim")


def test_an_unknown_simulator_is_a_one_line_error_listing_the_choices(tmp_path, capsys):
    assert _generate(tmp_path / "c", "--simulator", "uva-padova") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("twinfed: error: unknown simulator 'uva-padova'")
    assert "bergman" in err[0] and "hovorka" in err[0]
    assert not (tmp_path / "c").exists()


def test_the_cardio_twin_says_it_has_only_its_built_in_simulator(tmp_path, capsys):
    assert main(["cohort", "generate", "--twin", "cardio", "--simulator", "hovorka", "--out",
                 str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cardio twin has one built-in simulator, 'baroreflex'" in err[0]


def test_a_cohort_written_before_simulators_were_named_replays_with_its_module(tmp_path):
    generate_cohort("glucose", sites=1, patients=2, days=0.1, seed=0, out=tmp_path, simulator="hovorka")
    manifest = json.loads((tmp_path / "cohort.json").read_text())
    del manifest["simulator_name"]
    (tmp_path / "cohort.json").write_text(json.dumps(manifest))
    assert cohort_simulator(tmp_path) is hovorka_sim
    manifest["simulator"] = "os"
    (tmp_path / "cohort.json").write_text(json.dumps(manifest))
    with pytest.raises(TwinfedError, match="not one of the glucose twin's built-in simulators"):
        cohort_simulator(tmp_path)
