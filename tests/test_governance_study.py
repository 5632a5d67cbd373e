"""Governance end to end on the real Flower simulation engine: approval, consent, audit."""

import json

import pytest

from builders import write_site
from twinfed.cli.main import main
from twinfed.governance.verify import verify_path

pytestmark = [pytest.mark.slow, pytest.mark.studies]

SMALL = ["--rounds", "1", "--local-steps", "2", "--batch-size", "4", "--hidden", "8", "--no-calibration"]


def _events(state_dir) -> list[dict]:
    return [json.loads(line) for line in (state_dir / "audit.jsonl").read_text().splitlines()]


@pytest.fixture()
def sites(tmp_path):
    return {n: write_site(tmp_path / "data" / n, n_patients=6, n_steps=80, seed=i)
            for i, n in enumerate("abc")}


def _site_args(sites):
    return [a for n, d in sites.items() for a in ("--site", f"{n}={d}")]


def test_a_plan_no_officer_approved_is_refused_by_every_node_and_audited_on_both_sides(sites, tmp_path, capsys):
    for n, d in sites.items():  # hospital IT initialised the nodes; no officer approved anything
        assert main(["node", "init", "--state", str(tmp_path / "run" / "nodes" / n), "--site-data", str(d),
                     "--site-name", n]) == 0
    code = main(["simulate", "--spec", "glucose", *_site_args(sites), *SMALL, "--approved-only",
                 "--out", str(tmp_path / "run")])
    assert code == 1 and "no round updated the model" in capsys.readouterr().err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    for s in summary["sites"].values():
        assert s["rounds_joined"] == 0 and s["refusals"][0]["code"] == "plan_not_approved"
    node_events = [e["event"] for e in _events(tmp_path / "run" / "nodes" / "a")]
    assert "plan_refused" in node_events and "round_refused" in node_events
    assert "round_joined" not in node_events and not (tmp_path / "run" / "nodes" / "a" / "privacy_ledger.json").exists()
    skipped = [e for e in _events(tmp_path / "run" / "coordinator") if e["event"] == "round_skipped"]
    assert set(skipped[0]["details"]["sites_refused"]) == {"a", "b", "c"}  # nothing to unmask
    report = verify_path(tmp_path / "run")
    assert report.ok and report.anchors_checked >= 6


def test_a_simulated_run_directory_verifies_whole_and_names_an_edited_node_entry(sites, tmp_path, capsys):
    assert main(["simulate", "--spec", "glucose", *_site_args(sites), *SMALL, "--out", str(tmp_path / "run")]) == 0
    node_a = tmp_path / "run" / "nodes" / "a"
    events = _events(node_a)
    assert events[2]["event"] == "plan_approved" and events[2]["actor"] == "operator:twinfed-simulate"
    joined = next(e for e in events if e["event"] == "round_joined")
    assert joined["details"]["patients_used"] == 6 and joined["details"]["epsilon_spent"] <= 3.0
    assert not any("p0" in json.dumps(e) for e in events)  # counts and hashes, never identifiers
    capsys.readouterr()
    assert main(["audit", "verify", str(tmp_path / "run")]) == 0

    log = node_a / "audit.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    lines[joined["seq"]] = lines[joined["seq"]].replace('"patients_used":6', '"patients_used":5')
    log.write_text("".join(lines))
    assert main(["audit", "verify", str(tmp_path / "run")]) == 1
    err = capsys.readouterr()
    assert f"seq {joined['seq']}" in err.out + err.err


def test_a_withdrawal_between_two_studies_changes_the_next_studys_counts(sites, tmp_path):
    common = ["simulate", "--spec", "glucose", *_site_args(sites), *SMALL, "--no-dp",
              "--state", str(tmp_path / "nodes")]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    assert main(["consent", "withdraw", "--state", str(tmp_path / "nodes" / "b"), "--patient", "p3",
                 "--purpose", "twin-training"]) == 0
    assert main([*common, "--out", str(tmp_path / "two")]) == 0
    # A baseline without DP releases no counts; the nodes' own logs hold the exact ones.
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["sites"]["b"]["patients_used"] is None
    b = [(e["details"]["patients_used"], e["details"]["patients_excluded"])
         for e in _events(tmp_path / "nodes" / "b") if e["event"] == "round_joined"]
    a = [e["details"]["patients_used"] for e in _events(tmp_path / "nodes" / "a") if e["event"] == "round_joined"]
    assert b == [(6, 0), (5, 1)] and a == [6, 6]
