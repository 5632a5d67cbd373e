"""The governance commands: help everywhere, exit 0/1, one-line errors, no patient ids in status."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from audit_builders import lines, make_run, write_lines
from builders import edit_csv, write_site
from fs_faults import disk_full, read_only
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


# ------------------------------------------------------------------------------------------------
# issue 13: every bad input at a node's state is one line, never a hang, and nothing stored is lost


def _snapshot(state: Path) -> dict[str, bytes]:
    """Every regular file of a state directory, by relative path (the lock file aside)."""
    return {str(p.relative_to(state)): p.read_bytes() for p in sorted(state.rglob("*"))
            if p.is_file() and not p.is_symlink() and p.name != ".lock"}


def _approve(state: Path, plan_file: Path, rounds: int = 3) -> TrainingPlan:
    plan = TrainingPlan(spec=load_spec("glucose"), rounds=rounds)
    plan_file.write_text(plan.canonical_json())
    assert main(["plan", "approve", "--state", str(state), "--plan", str(plan_file), "--actor", "officer:t"]) == 0
    return plan


@pytest.mark.parametrize("when", ["9999-12-31T23:00:00-05:00", "0001-01-01T00:30:00+01:00",
                                  "1969-12-31T23:59:59Z", "2200-01-01T00:00:00Z"])
def test_a_consent_time_out_of_range_is_an_error_in_validate_init_and_import(tmp_path, capsys, when):
    state = _node(tmp_path, capsys)
    bad = write_site(tmp_path / "site-b", n_patients=3, n_steps=30)
    edit_csv(bad / "consent.csv", 2, "recorded_at", when)
    expected = ("twinfed: error: consent.csv row 2, column recorded_at: not between 1970-01-01 and "
                "2200-01-01 (UTC); fix the export's times")
    assert main(["data", "validate", "--spec", "glucose", "--data", str(bad)]) == 1
    assert _error_line(capsys) == expected
    assert main(["node", "init", "--state", str(tmp_path / "new"), "--site-data", str(bad)]) == 1
    assert _error_line(capsys) == expected
    assert not (tmp_path / "new").exists()  # checked before anything was created
    before = _snapshot(state)
    assert main(["consent", "import", "--state", str(state), "--site-data", str(bad),
                 "--actor", "officer:t"]) == 1
    assert _error_line(capsys) == expected
    assert _snapshot(state) == before  # no audited import that never happened


@pytest.mark.parametrize("files", [True, False], ids=["whole-tree", "directories-only"])
def test_consent_withdraw_on_a_read_only_state_is_one_line_and_changes_nothing(tmp_path, capsys, monkeypatch,
                                                                               files):
    state = _node(tmp_path, capsys)
    before = _snapshot(state)
    read_only(monkeypatch, state, files=files)
    assert main(["consent", "withdraw", "--state", str(state), "--patient", "p1", "--purpose", "twin-training",
                 "--actor", "officer:t"]) == 1
    line = _error_line(capsys)
    assert line.endswith(": permission denied; check the directory's permissions")
    assert line == ("twinfed: error: " + (f"{state}/.lock: cannot open the state lock" if files else
                                          f"cannot write {state_paths(state).consent}")
                    + ": permission denied; check the directory's permissions")
    assert _snapshot(state) == before


def test_node_init_into_a_read_only_directory_is_one_line_and_creates_nothing(tmp_path, capsys, monkeypatch):
    parent = tmp_path / "ro"
    parent.mkdir()
    read_only(monkeypatch, parent)
    assert main(["node", "init", "--state", str(parent / "state"), "--site-name", "a"]) == 1
    assert _error_line(capsys) == (f"twinfed: error: cannot write {parent / 'state'}: permission denied; "
                                   "check the directory's permissions")
    assert list(parent.iterdir()) == []


def test_audit_report_into_a_read_only_directory_is_one_line(tmp_path, capsys, monkeypatch):
    run = make_run(tmp_path / "run")
    out = tmp_path / "out"
    out.mkdir()
    read_only(monkeypatch, out)
    assert main(["audit", "report", str(run), "--out", str(out)]) == 1
    assert _error_line(capsys) == (f"twinfed: error: cannot write {out / 'report.json'}: permission denied; "
                                   "check the directory's permissions")
    assert list(out.iterdir()) == []


def test_a_full_disk_during_consent_withdraw_is_one_line_and_keeps_the_registry(tmp_path, capsys, monkeypatch):
    state = _node(tmp_path, capsys)
    before = _snapshot(state)
    disk_full(monkeypatch, state, room=40)  # the new registry is cut off mid-write
    assert main(["consent", "withdraw", "--state", str(state), "--patient", "p1", "--purpose", "twin-training",
                 "--actor", "officer:t"]) == 1
    assert _error_line(capsys) == (f"twinfed: error: cannot write {state_paths(state).consent}: no space left "
                                   "on the device; free some space and run the command again")
    assert _snapshot(state) == before
    assert not [p for p in state.rglob(".records.csv.*")]  # no temporary file left behind


def test_a_full_disk_during_plan_approve_is_one_line_and_keeps_log_and_approvals(tmp_path, capsys,
                                                                                  monkeypatch):
    state = _node(tmp_path, capsys)
    _approve(state, tmp_path / "plan1.json", rounds=2)
    before = _snapshot(state)
    assert "approvals.json" in before
    disk_full(monkeypatch, state, room=100)  # the audit entry is cut off mid-line: it must not stay torn
    plan = TrainingPlan(spec=load_spec("glucose"), rounds=3)
    (tmp_path / "plan2.json").write_text(plan.canonical_json())
    assert main(["plan", "approve", "--state", str(state), "--plan", str(tmp_path / "plan2.json"),
                 "--actor", "officer:t"]) == 1
    assert _error_line(capsys) == (f"twinfed: error: cannot write {state_paths(state).audit}: no space left "
                                   "on the device; free some space and run the command again")
    assert _snapshot(state) == before
    assert main(["audit", "verify", str(state)]) == 0


@pytest.mark.parametrize("argv", [
    ["consent", "withdraw", "--patient", "p1", "--purpose", "twin-training"],
    ["consent", "grant", "--patient", "p9", "--purpose", "twin-training"],
    ["consent", "import", "--site-data", "SITE"],
    ["plan", "approve", "--plan", "PLAN"],
    ["plan", "revoke", "--sha", "SHA"],
], ids=lambda a: " ".join(a[:2]))
def test_an_audit_log_replaced_by_a_link_to_dev_null_is_refused_and_nothing_changes(tmp_path, capsys, argv):
    state = _node(tmp_path, capsys)
    plan = _approve(state, tmp_path / "plan.json")
    if argv[1] == "approve":
        other = TrainingPlan(spec=load_spec("glucose"), rounds=7)
        (tmp_path / "plan.json").write_text(other.canonical_json())
    log = state_paths(state).audit
    log.unlink()
    log.symlink_to("/dev/null")
    before = _snapshot(state)
    subst = {"SITE": str(tmp_path / "site-a"), "PLAN": str(tmp_path / "plan.json"), "SHA": plan.sha256()}
    assert main([*argv[:2], "--state", str(state), *[subst.get(a, a) for a in argv[2:]],
                 "--actor", "officer:t"]) == 1
    assert _error_line(capsys) == (f"twinfed: error: {log}: is a symbolic link (to /dev/null), not a regular "
                                   "file; an audit log must be one, or what is written to it is lost: restore "
                                   "the log from a backup")
    assert _snapshot(state) == before and log.is_symlink()


def test_audit_verify_and_show_refuse_a_log_that_is_not_a_regular_file(tmp_path, capsys):
    state = _node(tmp_path, capsys)
    log = state_paths(state).audit
    log.unlink()
    os.mkfifo(log)  # a reader that opened it blindly would hang here
    reason = "is a named pipe, not a regular file; an audit log must be one"
    assert main(["audit", "verify", str(state)]) == 1
    assert f"FAIL {log}: {reason}" in capsys.readouterr().out
    assert main(["audit", "verify", str(log)]) == 1
    assert f"FAIL {log}: {reason}" in capsys.readouterr().out
    assert main(["audit", "verify", str(state), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["ok"] is False
    assert main(["audit", "show", str(state)]) == 1
    assert f"{log}: {reason}" in _error_line(capsys)


@pytest.mark.parametrize("argv, shown", [
    (["--site-name", "a" * 300], "site name 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa'... (300 characters)"),
    (["--site-name", "a" * 65], "site name 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa'... (65 characters)"),
    (["--site-name", "ward 3"], "site name 'ward 3'"),
    (["--site-name=-a"], "site name '-a'"),
    (["--site-name", "../a"], "site name '../a'"),
])
def test_node_init_refuses_a_site_name_that_is_not_plain_before_creating_anything(tmp_path, capsys, argv,
                                                                                  shown):
    assert main(["node", "init", "--state", str(tmp_path / "state"), *argv]) == 1
    assert _error_line(capsys) == (f"twinfed: error: {shown} is not a plain name (letters, digits, '.', '_' "
                                   "and '-', starting with a letter or digit, at most 64 characters); choose "
                                   "another --site-name")
    assert not (tmp_path / "state").exists()


def test_node_init_refuses_a_site_directory_whose_name_is_not_a_plain_site_name(tmp_path, capsys):
    site = write_site(tmp_path / "site a", n_patients=2, n_steps=30)
    assert main(["node", "init", "--state", str(tmp_path / "state"), "--site-data", str(site)]) == 1
    assert "the site directory's name 'site a' is not a plain site name" in _error_line(capsys)
    assert not (tmp_path / "state").exists()
    assert main(["node", "init", "--state", str(tmp_path / "state"), "--site-data", str(site),
                 "--site-name", "site-a"]) == 0


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_node_state_is_private_0700_directories_and_0600_files(tmp_path, capsys):
    state = _node(tmp_path, capsys)
    _approve(state, tmp_path / "plan.json")
    assert main(["ledger", "set-budget", "--state", str(state), "--epsilon", "5", "--actor", "officer:t"]) == 0
    dirs = [p for p in [state, *state.rglob("*")] if p.is_dir()]
    files = [p for p in state.rglob("*") if p.is_file() and not p.name.endswith(".pub")]
    assert {p.name for p in dirs} == {"state", "keys", "consent"}
    assert {p.name for p in files} >= {"audit.jsonl", "state.json", "approvals.json", "privacy_ledger.json",
                                       "records.csv", "audit_ed25519", ".lock"}
    assert {str(p): _mode(p) for p in dirs} == {str(p): 0o700 for p in dirs}
    assert {str(p): _mode(p) for p in files} == {str(p): 0o600 for p in files}
    assert main(["audit", "verify", str(state)]) == 0
    assert not [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]


def test_audit_verify_notes_a_state_directory_or_private_key_others_can_read(tmp_path, capsys):
    state = _node(tmp_path, capsys)
    key = state_paths(state).key
    os.chmod(state, 0o755)
    os.chmod(key, 0o644)
    assert main(["audit", "verify", str(state)]) == 0  # a warning, not a failure
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == [f"note: {state}: mode 0755 lets group or others into the state directory; "
                     f"chmod 700 {state}",
                     f"note: {key}: mode 0644 lets group or others read or change the private key; "
                     f"chmod 600 {key}"]
    assert main(["audit", "verify", str(state), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["notes"] == [n.removeprefix("note: ") for n in notes]


def test_audit_verify_finds_node_states_kept_outside_the_run_with_state(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    states = tmp_path / "states"
    (run / "nodes").rename(states)  # as 'twinfed simulate --state DIR' keeps them
    assert main(["audit", "verify", str(run)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == [f"note: no state for site {s!r} under {run / 'nodes'}; its log was not cross-checked; "
                       "if the node states are kept elsewhere (as 'twinfed simulate --state DIR' keeps "
                       "them), pass --state DIR" for s in ("a", "b")]
    assert main(["audit", "verify", str(run), "--state", str(states)]) == 0
    n = sum(len(lines(p)) for p in tmp_path.rglob("audit.jsonl"))
    assert capsys.readouterr().out.splitlines() == [f"ok: {run}: {n} entries in 3 log(s), 8 cross-anchors checked"]
    log = state_paths(states / "a").audit
    ls = lines(log)
    write_lines(log, ls[:-1])  # cut the node's tail: only the coordinator's anchor can tell
    assert main(["audit", "verify", str(run), "--state", str(states)]) == 1
    assert capsys.readouterr().out.startswith(f"FAIL {log} seq {len(ls) - 1}: ")
    (states / "b").rename(tmp_path / "elsewhere")
    main(["audit", "verify", str(run), "--state", str(states)])
    assert (f"note: no state for site 'b' under {run / 'nodes'} or {states}; its log was not cross-checked"
            in capsys.readouterr().out.splitlines())
    assert main(["audit", "verify", str(states / "a"), "--state", str(states)]) == 1
    assert "not a run directory; --state" in _error_line(capsys)


def test_audit_report_out_naming_a_file_is_one_line_and_overwrites_nothing(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    target = tmp_path / "notes.txt"
    target.write_text("the officer's own notes\n")
    assert main(["audit", "report", str(run), "--out", str(target)]) == 1
    assert _error_line(capsys) == (f"twinfed: error: {target}: not a directory; --out names the directory to "
                                   "write report.html and report.json into, and an existing file is never "
                                   "overwritten")
    assert target.read_text() == "the officer's own notes\n"
    out = tmp_path / "out"
    (out / "report.json").mkdir(parents=True)  # something in the way of its own file
    (out / "keep.txt").write_text("keep")
    assert main(["audit", "report", str(run), "--out", str(out)]) == 1
    assert _error_line(capsys) == (f"twinfed: error: cannot write {out / 'report.json'}: a directory is in "
                                   "the way; move it aside")
    (out / "report.json").rmdir()
    assert main(["audit", "report", str(run), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "report.html", "report.json"]
    assert (out / "keep.txt").read_text() == "keep"
