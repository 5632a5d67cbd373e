"""Every ``--json`` output of the CLI parses as JSON: the machine interface the consortium's
tooling reads. The table must name every sub-command that has a --json flag."""

import argparse
import csv
import json
import shutil
import tempfile
from pathlib import Path

import pytest

from builders import simulate_from_cli
from twinfed.cli.main import build_parser, main
from twinfed.models.cohort import HOLDOUT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("json")
    simulate_from_cli(root, patients=8, seed=2, holdout=2,
                      flags=["--rounds", "1", "--local-steps", "2", "--batch-size", "4"])
    with (root / "cohort" / HOLDOUT / "patients.csv").open(newline="") as fh:
        patient = list(csv.reader(fh))[1][0]
    return root, patient


# A short trial the 2.5-day cohort can hold: 30 h of record before the start, a day after it.
TRIAL_ARMS = """
[trial]
name = "json-trial"
purpose = "in-silico-trial"
reference = "usual-care"
start_hours = 30
duration_days = 1
outcomes = ["time_in_range", "mean_glucose"]
draws = 2

[[trial.arms]]
name = "usual-care"

[[trial.arms]]
name = "less-insulin"
scenario = "insulin_u*0.8"
"""


def _cases(root, patient):
    holdout = root / "cohort" / HOLDOUT
    arms = root / "trial-arms.toml"
    arms.write_text(TRIAL_ARMS)
    # A local recalibration replaces the calibration the coordinator recorded at study_finished,
    # which audit verify then reports: it recalibrates a copy of the model, not the audited run.
    recalibrated = root / "recalibrated"
    if not recalibrated.exists():
        shutil.copytree(root / "run" / "model", recalibrated / "model")
    return {
        # --force: the case is idempotent, whatever ran before it in this module
        ("calibrate",): ["calibrate", "--model", str(recalibrated), "--data", str(holdout), "--force", "--json"],
        ("evaluate",): ["evaluate", "--model", str(root / "run"), "--spec", str(root / "cohort" / "spec.toml"),
                        "--data", str(holdout), "--identify-hours", "24", "--json"],
        ("whatif",): ["whatif", "--model", str(root / "run"), "--data", str(holdout), "--patient", patient,
                      "--at", str(36 * 60), "--scenario", "a=recorded", "--scenario", "b=insulin_u*0", "--json"],
        # a new --out each time: a trial never overwrites its results
        ("trial",): ["trial", "--model", str(root / "run"), "--arms", str(arms), "--data", str(holdout),
                     "--out", str(Path(tempfile.mkdtemp(dir=root)) / "trial"), "--json"],
        ("audit", "verify"): ["audit", "verify", str(root / "run"), "--json"],
        ("audit", "show"): ["audit", "show", str(root / "run"), "--event", "round_joined", "--json"],
        ("ledger", "show"): ["ledger", "show", "--state", str(root / "run" / "nodes" / "site-a"), "--json"],
    }


def _commands_with_json(parser: argparse.ArgumentParser, prefix=()) -> set[tuple]:
    found = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found |= _commands_with_json(sub, (*prefix, name))
        elif "--json" in action.option_strings:
            found.add(prefix)
    return found


# evaluate, whatif and trial show the intervals the study calibrated (simulate calibrates by default).
JSON_COMMANDS = [("calibrate",), ("evaluate",), ("whatif",), ("trial",), ("audit", "verify"), ("audit", "show"),
                 ("ledger", "show")]


def test_the_table_covers_every_json_output():
    assert _commands_with_json(build_parser()) == set(JSON_COMMANDS)


@pytest.mark.parametrize("command", JSON_COMMANDS)
def test_every_json_output_parses(run, command, capsys):
    root, patient = run
    capsys.readouterr()
    assert main(_cases(root, patient)[command]) == 0
    out = capsys.readouterr().out
    if command == ("audit", "show"):  # JSON lines
        lines = [json.loads(line) for line in out.splitlines()]
        assert lines and all(e["event"] == "round_joined" for e in lines)
    else:
        assert isinstance(json.loads(out), dict)
