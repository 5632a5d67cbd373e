"""``twinfed trial --data``, in process: the JSON contract of the issue for every arm and outcome,
the results file and plot, refusals in one line without a traceback, consent honoured, and no
patient identifier in anything it prints or writes."""

import contextlib
import csv
import io
import json

import pytest

from twinfed.cli.main import main
from twinfed.models.cohort import generate_cohort
from twinfed.models.plan import ModelConfig, TrainingPlan
from twinfed.models.spec import load_spec
from twinfed.models.surrogate import build_surrogate, get_weights
from twinfed.models.twin import Twin

SPEC = load_spec("glucose")
ARMS = ["usual-care", "ratio-10", "same-again"]
OUTCOMES = ["time_in_range", "time_below_70", "mean_glucose"]

DESIGN = """
[trial]
name = "cli-trial"
purpose = "{purpose}"
reference = "{reference}"
start_hours = 30
duration_days = 1
outcomes = ["time_in_range", "time_below_70", "mean_glucose"]
draws = 2
{extra}

[[trial.arms]]
name = "usual-care"

[[trial.arms]]
name = "ratio-10"
rule = {{ kind = "meal-bolus", insulin = "insulin_u", carbs = "carbs_g", grams_per_unit = 10.0 }}

[[trial.arms]]
name = "same-again"
scenario = "{scenario}"
"""


def _arms_text(*, purpose="in-silico-trial", reference="usual-care", scenario="recorded", extra="") -> str:
    return DESIGN.format(purpose=purpose, reference=reference, scenario=scenario, extra=extra)


# Identification runs many small tensor operations: ~10x slower on two contended threads.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Five virtual patients (one of whom withdrew from in-silico trials), an untrained hybrid
    twin saved as a run directory, and an arms file."""
    root = tmp_path_factory.mktemp("trial-cli")
    generate_cohort("glucose", sites=1, patients=5, days=2.5, seed=4, out=root / "cohort")
    site = root / "cohort" / "site-a"
    with (site / "patients.csv").open(newline="") as fh:
        ids = [row[0] for row in list(csv.reader(fh))[1:]]
    consent = (site / "consent.csv").read_text().splitlines()
    withdrawn = next(i for i, line in enumerate(consent) if line.startswith(ids[2]) and "in-silico-trial" in line)
    consent[withdrawn] = consent[withdrawn].replace(",granted,", ",withdrawn,")
    (site / "consent.csv").write_text("\n".join(consent) + "\n")
    plan = TrainingPlan(spec=SPEC, rounds=1, model=ModelConfig(kind="hybrid"))
    Twin.from_weights(plan, get_weights(build_surrogate(SPEC, plan.model, seed=0))).save(root / "run")
    (root / "arms.toml").write_text(_arms_text())
    return root, site, ids


def _trial(root, *extra):
    return ["trial", "--model", str(root / "run"), "--arms", str(root / "arms.toml"), *extra]


@pytest.fixture(scope="module")
def json_run(world):
    root, site, _ = world
    # capsys is per test; this run is shared by the tests below, so its output is captured here.
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(_trial(root, "--data", str(site), "--out", str(root / "t-json"), "--json"))
    return code, out.getvalue(), err.getvalue(), root / "t-json"


def _one_error(capsys, argv, message, *, progress=False):
    capsys.readouterr()
    assert main(argv) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    # With ``progress``, progress lines may come first; the error is the last line either way.
    errors = [line for line in lines if line.startswith("twinfed: error: ")]
    assert errors == (lines[-1:] if progress else lines) and message in errors[0], captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    return errors[0]


def test_a_trial_prints_the_contracts_json_for_every_arm_and_outcome(json_run):
    code, out, _, _ = json_run
    assert code == 0
    report = json.loads(out)
    assert {"trial", "n_patients", "arms", "contrasts", "privacy"} <= set(report)
    assert report["trial"] == "cli-trial" and report["n_patients"] == 4
    assert list(report["arms"]) == ARMS
    for arm in ARMS:
        assert list(report["arms"][arm]["outcomes"]) == OUTCOMES
        for o in OUTCOMES:
            e = report["arms"][arm]["outcomes"][o]
            assert isinstance(e["mean"], float) and len(e["ci95"]) == 2
            assert e["ci95"][0] <= e["mean"] <= e["ci95"][1]
    assert list(report["contrasts"]) == ["ratio-10", "same-again"]
    for arm in report["contrasts"]:
        assert list(report["contrasts"][arm]) == OUTCOMES
        for o in OUTCOMES:
            e = report["contrasts"][arm][o]
            assert len(e["ci95"]) == 2 and e["ci95"][0] <= e["mean"] <= e["ci95"][1]
    # usual care twice over: paired by patient, no difference at all
    assert all(report["contrasts"]["same-again"][o] | {"sd": 0.0} == {"mean": 0.0, "ci95": [0.0, 0.0], "sd": 0.0}
               for o in OUTCOMES)
    assert isinstance(report["privacy"], dict) and report["privacy"]["differential_privacy"] is False


def test_a_trial_counts_the_patients_without_consent_and_writes_its_results_and_plot(json_run):
    code, out, err, where = json_run
    assert code == 0
    report = json.loads(out)
    assert report["patients_not_consented"] == 1 and report["patients_excluded"] == 0
    # the hybrid's records that leave insulin sensitivity unidentified, counted (issue 21 item 1)
    unidentified = report["patients_not_identifiable"]
    assert unidentified["parameter"] == "si" and 0 <= unidentified["count"] <= 4
    assert json.loads((where / "trial.json").read_text()) == report
    assert (where / "trial.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "4 patients consented for 'in-silico-trial'" in err


def test_the_table_goes_to_the_run_directory_by_default(world, capsys):
    root, site, _ = world
    capsys.readouterr()
    assert main(_trial(root, "--data", str(site), "--plot", str(root / "elsewhere.png"))) == 0
    out = capsys.readouterr().out
    assert "in-silico trial cli-trial: 4 patients' twins, reference arm usual-care" in out
    assert "same-again - usual-care" in out and "mean_glucose (mg/dL)" in out
    assert (root / "run" / "trials" / "cli-trial" / "trial.json").is_file()
    assert (root / "elsewhere.png").is_file() and not (root / "run" / "trials" / "cli-trial" / "trial.png").exists()


def test_nothing_printed_or_written_names_a_patient(world, json_run):
    root, _, ids = world
    _, out, err, where = json_run
    written = (where / "trial.json").read_text()
    for pid in ids:
        assert pid not in out and pid not in err and pid not in written
        assert pid.rsplit("-", 1)[-1] not in written  # nor the id's number


def test_an_existing_trial_is_never_overwritten(world, json_run, capsys):
    root, site, _ = world
    where = json_run[3]
    before = (where / "trial.json").read_bytes()
    _one_error(capsys, _trial(root, "--data", str(site), "--out", str(where)), "already holds a trial (trial.json)")
    assert (where / "trial.json").read_bytes() == before


@pytest.mark.parametrize("text, message", [
    (_arms_text(extra='colour = "blue"'), "trial.colour: unknown key"),
    (_arms_text(reference="placebo"), "trial.reference: 'placebo' is not one of the arms"),
    (_arms_text(scenario="glucose_mgdl*2"), "trial.arms[2].scenario: arm same-again: 'glucose_mgdl' is not a control"),
    ("[trial\nname = 1", "not valid TOML"),
    (_arms_text(purpose=""), "trial.purpose: must not be empty"),
])
def test_an_arms_file_error_is_one_line_naming_the_file_and_key(world, tmp_path, capsys, text, message):
    root, site, _ = world
    arms = tmp_path / "bad.toml"
    arms.write_text(text)
    line = _one_error(capsys, ["trial", "--model", str(root / "run"), "--arms", str(arms), "--data", str(site),
                               "--out", str(tmp_path / "out")], message)
    assert str(arms) in line
    assert not (tmp_path / "out").exists()


def test_a_missing_arms_file_is_one_line(world, tmp_path, capsys):
    root, site, _ = world
    _one_error(capsys, ["trial", "--model", str(root / "run"), "--arms", str(tmp_path / "none.toml"),
                        "--data", str(site)], "none.toml: no such file")


@pytest.mark.parametrize("where", [["--data", "{site}", "--site", "a={site}"], []])
def test_the_patients_come_from_data_or_from_sites_never_both_nor_neither(world, capsys, where):
    root, site, _ = world
    _one_error(capsys, _trial(root, *[w.format(site=site) for w in where]), "not both and not neither")


def test_a_trial_no_patient_consented_to_is_one_line(world, tmp_path, capsys):
    root, site, ids = world
    arms = tmp_path / "other.toml"
    arms.write_text(_arms_text(purpose="another-study"))
    argv = ["trial", "--model", str(root / "run"), "--arms", str(arms), "--data", str(site),
            "--out", str(tmp_path / "out")]
    line = _one_error(capsys, argv, "fewer than 2 patients could take part (0)", progress=True)
    assert "'another-study'" in line and not any(pid in line for pid in ids)
    assert not (tmp_path / "out" / "trial.json").exists()
