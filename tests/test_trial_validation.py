"""The trial's validation (bench.trial_validation, issue 21 item 5): its statistics on known
answers, a validation that can fail (a twin predicting no effect, or one under-stating the effect,
misses the targets that a twin equal to the truth meets), the effect sizes' arms files, and (slow)
the section end to end at --quick sizes."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is not an installed package

from bench.trial_validation import (COVERAGE_TARGET, SLOPE_TARGET, combined_df, coverage,  # noqa: E402
                                    effects, no_effect_twin, nonzero, rejection, score, slope, tost)

Z = 1.959963984540054


# -- two one-sided tests ---------------------------------------------------------------------------

def test_tost_p_is_the_larger_one_sided_p_value_a_known_normal_case():
    from scipy.stats import norm

    # diff 1, se 1, margin 3: P(Z > 4) and P(Z < -2); the larger, 0.0228, is below 0.05
    out = tost(1.0, 1.0, 3.0)
    assert out["p"] == pytest.approx(norm.cdf(-2.0)) and out["equivalent"] is True
    # diff 2: P(Z < -1) = 0.159: not shown equivalent
    out = tost(2.0, 1.0, 3.0)
    assert out["p"] == pytest.approx(norm.cdf(-1.0)) and out["equivalent"] is False


def test_tost_uses_student_t_with_the_degrees_of_freedom_given():
    from scipy.stats import t

    out = tost(1.0, 1.0, 3.0, df=5)
    assert out["p"] == pytest.approx(t.cdf(-2.0, 5))
    assert out["equivalent"] is False  # 0.051 with 5 df, where the normal gives 0.023


def test_tost_is_symmetric_in_the_sign_of_the_difference():
    assert tost(-1.3, 0.7, 3.0, df=12) == tost(1.3, 0.7, 3.0, df=12)


def test_tost_on_constructed_samples_equivalent_and_not():
    """Two groups' means compared at a margin of 3: close means with small standard errors are
    equivalent; means 2.9 apart are not, nor are equal means whose groups are too small to show it."""
    def compare(a, b, margin=3.0):
        a, b = np.asarray(a, float), np.asarray(b, float)
        sa, sb = a.std(ddof=1) / math.sqrt(a.size), b.std(ddof=1) / math.sqrt(b.size)
        df = combined_df(sa, a.size - 1, sb, b.size - 1)
        return tost(b.mean() - a.mean(), math.hypot(sa, sb), margin, df=df)

    base = np.tile([-2.0, -1.0, 0.0, 1.0, 2.0], 20)  # 100 values, mean 0, sd 1.42
    assert compare(10 + base, 10.5 + base)["equivalent"] is True
    assert compare(10 + base, 12.9 + base)["equivalent"] is False
    wide = np.array([-20.0, 0.0, 20.0])
    assert compare(10 + wide, 10 + wide)["equivalent"] is False


def test_tost_of_a_known_difference_without_spread():
    assert tost(2.9, 0.0, 3.0)["equivalent"] is True
    assert tost(3.0, 0.0, 3.0)["equivalent"] is False
    with pytest.raises(ValueError):
        tost(0.0, 1.0, 0.0)


def test_the_welch_satterthwaite_df_of_a_known_case():
    # se 1 (df 4) and se 2 (df 9): (1 + 4)^2 / (1/4 + 16/9)
    assert combined_df(1.0, 4, 2.0, 9) == pytest.approx(25 / (1 / 4 + 16 / 9))
    assert combined_df(1.0, math.inf, 2.0, math.inf) == math.inf


# -- coverage, slope, the no-effect twin -----------------------------------------------------------

def test_coverage_is_the_share_of_intervals_holding_the_truth_ends_included():
    truth = np.array([0.0, 1.0, 2.0, 3.0])
    lo = np.array([-1.0, 1.0, 2.5, 0.0])
    hi = np.array([1.0, 2.0, 3.0, 3.0])
    assert coverage(truth, lo, hi) == 0.75
    assert math.isnan(coverage(np.zeros(0), np.zeros(0), np.zeros(0)))


def test_slope_by_least_squares():
    x = np.array([-2.0, 0.0, 1.0, 5.0])
    assert slope(x, 2 * x + 1) == pytest.approx(2.0)
    y = np.array([0.3, -0.1, 2.2, 4.0])
    assert slope(x, y) == pytest.approx(np.polyfit(x, y, 1)[0])
    assert slope(x, np.zeros_like(x)) == 0.0
    assert math.isnan(slope(np.ones(4), y)) and math.isnan(slope([1.0], [2.0]))


def test_the_no_effect_twin_predicts_zero_with_the_twins_interval_widths():
    mean, lo, hi = no_effect_twin(np.array([1.0, -4.0]), np.array([5.0, 2.0]))
    assert mean.tolist() == [0.0, 0.0] and lo.tolist() == [-2.0, -3.0] and hi.tolist() == [2.0, 3.0]


def test_score_of_a_known_case():
    truth = np.array([10.0, 12.0])
    out = score(truth, np.array([8.0, 10.0]), np.array([7.0, 12.5]), np.array([11.0, 13.0]))
    assert out["bias"] == -2.0 and out["relative_bias"] == pytest.approx(-2 / 11)
    assert out["ratio"] == pytest.approx(9 / 11) and out["coverage"] == 0.5 and math.isnan(out["equivalent"])


def test_a_repetition_without_a_result_is_not_covered_and_left_out_of_bias_and_slope():
    """A tiny trial's noisy count can fall below 2: the coordinator reports no result (NaN here)."""
    truth = np.array([10.0, 12.0, 11.0])
    nan = math.nan
    out = score(truth, np.array([10.0, nan, 12.0]), np.array([9.0, nan, 10.0]), np.array([11.0, nan, 13.0]),
                np.array([10.0, 12.0, 11.0]), np.ones(3), np.full(3, 50.0), margin=5.0)
    assert out["coverage"] == pytest.approx(2 / 3) and out["bias"] == pytest.approx(0.5)
    assert out["ratio"] == pytest.approx(11 / 10.5) and out["equivalent"] <= 2 / 3
    assert slope(np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, nan, 6.0, 8.0])) == pytest.approx(2.0)


def test_an_effect_is_nonzero_when_the_truths_interval_excludes_zero_in_half_the_repetitions():
    assert nonzero(np.array([1.0, -1.0]), np.array([2.0, 1.0])) is True
    assert nonzero(np.array([-1.0, -1.0, 0.5]), np.array([1.0, 1.0, 2.0])) is False


def test_the_no_effect_twin_is_rejected_by_the_share_of_nonzero_effects_it_fails():
    assert rejection([True, True, False], [0.2, 0.95, 0.1]) == 0.5  # the zero effect is not counted
    assert rejection([True, True], [0.0, 0.89]) == 1.0
    assert math.isnan(rejection([False, False], [0.1, 0.1]))


# -- a validation that can fail --------------------------------------------------------------------

def _synthetic(ratio: float, seed: int = 0):
    """200 repeated trials of 4 effects (true contrasts 5 to 40, each trial's paired truth
    scattered around it): a twin of contrast ``ratio x`` the truth, estimated with standard
    error 1 and its 95% interval; the real trials' contrasts scatter with standard error 1."""
    rng = np.random.default_rng(seed)
    effects_true = np.array([5.0, 10.0, 20.0, 40.0])
    truth = effects_true[None, :] + rng.normal(0, 1.0, (200, 4))
    se = 1.0
    twin = ratio * truth + rng.normal(0, se, truth.shape)
    real = truth + rng.normal(0, 1.0, truth.shape)
    return truth, twin, twin - Z * se, twin + Z * se, real, np.full(truth.shape, 1.0), np.full(truth.shape, 198.0)


def _judge(truth, twin, lo, hi, real, real_se, real_df):
    """The validation's verdicts: every effect's coverage >= 0.90 and the slope in 0.8-1.25."""
    covs = [score(truth[:, e], twin[:, e], lo[:, e], hi[:, e], real[:, e], real_se[:, e], real_df[:, e],
                  twin_df=100, margin=5.0) for e in range(truth.shape[1])]
    b = slope(truth, twin)
    return {"coverage": [c["coverage"] for c in covs], "equivalent": [c["equivalent"] for c in covs],
            "slope": b,
            "passes": all(c["coverage"] >= COVERAGE_TARGET for c in covs) and SLOPE_TARGET[0] <= b <= SLOPE_TARGET[1]}


def test_a_twin_equal_to_the_truth_meets_the_targets():
    v = _judge(*_synthetic(1.0))
    assert v["passes"], v
    assert all(0.9 <= c <= 1.0 for c in v["coverage"]) and v["slope"] == pytest.approx(1.0, abs=0.05)
    assert all(e > 0.8 for e in v["equivalent"])  # within +-5 of real trials, both se 1


def test_the_no_effect_twin_fails_where_the_twin_equal_to_the_truth_passes():
    truth, twin, lo, hi, real, real_se, real_df = _synthetic(1.0)
    zero, zlo, zhi = no_effect_twin(lo, hi)
    v = _judge(truth, zero, zlo, zhi, real, real_se, real_df)
    assert not v["passes"]
    assert v["slope"] == 0.0
    # every effect here is non-zero: the no-effect twin's interval (half width 1.96) misses them all
    assert all(nonzero(t - 2, t + 2) for t in truth.T)
    assert max(v["coverage"]) < 0.5 and max(v["equivalent"]) <= 0.1 and v["equivalent"][1:] == [0.0, 0.0, 0.0]
    assert rejection([True] * 4, v["coverage"]) == 1.0


def test_a_twin_that_states_60_percent_of_the_effect_fails_coverage_and_slope():
    """The issue's mismatch-world failure (contrasts 0.5-0.7x the truth, the truth outside the
    twins' intervals): the validation must see it."""
    v = _judge(*_synthetic(0.6))
    assert not v["passes"]
    assert v["slope"] == pytest.approx(0.6, abs=0.05) and min(v["coverage"]) < 0.1


# -- the effect sizes -------------------------------------------------------------------------------

def test_the_effects_change_only_the_examples_factor():
    g = effects("glucose")
    assert [a["rule"]["grams_per_unit"] for k, a in g.items() if k.startswith("ratio")] == [8.0, 10.0, 12.0, 15.0]
    assert g["insulin-80pct"]["scenario"] == "insulin_u*0.8" and g["insulin-120pct"]["scenario"] == "insulin_u*1.2"
    assert g["ratio-12"]["rule"]["kind"] == "meal-bolus" and g["ratio-12"]["rule"]["basal_u_per_h"] == "recorded"
    c = effects("cardio")
    assert [a["rule"]["amount"] for a in c.values()] == [10.0, 20.0, 40.0, 80.0]
    assert all(a["rule"]["times_min"] == [480] for a in c.values())


@pytest.mark.parametrize("twin", ["glucose", "cardio"])
def test_the_generated_arms_files_parse_as_designs_of_the_twin(twin, tmp_path):
    from bench.studies import Workspace
    from bench.sizes import QUICK
    from bench.trial_validation import designs
    from twinfed.models.spec import load_spec

    ws = Workspace(root=tmp_path, results=tmp_path / "results", progress=lambda msg: None)
    combined, per_effect, files = designs(ws, QUICK, twin, load_spec(twin))
    assert [a.name for a in combined.arms] == ["usual-care", *effects(twin)]
    for effect, design in per_effect.items():
        assert [a.name for a in design.arms] == ["usual-care", effect]
        assert design.duration_days == QUICK.validation_days and design.draws == QUICK.validation_draws
        assert design.outcomes == combined.outcomes and design.start_hours == combined.start_hours == 48
        assert files[effect].read_text().startswith("# generated by bench/trial_validation.py")


@pytest.mark.usefixtures("one_torch_thread")
def test_an_arm_rolled_forward_beside_others_has_its_two_arm_trials_values(tmp_path):
    """The section runs every effect's arm in one trial and reads each effect's two-arm trial from
    it: a patient's draws are the same in every arm, so that is the two-arm trial."""
    from bench.sizes import QUICK
    from bench.studies import Workspace
    from bench.trial_validation import designs
    from twinfed.models.cohort import generate_cohort
    from twinfed.models.plan import ModelConfig, TrainingPlan
    from twinfed.models.site_data import load_site
    from twinfed.models.spec import load_spec
    from twinfed.models.surrogate import build_surrogate, get_weights
    from twinfed.models.trial import run_site_trial
    from twinfed.models.twin import Twin

    spec = load_spec("glucose")
    generate_cohort("glucose", sites=1, patients=3, days=3, seed=5, out=tmp_path / "cohort")
    site = load_site(tmp_path / "cohort" / "site-a", spec)
    plan = TrainingPlan(spec=spec, rounds=1, model=ModelConfig(kind="hybrid"))
    twin = Twin.from_weights(plan, get_weights(build_surrogate(spec, plan.model, seed=0)))
    ws = Workspace(root=tmp_path, results=tmp_path / "results", progress=lambda msg: None)
    combined, per_effect, _ = designs(ws, QUICK, "glucose", spec)
    both = run_site_trial(twin, site, combined)
    names = [a.name for a in combined.arms]
    for effect in ("ratio-8", "insulin-120pct"):
        alone = run_site_trial(twin, site, per_effect[effect])
        assert np.array_equal(alone.patients, both.patients)
        np.testing.assert_allclose(alone.values, both.values[:, [0, names.index(effect)]], rtol=1e-6, atol=1e-6)


def test_a_pool_patient_whose_record_leaves_the_specs_range_is_dropped_from_every_file(tmp_path):
    """A site refuses a record outside the spec's ranges whole (load_site); the pool keeps every
    other patient, byte for byte."""
    from bench.trial_validation import conforming_pool
    from twinfed.models.cohort import generate_cohort, read_truth
    from twinfed.models.site_data import load_site
    from twinfed.models.spec import load_spec

    spec = load_spec("glucose")
    pool = tmp_path / "pool"
    generate_cohort("glucose", sites=1, patients=1, days=1, seed=3, holdout=3, out=pool)
    assert conforming_pool(pool, spec) == (pool, [])
    ts = pool / "holdout" / "timeseries.csv"
    lines = ts.read_text().splitlines(keepends=True)
    victim = lines[-1].split(",", 1)[0].strip('"')
    cells = lines[-1].rstrip("\n").split(",")
    cells[3] = "150"  # insulin_u above the spec's 100 U
    ts.write_text("".join(lines[:-1]) + ",".join(cells) + "\n")
    with pytest.raises(Exception, match="above the spec's max"):
        load_site(pool / "holdout", spec)
    out, refused = conforming_pool(pool, spec)
    assert refused == [victim] and out != pool
    site = load_site(out / "holdout", spec)
    assert site.n_patients == 2 and victim not in site.patient_ids
    assert victim not in read_truth(out / "truth" / "holdout.csv")[0]
    assert [ln for ln in (out / "holdout" / "timeseries.csv").read_text().splitlines(keepends=True)] == \
        [ln for ln in lines if ln.split(",", 1)[0].strip('"') != victim]
    assert conforming_pool(pool, spec) == (out, [victim])  # made once


# -- the section end to end --------------------------------------------------------------------------

@pytest.mark.studies  # a whole federated study and 5 repeated trials: make test-studies
def test_the_section_at_quick_sizes_scores_the_twin_and_the_no_effect_twin(tmp_path):
    """One world (the glucose twin's built-in) through the real section at --quick sizes: a
    federated DP twin trained on Flower, the pool replayed, the repeated trials scored."""
    from dataclasses import replace

    from bench.sizes import QUICK
    from bench.studies import Workspace
    from bench.trial_validation import run_world

    sizes = replace(QUICK, validation_repeats=3)
    ws = Workspace(root=tmp_path / "work", results=tmp_path / "results", progress=lambda msg: None)
    ws.reset_runs()
    figs = run_world(ws, sizes, "glucose", "bergman")
    k = "glucose.bergman"
    for effect in effects("glucose"):
        cov = figs[f"{k}.{effect}.mean_glucose.coverage_95"]
        assert cov["target"] == COVERAGE_TARGET and cov["target_bound"] == "lower" and 0 <= cov["value"] <= 1
        assert cov["conditions"]["repetitions"] == 3
        assert f"{k}.{effect}.mean_glucose.no_effect.coverage_95" in figs
        assert figs[f"{k}.{effect}.time_below_70.contrast_ratio"]["target"] == [0.67, 1.5]
        assert 0 <= figs[f"{k}.{effect}.time_in_range.tost_equivalent"]["value"] <= 1
    for outcome in ("time_in_range", "time_below_70", "mean_glucose"):
        assert figs[f"{k}.{outcome}.slope"]["target"] == list(SLOPE_TARGET)
        assert figs[f"{k}.{outcome}.no_effect.slope"]["value"] == 0.0
    assert (tmp_path / "results" / "trial_validation_glucose_bergman.png").is_file()


def test_the_full_validation_repeats_at_least_100_small_trials():
    from bench.sizes import FULL, QUICK

    assert FULL.validation_repeats >= 100 and FULL.validation_patients <= FULL.validation_pool
    assert 2 <= QUICK.validation_repeats < 10 and QUICK.validation_patients <= QUICK.validation_pool
