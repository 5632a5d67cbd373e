"""The ``twinfed`` command: help everywhere, one-line errors, no tracebacks, contract outputs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from builders import edit_csv, write_site
from twinfed.cli.main import main

TWINFED = str(Path(sys.executable).parent / "twinfed")


@pytest.mark.parametrize("argv", [[], ["cohort"], ["cohort", "generate"], ["data"], ["data", "validate"],
                                  ["simulate"], ["demo"], ["evaluate"], ["whatif"]])
def test_every_level_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    assert "usage: twinfed" in capsys.readouterr().out


def test_validate_prints_one_summary_line_for_a_clean_site(tmp_path, capsys):
    site = write_site(tmp_path / "s", n_patients=4, n_steps=50)
    assert main(["data", "validate", "--spec", "glucose", "--data", str(site)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    assert "4 patients, 200 rows" in out[0] and "4 consented for 'twin-training'" in out[0]


def test_validate_counts_only_granted_patients(tmp_path, capsys):
    site = write_site(tmp_path / "s", n_patients=4, n_steps=50, consent="withdrawn")
    assert main(["data", "validate", "--spec", "glucose", "--data", str(site)]) == 0
    assert "0 consented" in capsys.readouterr().out


def test_a_broken_site_gives_one_line_a_nonzero_exit_and_no_traceback(tmp_path):
    site = write_site(tmp_path / "s", n_patients=2, n_steps=40)
    edit_csv(site / "timeseries.csv", 3, "glucose_mgdl", "nan")
    proc = subprocess.run([TWINFED, "data", "validate", "--spec", "glucose", "--data", str(site)],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "twinfed: error: timeseries.csv row 3, column glucose_mgdl: value is missing or NaN; "
        "fill or drop the row in the export"]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv, message", [
    (["data", "validate", "--spec", "nope.toml", "--data", "."], "spec nope.toml: no such file"),
    (["evaluate", "--model", "/nonexistent", "--spec", "glucose", "--data", "."], "no plan.json"),
    (["simulate", "--site", "a=/tmp", "--out", "x"], "--spec is required with --site"),
    (["simulate", "--spec", "glucose", "--site", "a", "--out", "x"], "write NAME=DIR"),
])
def test_user_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("twinfed: error:") and message in err[0]


def test_cohort_generate_writes_the_contract_layout_and_keeps_truth_outside_sites(tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["cohort", "generate", "--twin", "cardio", "--sites", "3", "--patients", "4",
                 "--days", "0.5", "--seed", "1", "--holdout", "3", "--out", str(out)]) == 0
    assert (out / "spec.toml").is_file()
    for site in ("site-a", "site-b", "site-c", "holdout"):
        assert {p.name for p in (out / site).iterdir()} == {"timeseries.csv", "patients.csv", "consent.csv"}
        assert (out / "truth" / f"{site}.csv").is_file()
        assert main(["data", "validate", "--spec", str(out / "spec.toml"), "--data", str(out / site)]) == 0
    manifest = json.loads((out / "cohort.json").read_text())
    assert [manifest["sites"][s]["profiles"] for s in ("site-a", "site-b", "site-c")] == \
        [["paediatric"], ["adult"], ["elderly"]]
    consent = (out / "site-a" / "consent.csv").read_text().splitlines()
    # every virtual patient consents to the twin's training and to in-silico trials on it
    assert sorted(line.split(",")[2] for line in consent[1:]) == ["in-silico-trial"] * 4 + ["twin-training"] * 4
    assert all(",granted," in line for line in consent[1:])


def test_cohort_generate_is_reproducible_from_its_seed(tmp_path):
    for name in ("one", "two"):
        main(["cohort", "generate", "--twin", "glucose", "--sites", "1", "--patients", "3", "--days", "0.5",
              "--seed", "7", "--out", str(tmp_path / name)])
    assert (tmp_path / "one" / "site-a" / "timeseries.csv").read_bytes() == \
        (tmp_path / "two" / "site-a" / "timeseries.csv").read_bytes()


def test_whatif_prints_scenarios_side_by_side_and_plots(tmp_path, capsys):
    from twinfed.models.plan import ModelConfig, TrainingPlan
    from twinfed.models.spec import load_spec
    from twinfed.models.surrogate import build_surrogate
    from twinfed.models.twin import Twin

    spec = load_spec("glucose")
    Twin(TrainingPlan(spec=spec, rounds=1, model=ModelConfig(hidden=8)),
         build_surrogate(spec, ModelConfig(hidden=8))).save(tmp_path / "run")
    site = write_site(tmp_path / "s", n_patients=2, n_steps=60)
    code = main(["whatif", "--model", str(tmp_path / "run"), "--data", str(site), "--patient", "p0",
                 "--at", "150", "--scenario", "usual=recorded", "--scenario", "snack=carbs_g+30@0",
                 "--plot", str(tmp_path / "w.png")])
    assert code == 0
    out = capsys.readouterr().out
    assert "usual" in out and "snack" in out and "observed" in out and "+60" in out
    assert (tmp_path / "w.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "p0" not in out  # the patient id is the user's input, never echoed into outputs


def test_secure_aggregation_with_two_sites_is_refused_before_anything_runs(tmp_path, capsys):
    a, b = (write_site(tmp_path / n, n_patients=3, n_steps=40) for n in "ab")
    assert main(["simulate", "--spec", "glucose", "--site", f"a={a}", "--site", f"b={b}",
                 "--out", str(tmp_path / "run")]) == 1
    assert "secure aggregation needs at least 3 sites" in capsys.readouterr().err
