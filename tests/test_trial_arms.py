"""An in-silico trial's arms file: one-line errors naming the key, built-in outcomes bound by the
core's roles, each arm's controls, and the outcomes of hand-made trajectories."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from twinfed.errors import TrialError
from twinfed.models.arms import (BUILTIN_OUTCOMES, TrialDesign, arm_controls, load_design,
                                 outcome_values, parse_design, validate_design)
from twinfed.models.spec import load_spec, parse_spec

GLUCOSE = load_spec("glucose")
CARDIO = load_spec("cardio")
EXAMPLES = Path(__file__).parent.parent / "examples" / "trials"

CUSTOM = '{ name = "time_above_250", state = "glucose_mgdl", kind = "percent_above", high = 250.0 }'
OUTCOMES = f'outcomes = ["time_in_range", "mean_glucose", {CUSTOM}]'
MEAL_BOLUS = 'rule = { kind = "meal-bolus", insulin = "insulin_u", carbs = "carbs_g", grams_per_unit = 10.0 }'
DAILY_DOSE = 'rule = { kind = "daily-dose", control = "dose_mg", amount = 40.0, times_min = [480] }'
SNACK = 'rule = { kind = "daily-dose", control = "carbs_g", amount = 40.0, times_min = [480] }'

BASE = f"""
[trial]
name = "carb-ratio-10"
purpose = "in-silico-trial"
reference = "usual-care"
start_hours = 48
duration_days = 7
{OUTCOMES}
draws = 8
seed = 0

[[trial.arms]]
name = "usual-care"

[[trial.arms]]
name = "more-insulin"
scenario = "insulin_u*1.2"

[[trial.arms]]
name = "ratio-10"
{MEAL_BOLUS}

[[trial.arms]]
name = "fixed-snack"
{SNACK}
"""


def _parse(text: str, spec=GLUCOSE):
    return parse_design(text, spec, source="arms.toml")


def _error(text: str, spec=GLUCOSE) -> str:
    with pytest.raises(TrialError) as info:
        _parse(text, spec)
    message = str(info.value)
    assert "\n" not in message and message.startswith("arms.toml: ")
    return message


def _edit(old: str, new: str) -> str:
    assert old in BASE
    return BASE.replace(old, new, 1)


def _design(body: str, spec=GLUCOSE, *, duration_days="1") -> TrialDesign:
    """A two-arm design (usual care and ``body``) over ``duration_days``."""
    return _parse(f"""
[trial]
name = "t"
purpose = "in-silico-trial"
reference = "usual-care"
start_hours = 0
duration_days = {duration_days}
outcomes = ["{'time_in_range' if spec.core.name == 'glucose-insulin' else 'mean_sbp'}"]

[[trial.arms]]
name = "usual-care"

[[trial.arms]]
name = "arm"
{body}
""", spec)


# A glucose twin with 6-hour steps: a day is 4 steps, small enough to write by hand.
COARSE = parse_spec(GLUCOSE.to_toml().replace("step_minutes = 5", "step_minutes = 360"))


def test_a_valid_file_parses_with_its_defaults_and_resolved_outcomes():
    design = _parse(BASE.replace("draws = 8\nseed = 0\n", ""))
    assert [a.name for a in design.arms] == ["usual-care", "more-insulin", "ratio-10", "fixed-snack"]
    assert design.arm("usual-care").scenario == "recorded" and design.arm("usual-care").rule is None
    assert design.arm("ratio-10").rule.basal_u_per_h == "recorded"
    assert (design.draws, design.seed) == (8, 0)
    custom = design.outcomes[2]
    assert (custom.kind, custom.high, custom.bounds, custom.contrast_bound) == (
        "percent_above", 250.0, (0.0, 100.0), 100.0)


def test_a_valid_file_round_trips_through_its_canonical_json():
    design = _parse(BASE)
    text = design.canonical_json()
    assert TrialDesign.model_validate_json(text, context={"spec": GLUCOSE}) == design
    assert validate_design(json.loads(text), GLUCOSE) == design
    assert json.loads(text) == json.loads(design.model_dump_json())
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))


def test_a_stored_design_reads_back_without_the_spec():
    design = _parse(BASE)
    assert TrialDesign.model_validate_json(design.canonical_json()) == design


def test_outcomes_as_an_array_of_tables_parse_like_an_inline_list():
    tables = BASE.replace(OUTCOMES + "\n", "") + """
[[trial.outcomes]]
name = "time_above_250"
state = "glucose_mgdl"
kind = "percent_above"
high = 250.0
"""
    assert _parse(tables).outcomes == (_parse(BASE).outcomes[2],)


def test_reading_a_design_needs_no_torch():
    code = "import sys, twinfed.models.arms; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_steps_are_on_the_spec_grid():
    design = _parse(BASE)
    assert design.steps(GLUCOSE) == (48 * 60 // GLUCOSE.step_minutes, 7 * 1440 // GLUCOSE.step_minutes)


def test_asking_for_an_arm_that_is_not_there_names_the_arms():
    with pytest.raises(TrialError, match="no arm 'placebo'; the arms are usual-care, more-insulin"):
        _parse(BASE).arm("placebo")


@pytest.mark.parametrize("text, message", [
    ("[trial\nname = 'x'", "not valid TOML"),
    ("", "no [trial] table"),
    (BASE + "\n[trials]\nname = 'x'\n", "unknown top-level key(s) trials"),
    ("trial = 5", "trial: must be a table"),
    (_edit("draws = 8", "draws = 8\ndurations = 3"), "trial.durations: unknown key"),
    (_edit('scenario = "insulin_u*1.2"', 'scenario = "insulin_u*1.2"\nscenarios = "x"'),
     "trial.arms[1].scenarios: unknown key"),
    (_edit("grams_per_unit = 10.0", "grams_per_units = 10.0"),
     "trial.arms[2].rule.grams_per_units: unknown key"),
    (_edit('high = 250.0 }', 'high = 250.0, unit = "mg/dL" }'), "trial.outcomes[2].unit: unknown key"),
    (_edit('purpose = "in-silico-trial"\n', ""), "trial.purpose: required key is missing"),
    (_edit("grams_per_unit = 10.0", "basal_u_per_h = 0.9"),
     "trial.arms[2].rule.grams_per_unit: required key is missing"),
    (_edit("duration_days = 7", 'duration_days = "7"'), "trial.duration_days: must be a number"),
    (_edit("start_hours = 48", "start_hours = true"), "trial.start_hours: must be a number"),
    (_edit("draws = 8", "draws = true"), "trial.draws: must be a whole number"),
    (_edit("draws = 8", "draws = 8.0"), "trial.draws: must be a whole number"),
    (_edit("duration_days = 7", "duration_days = nan"), "trial.duration_days: must be a finite number"),
    (_edit("start_hours = 48", "start_hours = inf"), "trial.start_hours: must be a finite number"),
    (_edit("grams_per_unit = 10.0", "grams_per_unit = nan"),
     "trial.arms[2].rule.grams_per_unit: must be a finite number"),
    (_edit('name = "carb-ratio-10"', 'name = "carb ratio"'), "trial.name: must be a plain name"),
    (_edit('name = "more-insulin"', 'name = 5'), "trial.arms[1].name: must be text in double quotes"),
    (_edit('purpose = "in-silico-trial"', 'purpose = ""'), "trial.purpose: must not be empty"),
    (_edit("start_hours = 48", "start_hours = -5"), "trial.start_hours: must be at least 0"),
    (_edit("duration_days = 7", "duration_days = 0"), "trial.duration_days: must be above 0"),
    (_edit("duration_days = 7", "duration_days = 91"), "trial.duration_days: must be at most 90"),
    (_edit("draws = 8", "draws = 0"), "trial.draws: must be at least 1"),
    (_edit("draws = 8", "draws = 257"), "trial.draws: must be at most 256"),
    (_edit("seed = 0", "seed = -1"), "trial.seed: must be at least 0"),
    (_edit('reference = "usual-care"', 'reference = "placebo"'),
     "trial.reference: 'placebo' is not one of the arms (usual-care, more-insulin, ratio-10, fixed-snack)"),
    (_edit('name = "more-insulin"', 'name = "usual-care"'),
     "trial.arms[1].name: arm usual-care is named twice"),
    (BASE.split("[[trial.arms]]")[0] + '[[trial.arms]]\nname = "usual-care"\n',
     "trial.arms: a trial compares at least 2 arms"),
    (_edit('scenario = "insulin_u*1.2"', 'scenario = "insulin_u/2"'),
     "trial.arms[1].scenario: arm more-insulin: cannot read 'insulin_u/2'"),
    (_edit('scenario = "insulin_u*1.2"', 'scenario = "heparin*2"'),
     "trial.arms[1].scenario: arm more-insulin: 'heparin' is not a control of the twin"),
    (_edit('scenario = "insulin_u*1.2"', 'scenario = "glucose_mgdl*2"'),
     "trial.arms[1].scenario: arm more-insulin: 'glucose_mgdl' is not a control of the twin"),
    (_edit('scenario = "insulin_u*1.2"', 'scenario = "carbs_g+30"'),
     "trial.arms[1].scenario: arm more-insulin: '+' needs a minute"),
    (_edit('scenario = "insulin_u*1.2"', f'scenario = "carbs_g+30@{7 * 1440}"'),
     f"trial.arms[1].scenario: arm more-insulin: minute {7 * 1440} must be a multiple of 5 below "
     f"{7 * 1440} min"),
    (_edit('scenario = "insulin_u*1.2"', 'scenario = "carbs_g+30@7"'),
     "trial.arms[1].scenario: arm more-insulin: minute 7 must be a multiple of 5"),
    (_edit('insulin = "insulin_u"', 'insulin = "glucose_mgdl"'),
     "trial.arms[2].rule.insulin: 'glucose_mgdl' is not a control of twin 't1d-glucose'"),
    (_edit('carbs = "carbs_g"', 'carbs = "insulin_u"'),
     "trial.arms[2].rule.carbs: must be another control than insulin"),
    (_edit('control = "carbs_g"', 'control = "dose_mg"'),
     "trial.arms[3].rule.control: 'dose_mg' is not a control of twin 't1d-glucose'"),
    (_edit('kind = "meal-bolus"', 'kind = "basal"'),
     "trial.arms[2].rule.kind: unknown kind 'basal'; the kinds are 'meal-bolus', 'daily-dose'"),
    (_edit('kind = "meal-bolus", ', ""), "trial.arms[2].rule.kind: required key is missing"),
    (_edit(MEAL_BOLUS,
           'rule = "meal-bolus"'),
     "trial.arms[2].rule: must be a table"),
    (_edit("grams_per_unit = 10.0", "grams_per_unit = 0"),
     "trial.arms[2].rule.grams_per_unit: must be above 0"),
    (_edit("grams_per_unit = 10.0", 'grams_per_unit = 10.0, basal_u_per_h = "usual"'),
     'trial.arms[2].rule.basal_u_per_h: must be a number of U/h (e.g. 0.9) or "recorded"'),
    (_edit("grams_per_unit = 10.0", "grams_per_unit = 10.0, basal_u_per_h = -1.0"),
     "trial.arms[2].rule.basal_u_per_h: must be a finite number of U/h, at least 0"),
    (_edit("times_min = [480]", "times_min = [482]"),
     "trial.arms[3].rule.times_min[0]: minute 482 is not a multiple of the twin's step (5 min)"),
    (_edit("times_min = [480]", "times_min = [480, 1440]"),
     "trial.arms[3].rule.times_min[1]: must be below 1440"),
    (_edit("times_min = [480]", "times_min = [480, 480]"),
     "trial.arms[3].rule.times_min[1]: minute 480 is listed twice"),
    (_edit("times_min = [480]", "times_min = []"), "trial.arms[3].rule.times_min: needs at least 1 item"),
    (_edit("times_min = [480]", "times_min = [480.0]"),
     "trial.arms[3].rule.times_min[0]: must be a whole number"),
    (_edit("amount = 40.0", "amount = 400.0"),
     "trial.arms[3].rule.amount: must be within carbs_g's range [0, 300] g"),
    (_edit('"time_in_range", "mean_glucose"', '"time_in_range", "time_in_rnage"'),
     "trial.outcomes[1]: unknown outcome 'time_in_rnage'; the built-in outcomes are "
     + ", ".join(BUILTIN_OUTCOMES)),
    (_edit('"time_in_range", "mean_glucose"', '"time_in_range", "time_in_range"'),
     "trial.outcomes[1]: outcome time_in_range is listed twice"),
    (_edit('"mean_glucose", {', '"mean_glucose", 5, {'),
     "trial.outcomes[2]: must be a built-in outcome name in double quotes or a table"),
    (_edit(OUTCOMES,
           "outcomes = []"), "trial.outcomes: needs at least 1 item"),
    (_edit('state = "glucose_mgdl"', 'state = "insulin_u"'),
     "trial.outcomes[2].state: 'insulin_u' is not a state of twin 't1d-glucose' (states: glucose_mgdl)"),
    (_edit('kind = "percent_above"', 'kind = "median"'), "trial.outcomes[2].kind: must be one of 'mean'"),
    (_edit('kind = "percent_above", high = 250.0', 'kind = "percent_between", low = 180.0, high = 70.0'),
     "trial.outcomes[2].high: must be above low (180)"),
    (_edit('kind = "percent_above", high = 250.0', 'kind = "percent_between", low = 70.0, high = 70.0'),
     "trial.outcomes[2].high: must be above low (70)"),
    (_edit("high = 250.0", "low = 250.0"), "trial.outcomes[2].low: not used by kind percent_above"),
    (_edit('kind = "percent_above", high = 250.0', 'kind = "percent_below", high = 250.0'),
     "trial.outcomes[2].low: required by kind percent_below"),
    (_edit("high = 250.0", "high = 250.0, bounds = [100.0, 0.0]"),
     "trial.outcomes[2].bounds: must be [lo, hi] with lo below hi, not [100, 0]"),
    (_edit("high = 250.0", "high = 250.0, bounds = [0.0]"),
     "trial.outcomes[2].bounds: has too few items (write [lo, hi])"),
    (_edit("high = 250.0", "high = 250.0, contrast_bound = 0"),
     "trial.outcomes[2].contrast_bound: must be above 0"),
    (_edit("start_hours = 48", "start_hours = 48.01"),
     "trial.start_hours: 48.01 h is not on the twin's 5-min step grid"),
    (_edit("duration_days = 7", "duration_days = 0.0001"),
     "trial.duration_days: 0.0001 days is not a whole number of the twin's 5-min steps"),
])
def test_every_mistake_is_one_line_naming_the_key(text, message):
    assert message in _error(text)


def test_builtin_outcomes_resolve_to_the_glucose_twins_columns():
    text = _edit(f'"time_in_range", "mean_glucose", {CUSTOM}',
                 '"time_in_range", "time_below_70", "time_above_180", "mean_glucose"')
    outcomes = _parse(text).outcomes
    assert {o.state for o in outcomes} == {GLUCOSE.core.roles["glucose"]}
    tir, below, above, mean = outcomes
    assert (tir.kind, tir.low, tir.high, tir.bounds, tir.contrast_bound) == (
        "percent_between", 70, 180, (0, 100), 100)
    assert (below.kind, below.low, below.high) == ("percent_below", 70, None)
    assert (above.kind, above.low, above.high) == ("percent_above", None, 180)
    assert (mean.kind, mean.bounds, mean.contrast_bound) == ("mean", (40, 400), 100)


def test_builtin_outcomes_resolve_to_the_cardio_twins_columns():
    design = _design(DAILY_DOSE,
                     CARDIO)
    text = design.canonical_json()
    doc = json.loads(text) | {"outcomes": ["mean_sbp", "time_above_140", "mean_hr"]}
    mean_sbp, above, mean_hr = validate_design(doc, CARDIO).outcomes
    assert (mean_sbp.state, mean_sbp.bounds, mean_sbp.contrast_bound) == (
        CARDIO.core.roles["sbp"], (80, 220), 40)
    assert (above.state, above.kind, above.high) == (CARDIO.core.roles["sbp"], "percent_above", 140)
    assert (mean_hr.state, mean_hr.bounds, mean_hr.contrast_bound) == (CARDIO.core.roles["hr"], (40, 160), 30)


def test_builtin_outcomes_follow_the_cores_roles_not_the_column_names():
    renamed = parse_spec(GLUCOSE.to_toml().replace('"glucose_mgdl"', '"cgm"'))
    design = _design('scenario = "insulin_u*2"', renamed)
    assert design.outcomes[0].state == "cgm"


@pytest.mark.parametrize("spec, outcome, role, own", [
    (GLUCOSE, "mean_sbp", "sbp", "time_in_range, time_below_70, time_above_180, mean_glucose"),
    (CARDIO, "time_in_range", "glucose", "mean_sbp, time_above_140, mean_hr"),
])
def test_a_builtin_outcome_on_the_wrong_twin_is_one_line_naming_the_twins_own(spec, outcome, role, own):
    body = 'scenario = "%s*2"' % spec.control_columns[0]
    doc = json.loads(_design(body, spec).canonical_json()) | {"outcomes": [outcome]}
    with pytest.raises(TrialError) as info:
        validate_design(doc, spec, source="arms.toml")
    assert str(info.value) == (f"arms.toml: trial.outcomes[0]: {outcome} needs a twin whose core binds "
                               f"a {role} column; twin {spec.name!r} has none; this twin's built-in "
                               f"outcomes are {own}")


def test_a_builtin_outcome_on_a_twin_without_a_core_asks_for_a_table():
    coreless = GLUCOSE.model_copy(update={"core": None})
    message = _error(BASE, coreless)
    assert "trial.outcomes[0]: time_in_range needs a twin whose core binds a glucose column" in message
    assert "define the outcome as a table with name, state and kind" in message


def test_a_custom_mean_is_clipped_to_its_states_spec_range_by_default():
    text = _edit('kind = "percent_above", high = 250.0', 'kind = "mean"')
    outcome = _parse(text).outcomes[2]
    col = GLUCOSE.column("glucose_mgdl")
    assert outcome.bounds == (col.min, col.max) and outcome.contrast_bound == col.max - col.min


def test_a_custom_outcome_keeps_its_own_bounds_and_contrast_bound():
    outcome = _parse(_edit("high = 250.0", "high = 250.0, bounds = [0, 50], contrast_bound = 20")).outcomes[2]
    assert (outcome.bounds, outcome.contrast_bound) == ((0.0, 50.0), 20.0)


@pytest.mark.parametrize("name, spec", [("glucose-carb-ratio.toml", GLUCOSE),
                                        ("cardio-morning-dose.toml", CARDIO)])
def test_the_example_arms_files_parse_for_their_twins(name, spec):
    design = load_design(EXAMPLES / name, spec)
    assert design.purpose == "in-silico-trial" and design.reference == "usual-care"
    assert design.steps(spec) == (48 * 60 // spec.step_minutes, 7 * 1440 // spec.step_minutes)
    assert [a.rule is not None for a in design.arms] == [False, True]


def test_the_example_files_say_what_they_compare():
    glucose = load_design(EXAMPLES / "glucose-carb-ratio.toml", GLUCOSE)
    assert [o.name for o in glucose.outcomes] == ["time_in_range", "time_below_70", "mean_glucose"]
    assert glucose.arms[1].rule.grams_per_unit == 10.0
    cardio = load_design(EXAMPLES / "cardio-morning-dose.toml", CARDIO)
    assert [o.name for o in cardio.outcomes] == ["mean_sbp", "time_above_140"]
    assert (cardio.arms[1].rule.amount, cardio.arms[1].rule.times_min) == (40.0, (480,))


def test_load_design_reads_a_bom_and_names_missing_or_non_utf8_files(tmp_path):
    path = tmp_path / "arms.toml"
    path.write_bytes(b"\xef\xbb\xbf" + BASE.encode())
    assert load_design(path, GLUCOSE) == _parse(BASE)
    with pytest.raises(TrialError, match="no such file"):
        load_design(tmp_path / "nope.toml", GLUCOSE)
    path.write_bytes(b"[trial]\nname = \"\xff\"\n")
    with pytest.raises(TrialError, match="not UTF-8"):
        load_design(path, GLUCOSE)


# -- arm_controls ----------------------------------------------------------------------------------

def _controls(insulin, carbs):
    """``[P, T, 2]`` glucose controls from per-patient insulin and carbs rows."""
    return np.stack([np.asarray(insulin, float), np.asarray(carbs, float)], axis=-1)


def test_usual_care_returns_the_base_controls_as_float32():
    design = _design('scenario = "recorded"', COARSE)
    base = _controls([[0.5, 1.0, 0.5, 2.0]], [[0, 60, 0, 30]])
    out = arm_controls(design, design.arm("usual-care"), COARSE, base, np.zeros((1, 0, 2)))
    assert out.dtype == np.float32 and out.shape == base.shape and np.array_equal(out, base)


def test_a_scale_scenario_scales_only_its_control():
    design = _design('scenario = "insulin_u*1.5"', COARSE)
    base = _controls([[0.5, 1.0, 0.5, 2.0]], [[0, 60, 0, 30]])
    out = arm_controls(design, design.arm("arm"), COARSE, base, np.zeros((1, 3, 2)))
    assert np.allclose(out[..., 0], [[0.75, 1.5, 0.75, 3.0]]) and np.array_equal(out[..., 1], base[..., 1])


def test_meal_bolus_doses_the_carbs_on_each_patients_recorded_basal():
    design = _design(MEAL_BOLUS,
                     COARSE)
    base = _controls([[3.0, 3.0, 3.0, 3.0], [3.0, 3.0, 3.0, 3.0]], [[0, 60, 0, 30], [45, 0, 0, 0]])
    # patient 0 recorded a flat 0.1 U a step with one bolus; patient 1 0.0 to 0.9 U.
    before = _controls([[0.1] * 9 + [5.0], [0.1 * i for i in range(10)]], [[0.0] * 10, [0.0] * 10])
    out = arm_controls(design, design.arm("arm"), COARSE, base, before)
    assert np.allclose(out[0, :, 0], [0.1, 0.1 + 6.0, 0.1, 0.1 + 3.0])
    assert np.allclose(out[1, :, 0], [0.09 + 4.5, 0.09, 0.09, 0.09])  # 10th percentile of 0..0.9
    assert np.array_equal(out[..., 1], base[..., 1])


def test_meal_bolus_without_a_record_before_reads_the_basal_from_usual_care():
    design = _design(MEAL_BOLUS.replace("10.0", "12.0"),
                     COARSE)
    base = _controls([[0.2, 0.2, 0.2, 8.0]], [[0, 60, 0, 0]])
    out = arm_controls(design, design.arm("arm"), COARSE, base, np.zeros((1, 0, 2)))
    assert np.allclose(out[0, :, 0], [0.2, 0.2 + 5.0, 0.2, 0.2])


def test_meal_bolus_reads_the_basal_from_usual_care_for_a_patient_with_nothing_recorded_before():
    design = _design(MEAL_BOLUS,
                     COARSE)
    base = _controls([[0.3, 0.3, 0.3, 0.3], [0.4, 0.4, 0.4, 0.4]], [[0, 0, 0, 0], [0, 0, 0, 0]])
    before = _controls([[np.nan, np.nan], [0.1, np.nan]], [[0, 0], [0, 0]])
    out = arm_controls(design, design.arm("arm"), COARSE, base, before)
    assert np.allclose(out[:, :, 0], [[0.3] * 4, [0.1] * 4])


def test_meal_bolus_with_a_basal_rate_gives_it_per_step():
    design = _design(MEAL_BOLUS.replace("10.0", "10.0, basal_u_per_h = 0.5"),
                     COARSE)
    base = _controls([[9.0, 9.0, 9.0, 9.0]], [[0, 20, 0, 0]])
    out = arm_controls(design, design.arm("arm"), COARSE, base, np.full((1, 2, 2), 7.0))
    per_step = 0.5 * COARSE.step_minutes / 60
    assert np.allclose(out[0, :, 0], [per_step, per_step + 2.0, per_step, per_step])


def test_the_rule_applies_before_the_scenario():
    design = _design('scenario = "insulin_u*2"\n' + MEAL_BOLUS.replace("10.0", "10.0, basal_u_per_h = 0.0"),
                     COARSE)
    out = arm_controls(design, design.arm("arm"), COARSE, _controls([[1, 1, 1, 1]], [[0, 20, 0, 0]]),
                       np.zeros((1, 0, 2)))
    assert np.allclose(out[0, :, 0], [0, 4.0, 0, 0])


def test_daily_dose_is_the_amount_at_its_minutes_of_every_day_and_zero_elsewhere():
    design = _design(DAILY_DOSE.replace("[480]", "[480, 1200]"),
                     CARDIO, duration_days="2")
    _, t = design.steps(CARDIO)
    per_day = 1440 // CARDIO.step_minutes
    base = np.full((3, t, 2), 0.5)
    out = arm_controls(design, design.arm("arm"), CARDIO, base, np.zeros((3, 4, 2)))
    dosed = [d * per_day + m // CARDIO.step_minutes for d in (0, 1) for m in (480, 1200)]
    assert [int(i) for i in np.flatnonzero(out[0, :, 0])] == dosed
    assert (out[:, dosed, 0] == 40.0).all() and out[..., 0].sum() == 3 * 4 * 40.0
    assert np.array_equal(out[..., 1], base[..., 1])  # activity as recorded


def test_a_minute_in_the_scenario_counts_from_the_trials_start():
    design = _design('scenario = "carbs_g+30@15"')
    _, t = design.steps(GLUCOSE)
    base = np.zeros((2, t, 2))
    out = arm_controls(design, design.arm("arm"), GLUCOSE, base, np.ones((2, 12, 2)))
    at = 15 // GLUCOSE.step_minutes
    assert (out[:, at, 1] == 30).all() and out[..., 1].sum() == 2 * 30


@pytest.mark.parametrize("body", [
    MEAL_BOLUS.replace("10.0", "0.1"),
    'scenario = "insulin_u*150"',
    'scenario = "insulin_u=100,insulin_u+1@0"',
])
def test_controls_outside_the_spec_range_name_the_arm_without_patient_values(body):
    design = _design(body, COARSE)
    base = _controls([[1.0, 1.0, 1.0, 1.0]], [[0, 60, 0, 0]])
    with pytest.raises(TrialError) as info:
        arm_controls(design, design.arm("arm"), COARSE, base, np.zeros((1, 0, 2)))
    message = str(info.value)
    assert message.startswith("arm arm: insulin_u leaves the spec's range [0, 100] U") and "\n" not in message
    assert not any(value in message for value in ("600", "150", "101"))


def test_controls_of_the_wrong_shape_are_refused():
    design = _design('scenario = "recorded"', COARSE)
    with pytest.raises(TrialError, match=r"expected \[patients, 4, 2\]"):
        arm_controls(design, design.arm("arm"), COARSE, np.zeros((1, 5, 2)), np.zeros((1, 0, 2)))
    with pytest.raises(TrialError, match="missing"):
        arm_controls(design, design.arm("arm"), COARSE, np.full((1, 4, 2), np.nan), np.zeros((1, 0, 2)))


# -- outcome_values --------------------------------------------------------------------------------

def _glucose_design():
    return _parse(_edit('"time_in_range", "mean_glucose", {',
                        '"time_in_range", "time_below_70", "time_above_180", "mean_glucose", {'))


def test_outcomes_of_a_hand_made_glucose_trajectory():
    states = np.array([60.0, 100.0, 150.0, 260.0])[:, None]
    tir, below, above, mean, above_250 = outcome_values(_glucose_design(), GLUCOSE, states)
    assert (tir, below, above, above_250) == (50.0, 25.0, 25.0, 25.0)
    assert mean == pytest.approx((60 + 100 + 150 + 260) / 4)


def test_range_thresholds_are_inclusive_and_below_above_strict():
    states = np.array([70.0, 180.0, 69.9, 180.1])[:, None]
    tir, below, above, _, _ = outcome_values(_glucose_design(), GLUCOSE, states)
    assert (tir, below, above) == (50.0, 25.0, 25.0)


def test_outcomes_keep_the_leading_dimensions():
    rng = np.random.default_rng(0)
    states = rng.uniform(40, 300, size=(2, 3, 10, 1))
    out = outcome_values(_glucose_design(), GLUCOSE, states)
    assert out.shape == (2, 3, 5) and out.dtype == np.float64
    assert np.allclose(out[..., 0], 100 * ((states[..., 0] >= 70) & (states[..., 0] <= 180)).mean(-1))
    assert np.allclose(out[..., 3], states[..., 0].mean(-1))


def test_cardio_outcomes_read_their_own_columns():
    design = _design(DAILY_DOSE,
                     CARDIO)
    doc = json.loads(design.canonical_json()) | {"outcomes": ["mean_sbp", "time_above_140", "mean_hr"]}
    states = np.array([[130.0, 60.0], [150.0, 80.0]])  # sbp, hr per step
    assert list(outcome_values(validate_design(doc, CARDIO), CARDIO, states)) == [140.0, 50.0, 70.0]


def test_a_trajectory_with_a_nan_step_gives_nan_not_a_smaller_percent():
    states = np.array([[100.0, np.nan], [100.0, 120.0]])[..., None]
    out = outcome_values(_glucose_design(), GLUCOSE, states)
    assert np.isnan(out[0]).all() and out[1, 0] == 100.0


def test_trajectories_without_the_specs_states_are_refused():
    with pytest.raises(TrialError, match=r"expected \[\.\.\., steps, 1\]"):
        outcome_values(_glucose_design(), GLUCOSE, np.zeros((4, 2)))
