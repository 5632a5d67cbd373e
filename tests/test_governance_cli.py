"""The governance commands: help everywhere, exit 0/1, one-line errors, no patient ids in status."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from audit_builders import lines, make_run, write_lines
from builders import write_site
from twinfed.cli.main import main
from twinfed.governance.consent_registry import patient_status
from twinfed.governance.layout import state_paths
from twinfed.models.plan import TrainingPlan
from twinfed.models.spec import load_spec

TWINFED = str(Path(sys.executable).parent / "twinfed")


@pytest.mark.parametrize("argv", [["node"], ["node", "init"], ["consent"], ["consent", "import"],
                                  ["consent", "grant"], ["consent", "withdraw"], ["consent", "status"],
                                  ["plan"], ["plan", "show"], ["plan", "approve"], ["plan", "revoke"],
                                  ["plan", "list"], ["audit"], ["audit", "verify"], ["audit", "show"],
                                  ["audit", "report"]])
def test_every_governance_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    assert "usage: twinfed" in capsys.readouterr().out


def _node(tmp_path, capsys):
    site = write_site(tmp_path / "site-a", n_patients=4, n_steps=30)
    state = tmp_path / "state"
    assert main(["node", "init", "--state", str(state), "--site-data", str(site)]) == 0
    capsys.readouterr()
    return state


def test_node_init_then_consent_status_prints_counts_and_never_patient_ids(tmp_path, capsys):
    state = _node(tmp_path, capsys)
    assert main(["consent", "withdraw", "--state", str(state), "--patient", "p1", "--purpose", "twin-training",
                 "--actor", "officer:test"]) == 0
    assert main(["consent", "status", "--state", str(state)]) == 0
    out = capsys.readouterr().out
    assert "twin-training" in out and "3" in out and "p1" not in out and "p0" not in out
    assert main(["consent", "status", "--state", str(state), "--patient", "p1"]) == 0
    assert capsys.readouterr().out.strip() == "twin-training: withdrawn"


def test_node_init_also_makes_the_supernode_authentication_key_for_enrolment(tmp_path, capsys):
    state = _node(tmp_path, capsys)
    private, public = state / "keys" / "supernode-auth.key", state / "keys" / "supernode-auth.key.pub"
    assert private.stat().st_mode & 0o777 == 0o600
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")


def test_plan_approve_list_show_and_revoke(tmp_path, capsys):
    state = _node(tmp_path, capsys)
    plan = TrainingPlan(spec=load_spec("glucose"), rounds=3)
    (tmp_path / "plan.json").write_text(plan.canonical_json())
    assert main(["plan", "approve", "--state", str(state), "--plan", str(tmp_path / "plan.json")]) == 0
    assert plan.sha256() in capsys.readouterr().out
    assert main(["plan", "list", "--state", str(state)]) == 0
    assert plan.sha256()[:16] in capsys.readouterr().out
    assert main(["plan", "show", "--state", str(state), "--sha", plan.sha256()[:10]]) == 0
    out = capsys.readouterr().out
    assert f"plan sha256: {plan.sha256()}" in out and "status:      approved" in out
    assert main(["plan", "revoke", "--state", str(state), "--sha", plan.sha256()]) == 0
    assert main(["plan", "show", "--plan", str(tmp_path / "plan.json")]) == 0
    assert "rounds:      3" in capsys.readouterr().out


def test_audit_verify_exits_0_for_an_intact_run(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    assert main(["audit", "verify", str(run)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"ok: {run}: {sum(len(lines(p)) for p in run.rglob('audit.jsonl'))} entries in 3 log(s), "
                   "8 cross-anchors checked"]


def test_audit_verify_exits_1_with_one_fail_line_naming_file_and_seq(tmp_path):
    run = make_run(tmp_path / "run")
    log = state_paths(run / "nodes" / "a").audit
    ls = lines(log)
    write_lines(log, ls[:1] + ls[2:])
    proc = subprocess.run([TWINFED, "audit", "verify", str(run)], capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    out = proc.stdout.strip().splitlines()
    assert out[0].startswith(f"FAIL {log} seq 1: entry 1 (line 2) holds seq 2 where seq 1 belongs")


def test_errors_are_one_line_without_traceback(tmp_path):
    proc = subprocess.run([TWINFED, "plan", "list", "--state", str(tmp_path / "nowhere")],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "not an initialised node state" in proc.stderr
    proc = subprocess.run([TWINFED, "audit", "verify", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1


def test_audit_show_filters_by_event_and_round(tmp_path, capsys):
    run = make_run(tmp_path / "run", rounds=3)
    assert main(["audit", "show", str(run / "coordinator"), "--event", "round_aggregated", "--round", "2"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 3 and "round_aggregated" in out[2] and "round=2" in out[2]
    assert main(["audit", "show", str(run), "--event", "round_joined", "--json"]) == 0
    shown = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(shown) == 6 and {e["event"] for e in shown} == {"round_joined"}
    assert main(["audit", "show", str(run), "--since", "2099-01-01T00:00:00Z"]) == 0
    assert capsys.readouterr().out.strip() == "no matching entries"


def test_audit_report_writes_html_and_json(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    assert main(["audit", "report", str(run), "--out", str(tmp_path / "out")]) == 0
    assert "2 site(s), verified" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "report.json").read_text())["verification"]["ok"]
    assert (tmp_path / "out" / "report.html").read_text().startswith("<!DOCTYPE html>")


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


@pytest.mark.parametrize("patient, purpose", [("p99", "twin-training"), ("p1", "twin-trainng")])
def test_withdrawing_an_unknown_patient_or_purpose_is_a_one_line_error(tmp_path, capsys, patient, purpose):
    state = _node(tmp_path, capsys)
    assert main(["consent", "withdraw", "--state", str(state), "--patient", patient, "--purpose", purpose,
                 "--actor", "officer:test"]) == 1
    assert _error_line(capsys) == (f"twinfed: error: no consent record for this patient and purpose "
                                   f"{purpose!r}; check the id and the purpose ('twinfed consent status' "
                                   "lists the purposes)")


def test_importing_consent_dated_in_the_future_is_a_one_line_error_naming_row_and_column(tmp_path, capsys):
    state = _node(tmp_path, capsys)
    (tmp_path / "late.csv").write_text("patient_id,status,purpose,recorded_at\n"
                                       "p-secret,granted,twin-training,2099-01-01T00:00:00Z\n")
    assert main(["consent", "import", "--state", str(state), "--site-data", str(tmp_path / "late.csv"),
                 "--actor", "officer:test"]) == 1
    line = _error_line(capsys)
    assert line.startswith("twinfed: error: late.csv row 1, column recorded_at: dated after ")
    assert "more than 5 minutes ahead of this node's clock" in line and "p-secret" not in line


def test_patient_file_carries_an_id_with_a_comma_a_quote_and_a_line_break(tmp_path, capsys):
    state = _node(tmp_path, capsys)
    odd = 'site-a,"7"\nward 3'
    (tmp_path / "id.txt").write_text(odd + "\n")  # one final newline is not part of the id
    by_file = ["--patient-file", str(tmp_path / "id.txt"), "--purpose", "twin-training"]
    assert main(["consent", "grant", "--state", str(state), *by_file, "--actor", "officer:test"]) == 0
    assert main(["consent", "status", "--state", str(state), "--patient-file", str(tmp_path / "id.txt")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "twin-training: granted"
    assert main(["consent", "withdraw", "--state", str(state), *by_file, "--actor", "officer:test"]) == 0
    assert main(["consent", "status", "--state", str(state), "--patient-file", str(tmp_path / "id.txt")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "twin-training: withdrawn" and "site-a" not in out
    assert patient_status(state, odd) == {"twin-training": "withdrawn"}


def test_patient_and_patient_file_are_mutually_exclusive(tmp_path, capsys):
    (tmp_path / "id.txt").write_text("p1")
    with pytest.raises(SystemExit) as exc:
        main(["consent", "withdraw", "--state", str(tmp_path), "--patient", "p1",
              "--patient-file", str(tmp_path / "id.txt"), "--purpose", "twin-training"])
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_a_missing_patient_file_is_a_one_line_error(tmp_path, capsys):
    state = _node(tmp_path, capsys)
    assert main(["consent", "withdraw", "--state", str(state), "--patient-file", str(tmp_path / "none.txt"),
                 "--purpose", "twin-training"]) == 1
    assert "none.txt: no such file" in _error_line(capsys)
