"""The benchmark's results format and table, on synthetic figures (no study is run)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is not an installed package

from bench.report import (figure, format_table, markdown_table, merge, missed, read_json,  # noqa: E402
                          write_json)
from bench.sizes import FULL, QUICK  # noqa: E402


def _results() -> dict:
    return {
        "run": {"sections": {"cost": {"status": "ok"}}},
        "accuracy": {"glucose.rmse60.central": figure(20.0, "mg/dL", conditions={"steps": 3000}),
                     "glucose.ratio.federated_dp_vs_central": figure(1.73, "x", target=1.15)},
        "whatif": {"glucose.hovorka.federated_dp.effect_direction_agreement":
                   figure(0.93, "fraction", target=0.9, at_least=True)},
        "cost": {"dp_step.ratio": figure(1.46, "x", target=1.5)},
        "audit": {"verify_seconds": figure(5.0, "s", target=5.0)},
    }


def test_a_figure_with_a_target_meets_it_only_at_or_below_the_target():
    assert figure(1.15, "x", target=1.15)["meets_target"] is True
    assert figure(1.1501, "x", target=1.15)["meets_target"] is False
    assert figure(0.2, "x", target=0.8)["meets_target"] is True


def test_a_figure_with_a_lower_bound_meets_it_only_at_or_above_the_target():
    assert figure(0.95, "fraction", target=0.95, at_least=True)["meets_target"] is True
    assert figure(0.9499, "fraction", target=0.95, at_least=True)["meets_target"] is False
    assert figure(1.0, "fraction", target=0.95, at_least=True)["meets_target"] is True


def test_a_target_records_which_bound_it_is():
    assert figure(1.0, "x", target=1.15)["target_bound"] == "upper"
    assert figure(1.0, "fraction", target=0.95, at_least=True)["target_bound"] == "lower"


@pytest.mark.parametrize("at_least", [False, True])
def test_a_failed_measurement_never_meets_its_target(at_least):
    assert figure(math.nan, "x", target=1.5, at_least=at_least)["meets_target"] is False


def test_a_figure_with_a_target_range_meets_it_only_inside_the_range_ends_included():
    assert figure(0.93, "fraction", target_range=(0.93, 0.97))["meets_target"] is True
    assert figure(0.97, "fraction", target_range=(0.93, 0.97))["meets_target"] is True
    assert figure(0.9299, "fraction", target_range=(0.93, 0.97))["meets_target"] is False
    assert figure(0.9701, "fraction", target_range=(0.93, 0.97))["meets_target"] is False
    assert figure(math.nan, "fraction", target_range=(0.93, 0.97))["meets_target"] is False


def test_a_target_range_is_stored_as_its_two_ends_with_the_range_bound():
    fig = figure(0.95, "fraction", target_range=(0.93, 0.97))
    assert set(fig) == {"value", "unit", "target", "target_bound", "meets_target", "conditions"}
    assert fig["target"] == [0.93, 0.97] and fig["target_bound"] == "range"
    assert json.loads(json.dumps(fig)) == fig


@pytest.mark.parametrize("kwargs", [{"target": 0.95}, {"target": 0.95, "at_least": True}, {"at_least": True}])
def test_a_figure_refuses_a_target_range_beside_a_bound(kwargs):
    with pytest.raises(ValueError):
        figure(0.95, "fraction", target_range=(0.93, 0.97), **kwargs)


def test_a_target_range_must_not_be_reversed():
    with pytest.raises(ValueError):
        figure(0.95, "fraction", target_range=(0.97, 0.93))


def test_the_tables_show_a_range_of_fractions_in_percent_and_its_verdict():
    results = {"trial": {"glucose.bergman.glucose_mgdl.coverage_95":
                         figure(0.91, "fraction", target_range=(0.93, 0.97)),
                         "cardio.baroreflex.sbp_mmhg.coverage_95":
                         figure(0.95, "fraction", target_range=(0.93, 0.97))}}
    lines = format_table(results).splitlines()[2:]
    assert lines[0].split()[-2:] == ["93-97%", "MISSED"]
    assert lines[1].split()[-2:] == ["93-97%", "ok"]
    rows = markdown_table(results).splitlines()[2:]
    assert rows[0].endswith("| 0.91 fraction | 93-97% | **no** |")
    assert rows[1].endswith("| 0.95 fraction | 93-97% | yes |")
    assert [n for _, n, _ in missed(results)] == ["glucose.bergman.glucose_mgdl.coverage_95"]


def test_a_range_of_other_units_is_shown_with_its_unit():
    results = {"trial": {"x": figure(3.0, "s", target_range=(1, 5))}}
    assert "1.00-5.00" in format_table(results)
    assert markdown_table(results).splitlines()[2].endswith("| 3.00 s | 1.00-5.00 s | yes |")


def test_the_trial_section_follows_the_what_if_section():
    from bench.report import SECTIONS

    assert SECTIONS.index("trial") == SECTIONS.index("whatif") + 1


def test_the_real_trials_randomisation_is_balanced_and_seeded():
    from bench.trial import randomise

    arms = randomise(401, 2, seed=3)
    assert sorted(np.bincount(arms).tolist()) == [200, 201]
    assert np.array_equal(arms, randomise(401, 2, seed=3))
    assert not np.array_equal(arms, randomise(401, 2, seed=4))


def test_the_welch_interval_of_a_known_case():
    from bench.trial import welch

    # means 2 and 5, sample variances 1 and 4, 3 patients each: se = sqrt(1/3 + 4/3), df = 2.94...
    out = welch(np.array([1.0, 2.0, 3.0]), np.array([3.0, 5.0, 7.0]))
    se = math.sqrt(5 / 3)
    df = (5 / 3) ** 2 / ((1 / 3) ** 2 / 2 + (4 / 3) ** 2 / 2)
    assert out["mean"] == pytest.approx(3.0) and out["se"] == pytest.approx(se) and out["df"] == pytest.approx(df)
    from scipy.stats import t

    half = t.ppf(0.975, df) * se
    assert out["ci95"] == pytest.approx([3.0 - half, 3.0 + half])


def test_the_welch_interval_of_constant_groups_has_no_width():
    from bench.trial import welch

    assert welch(np.zeros(5), np.zeros(4)) == {"mean": 0.0, "ci95": [0.0, 0.0], "se": 0.0, "df": math.inf}


def test_a_figure_without_a_target_has_no_target_keys():
    fig = figure(61.5, "mg/dL", conditions={"horizon_minutes": 60})
    assert set(fig) == {"value", "unit", "conditions"}
    assert fig["conditions"] == {"horizon_minutes": 60}


def test_a_figure_with_a_target_has_exactly_the_documented_keys():
    fig = figure(3, "s", target=5)
    assert set(fig) == {"value", "unit", "target", "target_bound", "meets_target", "conditions"}
    assert isinstance(fig["value"], float) and fig["target"] == 5.0


@pytest.mark.parametrize("value", [True, "1.2", None])
def test_a_figure_value_must_be_a_number(value):
    with pytest.raises(TypeError):
        figure(value, "x")


def test_the_table_shows_each_figure_against_its_target_in_section_order():
    lines = format_table(_results()).splitlines()
    body = lines[2:]
    assert [line.split()[0] for line in body] == ["accuracy", "accuracy", "whatif", "cost", "audit"]
    central = next(line for line in body if "rmse60.central" in line)
    assert "20.00" in central and "mg/dL" in central and "<=" not in central
    assert "ok" not in central.split() and "MISSED" not in central
    ratio = next(line for line in body if "federated_dp_vs_central" in line)
    assert ratio.split()[-2:] == ["1.15", "MISSED"] and "<= 1.15" in ratio
    assert body[-1].split()[-1] == "ok"  # 5.0 s against "under 5 s" is on the line: met
    direction = next(line for line in body if "effect_direction_agreement" in line)
    assert ">= 0.9" in direction and direction.split()[-1] == "ok"


def test_results_written_before_targets_had_a_bound_read_as_upper_bounds():
    old = {"cost": {"dp_step.ratio": {"value": 1.46, "unit": "x", "target": 1.5, "meets_target": True,
                                      "conditions": {}}}}
    assert "<= 1.50" in format_table(old)


def test_only_targets_leaves_out_figures_without_one():
    table = format_table(_results(), only_targets=True)
    assert "rmse60.central" not in table and "verify_seconds" in table


def test_the_markdown_table_has_one_row_per_target_and_marks_misses():
    rows = markdown_table(_results()).splitlines()[2:]
    assert len(rows) == 4
    assert rows[0].endswith("| 1.73x | <= 1.15x | **no** |")
    assert rows[1].endswith("| 0.93 fraction | >= 0.9 fraction | yes |")
    assert rows[3].endswith("| 5.00 s | <= 5.00 s | yes |")


def test_missed_lists_only_figures_that_miss_their_target():
    assert [(s, n) for s, n, _ in missed(_results())] == [("accuracy", "glucose.ratio.federated_dp_vs_central")]


def test_an_only_run_replaces_its_sections_and_keeps_the_others():
    fresh = {"cost": {"dp_step.ratio": figure(1.9, "x", target=1.5)},
             "run": {"started_at": "later", "sections": {"cost": {"status": "ok", "started_at": "later"}}}}
    merged = merge(_results(), fresh)
    assert merged["cost"]["dp_step.ratio"]["value"] == 1.9
    assert merged["accuracy"] == _results()["accuracy"]
    assert merged["run"]["started_at"] == "later"
    assert merged["run"]["sections"]["cost"]["started_at"] == "later"


def test_results_round_trip_through_the_json_file(tmp_path):
    path = tmp_path / "results" / "latest.json"
    write_json(_results(), path)
    assert read_json(path) == json.loads(json.dumps(_results()))
    assert read_json(tmp_path / "missing.json") == {}


def test_the_quick_sizes_are_no_bigger_than_the_full_run():
    amounts = ("patients", "holdout", "days", "rounds", "central_steps", "central_hybrid_steps",
               "pretrain_sites", "pretrain_patients", "pretrain_days", "pretrain_steps", "whatif_patients",
               "step_repeats", "whatif_shell_runs", "secagg_sites", "secagg_patients", "secagg_rounds",
               "scale_patients", "scale_rounds", "memory_patients", "memory_days", "audit_entries",
               "trial_real_patients")
    quick, full = QUICK.conditions(), FULL.conditions()
    for name in amounts:
        if isinstance(quick[name], dict):
            assert all(quick[name][k] <= full[name][k] for k in quick[name]), name
        else:
            assert quick[name] <= full[name], name
    assert max(QUICK.scale_sites) <= max(FULL.scale_sites)
    assert max(QUICK.secagg_cost_sites) <= max(FULL.secagg_cost_sites) and 1000 in FULL.secagg_cost_sites
    assert FULL.memory_patients == 10_000 and FULL.audit_entries == 100_000  # DESIGN.md section 6
    for sizes in (QUICK, FULL):  # the curve passes through the target's size; larger ones are tiled
        assert sizes.memory_patients in sizes.memory_curve_patients
        assert all(n % sizes.memory_patients == 0 for n in sizes.memory_curve_patients if n > sizes.memory_patients)
    assert max(QUICK.memory_curve_patients) <= min(FULL.memory_curve_patients)


def test_the_quick_run_exercises_every_world_of_the_full_run():
    assert QUICK.twins == FULL.twins and QUICK.worlds == FULL.worlds


def test_the_worlds_are_the_cohort_simulators_with_the_built_in_one_first():
    from twinfed.models.cohort import SIMULATORS

    for twin, worlds in FULL.worlds.items():
        assert set(worlds) <= set(SIMULATORS[twin]) and worlds[0] == next(iter(SIMULATORS[twin]))


def test_the_full_run_measures_issue_12_at_its_size():
    assert FULL.sites == 3 and set(FULL.patients.values()) == {1000} and FULL.days == 7.0
    assert FULL.rounds == 20 and 3.0 in FULL.epsilons
    assert FULL.pretrain_seed != 0  # the pretraining cohort's patients are not the worlds'


def test_the_full_run_checks_the_trial_against_a_real_trial_of_issue_15s_size():
    assert FULL.trial_real_patients == 400
    assert FULL.trial_real_seed not in (0, FULL.pretrain_seed)  # other patients than the worlds'


def _evaluation(coverage95: float | None) -> dict:
    """An rmse_at report of a glucose twin (12 steps), with intervals unless ``coverage95`` is None."""
    by_step = [0.9] * 11 + [0.96]
    states = {"glucose_mgdl": {"coverage": {"80": 0.81, "95": coverage95},
                               "coverage_windows": {"80": 0.8, "95": 0.94},
                               "coverage_by_step": {"80": by_step, "95": by_step},
                               "coverage_windows_by_step": {"80": by_step, "95": by_step},
                               "interval_width_by_step": {"80": [10.0] * 12, "95": [20.0] * 11 + [42.0]}}}
    return {"n_patients": 5, "n_windows": 50, "identify_hours": 48.0, "intervals_note": None,
            "intervals": None if coverage95 is None else {"label": {"source": "test"}, "states": states}}


def _workspace(tmp_path):
    from twinfed.models.spec import load_spec

    from bench.studies import Workspace

    cohort = tmp_path / "cohort"
    cohort.mkdir()
    (cohort / "spec.toml").write_text(load_spec("glucose").to_toml(), encoding="utf-8")
    return Workspace(root=tmp_path / "work", results=tmp_path / "results", progress=lambda msg: None), cohort


def test_the_coverage_figures_reuse_the_accuracy_sections_evaluation_of_the_same_twin(tmp_path):
    from bench.accuracy import reference_epsilon
    from bench.trial import coverage_figures

    ws, cohort = _workspace(tmp_path)
    ws.evaluations[("glucose", "bergman", "federated_dp", reference_epsilon())] = _evaluation(0.95)
    # No run directory exists: evaluating again would fail.
    figs = coverage_figures(ws, QUICK, "glucose", "bergman", tmp_path / "no-run", cohort, {})
    k = "glucose.bergman.glucose_mgdl"
    assert figs[f"{k}.coverage_95"]["value"] == 0.95 and figs[f"{k}.coverage_95"]["meets_target"] is True
    assert figs[f"{k}.coverage_95"]["target"] == [0.93, 0.97]
    assert figs[f"{k}.coverage_95"]["conditions"]["evaluation_reused_from_accuracy"] is True
    assert "target" not in figs[f"{k}.coverage_80"] and figs[f"{k}.coverage_80"]["value"] == 0.81
    assert figs[f"{k}.coverage_95_windows"]["value"] == 0.94
    assert figs[f"{k}.coverage_95_at_60min"]["value"] == 0.96
    assert figs[f"{k}.interval_width_95_at_60min"]["value"] == 42.0
    assert figs[f"{k}.interval_width_95_at_60min"]["unit"] == "mg/dL"


def test_a_twin_without_intervals_has_coverage_figures_that_miss_their_target(tmp_path):
    from bench.accuracy import reference_epsilon
    from bench.trial import coverage_figures

    ws, cohort = _workspace(tmp_path)
    ws.evaluations[("glucose", "bergman", "federated_dp", reference_epsilon())] = _evaluation(None)
    figs = coverage_figures(ws, QUICK, "glucose", "bergman", tmp_path / "no-run", cohort, {})
    fig = figs["glucose.bergman.glucose_mgdl.coverage_95"]
    assert math.isnan(fig["value"]) and fig["meets_target"] is False


# -- what-if effects hours out (bench.whatif, issue 21 item 5) ----------------------------------

def test_the_relative_effect_error_is_a_median_that_skips_true_effects_below_the_tie():
    from bench.whatif import relative_error

    twin = np.array([[11.0, 30.0, 5.0], [-8.0, 0.2, 100.0]])
    true = np.array([[10.0, 20.0, 0.5], [-10.0, 0.1, 50.0]])  # 0.5 and 0.1: ties, skipped
    value, n = relative_error(twin, true, tie=1.0)
    assert n == 4 and value == pytest.approx(np.median([0.1, 0.5, 0.2, 1.0]))
    value, n = relative_error(twin, np.zeros_like(true), tie=1.0)
    assert n == 0 and math.isnan(value)


def test_the_long_controls_are_the_scenarios_hour_then_the_record():
    from types import SimpleNamespace

    from bench.whatif import long_controls

    k, n_long, s = 2, 5, 1
    series = np.column_stack([np.zeros(10), np.arange(10.0), 100 + np.arange(10.0)])  # state, 2 controls
    site = SimpleNamespace(series=series)
    case = {"slice": slice(0, 10), "h": 3,
            "controls": {"recorded": series[4:6, 1:], "double": series[4:6, 1:] * 2}}
    out = long_controls([case], ["recorded", "double"], site, s, k, n_long)
    assert out.shape == (2, 1, n_long, 2)
    np.testing.assert_array_equal(out[0, 0], series[4:9, 1:])
    np.testing.assert_array_equal(out[1, 0, :k], series[4:6, 1:] * 2)
    np.testing.assert_array_equal(out[1, 0, k:], series[6:9, 1:])  # usual care after the hour


def test_the_hours_out_target_is_the_issues_for_the_glucose_twin_at_4_h():
    from bench.whatif import LONG_AT_HOURS, LONG_HOURS, LONG_RELATIVE_TARGET

    assert LONG_AT_HOURS == (4, 8) and LONG_HOURS >= max(LONG_AT_HOURS)
    assert LONG_RELATIVE_TARGET == {"glucose": {"glucose_mgdl": 0.20}}


# -- the ensemble and rolled-loss options (python -m bench --structures / --rolled-hours) -------

def test_the_options_default_to_the_plain_run_and_its_results_directory():
    from bench.__main__ import HERE, out_dir, parse_args

    args = parse_args(["--quick"])
    assert args.structures == "spec" and args.rolled_hours == 0
    assert out_dir(args) == HERE / "results" / "quick"
    assert out_dir(parse_args([])) == HERE / "results"


def test_an_ensemble_or_rolled_run_writes_its_results_apart_from_the_plain_run():
    from bench.__main__ import HERE, command, out_dir, parse_args

    args = parse_args(["--quick", "--structures", "all"])
    assert out_dir(args) == HERE / "results" / "quick" / "structures-all"
    args = parse_args(["--quick", "--structures", "all", "--rolled-hours", "6"])
    assert out_dir(args) == HERE / "results" / "quick" / "structures-all-rolled-6h"
    assert command(args) == "python -m bench --quick --structures all --rolled-hours 6"
    assert out_dir(parse_args(["--rolled-hours", "2.5"])) == HERE / "results" / "rolled-2.5h"


@pytest.mark.parametrize("argv", [["--structures", "some"], ["--rolled-hours", "1"], ["--rolled-hours", "2.2"]])
def test_the_options_refuse_what_a_plan_would_refuse(argv, capsys):
    from bench.__main__ import parse_args

    with pytest.raises(SystemExit):
        parse_args(argv)
    assert "--" in capsys.readouterr().err


def test_every_figure_carries_the_runs_options():
    from bench.__main__ import with_options

    figs = with_options({"a": figure(1.0, "x", conditions={"n": 3}), "b": figure(2.0, "x")},
                        {"structures": "all", "rolled_hours": 6.0})
    assert figs["a"]["conditions"] == {"n": 3, "bench_options": {"structures": "all", "rolled_hours": 6.0}}
    assert figs["b"]["conditions"]["bench_options"]["structures"] == "all"


def test_an_ensemble_run_gives_every_cohort_a_spec_of_all_its_cores_structures(tmp_path):
    from twinfed.models.spec import CORE_STRUCTURES, load_spec

    from bench.studies import Workspace

    ws = Workspace(root=tmp_path / "work-all", results=tmp_path / "results", progress=lambda msg: None,
                   structures="all", cohorts_dir=tmp_path / "cohorts")
    for twin in ("glucose", "cardio"):
        plain = tmp_path / "cohorts" / f"{twin}-x"
        (plain / "site-a").mkdir(parents=True)
        (plain / "spec.toml").write_text(load_spec(twin).to_toml(), encoding="utf-8")
        (plain / "cohort.json").write_text("{}")
        (plain / "site-a" / "timeseries.csv").write_text("patient_id,time_min\n")
        from bench.studies import ensemble_cohort

        out = ensemble_cohort(plain)
        assert out != plain and out.parent == plain.parent
        spec = ws.spec(out)
        assert spec.core.members == CORE_STRUCTURES[spec.core.name]
        assert ws.spec(plain).core.structures is None  # the plain cohort's spec is untouched
        assert (out / "site-a" / "timeseries.csv").read_text() == "patient_id,time_min\n"
        assert ensemble_cohort(plain) == out  # made once


def test_a_workspace_keeps_cohorts_where_told_and_refuses_unknown_structures(tmp_path):
    from bench.studies import Workspace

    ws = Workspace(root=tmp_path / "w", results=tmp_path / "r", progress=print, cohorts_dir=tmp_path / "c")
    assert ws.cohorts == tmp_path / "c" and ws.runs == tmp_path / "w" / "runs"
    assert Workspace(root=tmp_path / "w", results=tmp_path / "r", progress=print).cohorts == tmp_path / "w" / "cohorts"
    with pytest.raises(ValueError):
        Workspace(root=tmp_path / "w", results=tmp_path / "r", progress=print, structures="some")


def test_the_rolled_hours_option_reaches_the_training_plans(tmp_path):
    from twinfed.models.spec import load_spec

    from bench.studies import Workspace, default_plan

    spec = load_spec("glucose")
    assert default_plan(spec, 2).training.rolled_hours == 0
    ws = Workspace(root=tmp_path, results=tmp_path, progress=print, rolled_hours=6.0)
    plan = ws.plan(spec, 2, dp=False)
    assert plan.training.rolled_hours == 6.0 and not plan.privacy.enabled
    assert ws.options() == {"structures": "spec", "rolled_hours": 6.0}
