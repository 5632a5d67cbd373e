"""Prediction intervals: each patient's error scale, the calibration file, coverage on simulated
patients held out from the calibration, and the intervals in ``calibrate``, ``whatif`` and
``evaluate``."""

import contextlib
import io
import json
import math
import shutil

import numpy as np
import pytest

from twinfed.cli.main import main
from twinfed.errors import ModelError
from twinfed.models.calibration import (IntervalCalibration, calibration_histogram, calibration_path,
                                        identification_scales, identify_patients, interval_bands,
                                        load_calibration, save_calibration)
from twinfed.models.cohort import generate_cohort
from twinfed.models.evaluation import evaluate_twin
from twinfed.models.plan import CalibrationConfig, ModelConfig, TrainingPlan
from twinfed.models.site_data import load_site
from twinfed.models.spec import load_spec
from twinfed.models.surrogate import build_surrogate, get_weights
from twinfed.models.twin import Twin
from twinfed.models.windows import gather

SPEC = load_spec("glucose")
# 80% and 95%, 48 h of identification, 13 edges (14 bins) the hand-made histograms below fill
CONFIG = CalibrationConfig(edges=(0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 6.0, 10.0))


# Identification runs many small tensor operations: ~10x slower on two contended threads.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _twin(kind: str) -> Twin:
    """An untrained twin: conformal coverage holds for any model, however poor."""
    plan = TrainingPlan(spec=SPEC, rounds=1, model=ModelConfig(kind=kind))
    return Twin.from_weights(plan, get_weights(build_surrogate(SPEC, plan.model, seed=plan.seed)))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("intervals") / "cohort"
    generate_cohort("glucose", sites=1, patients=60, days=3, seed=3, out=out)
    return load_site(out / "site-a", SPEC)


def _calibration(histogram, source="test") -> IntervalCalibration:
    return IntervalCalibration.from_histogram(histogram, SPEC, CONFIG, differential_privacy=False,
                                              noise_multiplier=None, sites=1, source=source)


def test_intervals_calibrated_on_half_the_patients_cover_the_other_half_at_their_level(cohort):
    twin = _twin("hybrid")
    ids = cohort.patient_ids
    histogram, n = calibration_histogram(twin, cohort, np.arange(30), CONFIG)
    assert n == 30 and histogram.sum() == pytest.approx(30.0)  # one unit of mass per patient
    cal = _calibration(histogram)
    report = evaluate_twin(twin, cohort.subset(set(ids[30:])), identify_hours=CONFIG.identify_hours,
                           calibration=cal)
    glucose = report["states"]["glucose_mgdl"]
    assert report["intervals"]["patients"] == 30
    # With N = 30 calibration patients the quantile sits at level L (1 + 1/N): expected coverage
    # 0.98 at 95% and 0.83 at 80%. A patient's coverage is one draw, so the mean over 30 test
    # patients (and over the calibration's 30) varies by a few points: across cohort seeds 0-7
    # it ranged 0.968-0.993 and 0.79-0.86. The bounds leave that room and still fail intervals
    # that are too narrow (below L - 0.05) or void (everything covered).
    assert 0.90 <= glucose["coverage"]["95"] <= 0.995
    assert 0.72 <= glucose["coverage"]["80"] <= 0.90
    assert 0.90 <= glucose["coverage_windows"]["95"] <= 0.995
    widths80 = np.array(glucose["interval_width_by_step"]["80"])
    widths95 = np.array(glucose["interval_width_by_step"]["95"])
    assert (widths95 > widths80).all()
    assert widths95[-1] < SPEC.states[0].max - SPEC.states[0].min  # finite quantiles: real bands


def test_a_higher_level_gives_a_band_that_contains_the_lower_levels_band():
    cal = _calibration(np.array([[10.0, 8, 6, 4, 3, 2, 2, 1, 1, 1, 1, 0.5, 0.3, 0.2]] ) * 3)
    forecast = np.linspace(60, 300, 12)[:, None]
    scales = np.linspace(5, 20, 12)[:, None]
    bands = interval_bands(forecast, scales, cal, SPEC)
    (lo80, hi80), (lo95, hi95) = bands["80"], bands["95"]
    assert (lo95 <= lo80).all() and (hi95 >= hi80).all() and (hi95 - lo95 > hi80 - lo80).all()
    assert (lo80 <= forecast).all() and (forecast <= hi80).all()


def test_bands_stay_in_the_spec_range_and_an_infinite_quantile_spans_it():
    few = _calibration(np.array([[3.0, 2, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]]))  # 10 patients
    assert math.isfinite(few.quantile("glucose_mgdl", 0.8)) and few.quantile("glucose_mgdl", 0.95) == math.inf
    assert "too few calibration patients" in few.states["glucose_mgdl"].notes["95"]
    lo, hi = interval_bands(np.array([[45.0], [590.0]]), np.array([[30.0], [30.0]]), few, SPEC)["95"]
    g = SPEC.states[0]
    assert lo.ravel().tolist() == [g.min, g.min] and hi.ravel().tolist() == [g.max, g.max]
    lo, hi = interval_bands(np.array([[45.0], [590.0]]), np.array([[30.0], [30.0]]), few, SPEC)["80"]
    assert lo[0, 0] == g.min and hi[1, 0] == g.max


def test_identify_returns_the_windows_it_fitted_on(cohort):
    until = cohort.steps[cohort.offsets[[0, 1]]] + np.array([48 * 12 - 1, 30])  # 48 h; 2.5 h
    fitted = identify_patients(_twin("hybrid"), cohort, np.array([0, 1]), until)
    h, k = SPEC.history_steps, SPEC.horizon_steps
    assert fitted.n_windows.tolist() == [48, 0]  # 2.5 h holds no full 3 h window
    assert fitted.starts.size == 48 and (fitted.owner == 0).all()
    rows = fitted.starts + h + k - 1
    assert (rows < cohort.offsets[1]).all() and (cohort.steps[rows] <= until[0]).all()


def test_a_scale_is_the_rms_error_on_the_identification_windows_non_decreasing_and_floored(cohort):
    twin = _twin("mlp-residual")  # untrained: its forecast is persistence, known without the twin
    patients = np.array([0, 1, 2])
    until = cohort.steps[cohort.offsets[patients]] + np.array([24 * 12 - 1, 24 * 12 - 1, 10])
    fitted = identify_patients(twin, cohort, patients, until)
    scales = identification_scales(twin, cohort, fitted)
    assert scales.shape == (3, SPEC.horizon_steps, 1)
    assert np.isnan(scales[2]).all()  # no identification window, no scale
    for i in (0, 1):
        batch = gather(cohort, fitted.starts[fitted.owner == i], np.full(fitted.n_windows[i], patients[i]))
        rms = np.sqrt(((batch.future_states - batch.history[:, -1:, :1]) ** 2).mean(axis=0))
        expected = np.maximum(np.maximum.accumulate(rms, axis=0), 0.005 * (SPEC.states[0].max - SPEC.states[0].min))
        assert scales[i] == pytest.approx(expected, rel=1e-4)
    assert (np.diff(scales[:2], axis=1) >= 0).all()


def test_the_calibration_file_round_trips_and_a_corrupt_one_is_one_line(tmp_path):
    cal = _calibration(np.array([[3.0, 2, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]]))
    (tmp_path / "model").mkdir()
    path = save_calibration(tmp_path, cal)
    assert path == tmp_path / "model" / "calibration.json" == calibration_path(tmp_path)
    assert load_calibration(tmp_path) == cal and load_calibration(tmp_path / "model") == cal
    assert json.loads(path.read_text())["states"]["glucose_mgdl"]["quantiles"]["95"] is None
    text = json.loads(path.read_text())
    text["states"]["glucose_mgdl"]["histogram"] = [1.0, 2.0]
    path.write_text(json.dumps(text))
    with pytest.raises(ModelError, match=r"calibration.json: not a valid calibration file \(state "
                                         r"glucose_mgdl: 2 histogram bins for 13 edges \(needs 14\)\)"):
        load_calibration(tmp_path)
    path.write_text("{")
    with pytest.raises(ModelError) as exc:
        load_calibration(tmp_path)
    assert "\n" not in str(exc.value) and "twinfed calibrate --force" in str(exc.value)
    assert load_calibration(tmp_path / "elsewhere") is None


# -- the CLI --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """An untrained hybrid twin saved as a run, and a cohort of 8 patients it never saw."""
    root = tmp_path_factory.mktemp("cli")
    generate_cohort("glucose", sites=1, patients=8, days=2.5, seed=5, out=root / "cohort")
    _twin("hybrid").save(root / "run")
    patient = load_site(root / "cohort" / "site-a", SPEC).patient_ids[0]
    return root, patient


@pytest.fixture(scope="module")
def calibrated(run):
    """A copy of the run, calibrated by `twinfed calibrate` on the cohort; and what it printed."""
    root, patient = run
    shutil.copytree(root / "run", root / "calibrated")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["calibrate", "--model", str(root / "calibrated"),
                     "--data", str(root / "cohort" / "site-a")]) == 0
    return root, patient, out.getvalue()


def _whatif(root, patient, *flags, run="run"):
    return ["whatif", "--model", str(root / run), "--data", str(root / "cohort" / "site-a"),
            "--patient", patient, "--at", str(40 * 60), "--scenario", "usual=recorded",
            "--scenario", "none=insulin_u*0", *flags]


def _evaluate(root, *flags):
    return ["evaluate", "--model", str(root / "calibrated"), "--spec", "glucose",
            "--data", str(root / "cohort" / "site-a"), *flags]


def test_a_calibration_file_fits_a_twin_whose_states_are_not_in_alphabetical_order(tmp_path):
    spec = load_spec("cardio")
    assert spec.state_columns != sorted(spec.state_columns)  # the file's keys come back sorted
    histogram = np.tile([3.0, 2, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0], (len(spec.states), 1))
    cal = IntervalCalibration.from_histogram(histogram, spec, CONFIG, differential_privacy=False,
                                             noise_multiplier=None, sites=1, source="test")
    (tmp_path / "model").mkdir()
    save_calibration(tmp_path, cal)
    loaded = load_calibration(tmp_path)
    loaded.check_spec(spec)
    assert all(loaded.states[col] == cal.states[col] for col in spec.state_columns)


def test_without_a_calibration_whatif_says_why_there_are_no_intervals(run, capsys):
    root, patient = run
    assert not calibration_path(root / "run").exists()
    assert main(_whatif(root, patient, "--json")) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["intervals"] is None and "twinfed calibrate" in out["intervals_note"]
    assert out["scenarios"]["usual"]["intervals"] is None


def test_calibrate_writes_the_file_prints_the_quantiles_and_refuses_to_overwrite(calibrated, capsys):
    root, _, printed = calibrated
    assert "calibrated on 8 patients" in printed and "80% quantile" in printed
    assert "note: glucose_mgdl 95%: too few calibration patients (8.0)" in printed
    cal = load_calibration(root / "calibrated")
    assert cal.source == "local: site-a's patients, no DP" and not cal.differential_privacy
    assert cal.states["glucose_mgdl"].patients == pytest.approx(8.0)
    before = calibration_path(root / "calibrated").read_bytes()
    argv = ["calibrate", "--model", str(root / "calibrated"), "--data", str(root / "cohort" / "site-a"), "--json"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.endswith("calibration.json already exists; pass --force to replace it") and "\n" not in err
    assert calibration_path(root / "calibrated").read_bytes() == before
    assert main([*argv, "--force"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["patients"] == 8 and out["intervals"]["levels"] == [0.8, 0.95]
    assert out["states"]["glucose_mgdl"]["quantiles"]["95"] is None  # 8 patients cannot support 95%
    assert calibration_path(root / "calibrated").read_bytes() == before  # the same patients, the same file


def test_whatif_gives_each_scenario_bands_around_its_forecast(calibrated, capsys, tmp_path):
    root, patient, _ = calibrated
    assert main(_whatif(root, patient, "--json", run="calibrated")) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["intervals"]["levels"] == [0.8, 0.95] and out["intervals"]["differential_privacy"] is False
    for scenario in out["scenarios"].values():
        forecast = np.array(scenario["states"]["glucose_mgdl"])
        bands = scenario["intervals"]["glucose_mgdl"]
        lo80, hi80 = np.array(bands["80"]["lower"]), np.array(bands["80"]["upper"])
        assert lo80.shape == forecast.shape == (12,)
        assert (lo80 <= forecast).all() and (forecast <= hi80).all() and (hi80 > lo80).all()
        assert bands["95"]["lower"] == [SPEC.states[0].min] * 12  # infinite quantile: the range
    assert main(_whatif(root, patient, "--plot", str(tmp_path / "w.png"), run="calibrated")) == 0
    out = capsys.readouterr().out
    assert "95% interval at +60 min, glucose_mgdl (mg/dL): usual " in out
    assert (tmp_path / "w.png").read_bytes()[:4] == b"\x89PNG"
    assert patient not in out


def test_evaluate_reports_coverage_for_the_personalised_twin_only(calibrated, capsys):
    root, _, _ = calibrated
    assert main(_evaluate(root, "--json")) == 0
    out = json.loads(capsys.readouterr().out)
    glucose = out["states"]["glucose_mgdl"]
    assert out["intervals"]["patients"] == 8 and out["intervals_note"] is None
    assert glucose["coverage"]["95"] == 1.0  # the whole spec range
    assert 0 <= glucose["coverage"]["80"] <= 1 and 0 <= glucose["coverage_windows"]["80"] <= 1
    assert len(glucose["coverage_by_step"]["80"]) == len(glucose["interval_width_by_step"]["95"]) == 12
    assert glucose["rmse_by_step"] and glucose["population_rmse_by_step"]  # the figures it had
    assert main(_evaluate(root, "--json", "--no-personalise")) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["intervals"] is None and "--no-personalise" in out["intervals_note"]
    assert out["states"]["glucose_mgdl"]["coverage"] is None
    assert main(_evaluate(root)) == 0
    assert "interval coverage: 80% -> " in capsys.readouterr().out


def test_a_twin_retrained_into_the_run_refuses_the_old_calibration(calibrated, capsys):
    root, patient, _ = calibrated
    shutil.copytree(root / "calibrated", root / "retrained")
    plan = TrainingPlan(spec=SPEC, rounds=1, seed=1)
    Twin.from_weights(plan, get_weights(build_surrogate(SPEC, plan.model, seed=1))).save(root / "retrained")
    assert main(_whatif(root, patient, "--json", run="retrained")) == 1
    err = capsys.readouterr().err.strip()
    assert "was made for other weights than the twin's; recalibrate" in err and "\n" not in err


def test_calibrates_help_says_the_patients_must_not_be_training_patients(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", "--help"])
    assert exc.value.code == 0
    assert "must be patients the twin was NOT trained on" in " ".join(capsys.readouterr().out.split())
