"""A hybrid glucose twin trained on the real Flower simulation engine with DP and SecAgg+, then
asked what-ifs about held-out patients through the CLI: a bolus lowers, a snack raises."""

import csv
import json

import pytest

from builders import simulate_from_cli
from twinfed.cli.main import main
from twinfed.models.cohort import HOLDOUT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("hybrid")
    simulate_from_cli(root, patients=16, seed=4, holdout=3,
                      flags=["--rounds", "2", "--local-steps", "3", "--batch-size", "8",
                             "--windows-per-patient", "4"])
    return root


def test_the_study_trains_a_hybrid_with_dp_and_says_so(trained):
    summary = json.loads((trained / "run" / "summary.json").read_text())
    assert summary["model"]["kind"] == "hybrid" and summary["model"]["trained_weights"] < 5000
    assert summary["privacy"]["differential_privacy"] and summary["privacy"]["secure_aggregation"]
    assert summary["rounds_with_update"] == 2


def test_a_bolus_lowers_and_a_snack_raises_every_held_out_patients_forecast(trained, capsys):
    holdout = trained / "cohort" / HOLDOUT
    with (holdout / "patients.csv").open(newline="") as fh:
        ids = [row[0] for row in list(csv.reader(fh))[1:]]
    for pid in ids:
        capsys.readouterr()
        assert main(["whatif", "--model", str(trained / "run"), "--data", str(holdout), "--patient", pid,
                     "--at", str(36 * 60), "--scenario", "usual=recorded", "--scenario", "bolus=insulin_u+2@0",
                     "--scenario", "snack=carbs_g+30@0", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        g = {name: sc["states"]["glucose_mgdl"] for name, sc in out["scenarios"].items()}
        assert all(b <= u + 1e-6 for b, u in zip(g["bolus"], g["usual"])) and g["bolus"][-1] < g["usual"][-1]
        assert all(s >= u - 1e-6 for s, u in zip(g["snack"], g["usual"])) and g["snack"][-1] > g["usual"][-1]
        params = out["parameters"]
        assert params["from"] == "personalised" and params["identification_windows"] > 0
        assert params["clinical"]["insulin_sensitivity_mgdl_per_u"] > 0


def test_evaluate_scores_personalised_and_population_twins_on_the_same_later_windows(trained, capsys):
    capsys.readouterr()
    assert main(["evaluate", "--model", str(trained / "run"), "--spec", str(trained / "cohort" / "spec.toml"),
                 "--data", str(trained / "cohort" / HOLDOUT), "--identify-hours", "24", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    m = report["states"]["glucose_mgdl"]
    assert report["personalisation"]["personalised"] and report["personalisation"]["patients_fitted"] == 3
    assert len(m["rmse_by_step"]) == len(m["population_rmse_by_step"]) == 12
    assert report["n_windows"] > 0 and report["model"]["kind"] == "hybrid"
