"""A whole study on the real Flower simulation engine, then evaluation, through the CLI."""

import json

import pytest

from builders import write_site
from twinfed.cli.main import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    write_site(root / "a", n_patients=8, n_steps=120, seed=1)
    write_site(root / "b", n_patients=6, n_steps=120, seed=2)
    # Two of b's patients withdraw: they must be excluded, never loaded for training.
    consent = root / "b" / "consent.csv"
    consent.write_text(consent.read_text() +
                       "p0,withdrawn,twin-training,2026-02-01T00:00:00Z\n"
                       "p1,withdrawn,twin-training,2026-02-01T00:00:00Z\n")
    write_site(root / "holdout", n_patients=3, n_steps=100, seed=3)
    code = main(["simulate", "--spec", "glucose", "--site", f"a={root / 'a'}", "--site", f"b={root / 'b'}",
                 "--rounds", "2", "--local-steps", "3", "--hidden", "16", "--no-secagg", "--no-calibration",
                 "--out", str(root / "run")])
    assert code == 0
    return root


def _joined(run, site, capsys) -> list[dict]:
    """A node's round_joined entries as its officer reads them: exact counts stay at the node."""
    capsys.readouterr()
    assert main(["audit", "show", str(run / "nodes" / site), "--event", "round_joined", "--json"]) == 0
    return [json.loads(line)["details"] for line in capsys.readouterr().out.splitlines()]


def test_exact_counts_stay_in_each_nodes_log_and_the_summary_holds_only_released_figures(study, capsys):
    run = study / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["engine"] == "simulation"
    assert [(d["patients_used"], d["patients_excluded"]) for d in _joined(run, "a", capsys)] == [(8, 0)] * 2
    assert [(d["patients_used"], d["patients_excluded"]) for d in _joined(run, "b", capsys)] == [(4, 2)] * 2
    for name in ("a", "b"):
        site = summary["sites"][name]
        assert site["rounds_joined"] == 2
        assert site["release"] == {"patients_used": "dp-released", "patients_excluded": "dp-released",
                                   "privacy": "dp-released", "spend": "dp-released"}
        assert isinstance(site["patients_used"], int) and site["patients_used"] >= 0
        assert site["privacy"]["epsilon"] <= 3.0
    assert [h["round"] for h in summary["history"]] == [1, 2]
    text = (run / "summary.json").read_text() + (run / "coordinator" / "audit.jsonl").read_text()
    assert "loss" not in text
    # Privacy is on by default; turning secure aggregation off is labelled in the output.
    assert summary["privacy"]["differential_privacy"] is True
    assert "NO SECURE AGGREGATION" in summary["privacy"]["warning"]


def test_simulate_writes_the_model_with_its_spec_and_plan(study):
    model = study / "run" / "model"
    assert {p.name for p in model.iterdir()} >= {"weights.npz", "spec.toml", "plan.json"}
    plan = json.loads((model / "plan.json").read_text())
    assert plan["rounds"] == 2


def test_evaluate_reports_per_step_errors_for_every_window(study, capsys):
    capsys.readouterr()
    code = main(["evaluate", "--model", str(study / "run"), "--spec", "glucose",
                 "--data", str(study / "holdout"), "--identify-hours", "0", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_patients"] == 3
    assert report["n_windows"] == 3 * (100 - 36 + 1)
    assert report["horizon_minutes"] == 60
    m = report["states"]["glucose_mgdl"]
    for key in ("rmse_by_step", "mae_by_step", "persistence_rmse_by_step"):
        assert len(m[key]) == 12
        assert all(v >= 0 for v in m[key])


def test_a_site_without_consented_patients_is_refused_and_the_study_goes_on(tmp_path):
    write_site(tmp_path / "ok", n_patients=4, n_steps=80, seed=5)
    write_site(tmp_path / "none", n_patients=4, n_steps=80, seed=6, consent=None)
    code = main(["simulate", "--spec", "glucose", "--site", f"ok={tmp_path / 'ok'}",
                 "--site", f"none={tmp_path / 'none'}", "--rounds", "1", "--local-steps", "2",
                 "--hidden", "8", "--no-secagg", "--out", str(tmp_path / "run")])
    assert code == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["sites"]["ok"]["rounds_joined"] == 1
    refused = summary["sites"]["none"]
    assert refused["rounds_refused"] == 1 and refused["rounds_joined"] == 0
    assert refused["refusals"] == [{"round": 1, "code": "no_eligible_patients"}]


def test_simulate_without_sites_generates_and_uses_the_builtin_glucose_cohort(tmp_path, capsys):
    code = main(["simulate", "--rounds", "1", "--local-steps", "2", "--hidden", "8", "--no-calibration",
                 "--out", str(tmp_path / "run")])
    assert code == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["twin"] == "t1d-glucose"
    assert set(summary["sites"]) == {"site-a", "site-b", "site-c"}
    assert all(_joined(tmp_path / "run", site, capsys)[0]["patients_used"] == 200 for site in summary["sites"])
    assert (tmp_path / "run" / "cohort" / "truth" / "site-a.csv").is_file()
