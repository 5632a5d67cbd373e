"""Verifying a whole run: pinned node keys and cross-anchors catch what one log alone cannot."""

import json

from audit_builders import lines, make_run, resign, write_lines
from twinfed.governance.audit_log import AuditEntry
from twinfed.governance.keys import generate_signing_key, load_signer
from twinfed.governance.layout import state_paths
from twinfed.governance.verify import verify_path


def test_an_untampered_run_verifies_with_every_anchor_checked(tmp_path):
    run = make_run(tmp_path / "run", sites=("a", "b"), rounds=2)
    report = verify_path(run)
    assert report.ok, report.issues
    assert [(lg.kind, lg.name) for lg in report.logs] == [("coordinator", "coordinator"), ("node", "a"), ("node", "b")]
    assert report.anchors_checked == 8  # 2 rounds x 2 nodes, in each direction


def test_a_node_log_truncated_below_the_head_the_coordinator_recorded_is_caught(tmp_path):
    run = make_run(tmp_path / "run", rounds=2)
    log = state_paths(run / "nodes" / "b").audit
    write_lines(log, lines(log)[:-1])  # drop round 2's entry: a clean, validly signed prefix
    report = verify_path(run)
    assert not report.ok
    [issue] = report.issues
    assert issue.file == str(log) and issue.seq == 2
    assert "truncated" in issue.reason and "coordinator/audit.jsonl seq" in issue.reason


def test_a_node_key_swapped_and_log_re_signed_is_caught_by_the_coordinators_pin(tmp_path):
    run = make_run(tmp_path / "run", rounds=1)
    node = run / "nodes" / "a"
    p = state_paths(node)
    entries = [AuditEntry.model_validate_json(ln) for ln in lines(p.audit)]
    p.key.unlink()
    p.public_key.unlink()
    new = generate_signing_key(p.key)
    # The forger keeps the node's own files consistent: first entry, state.json, the log.
    first = entries[0].model_copy(update={"details": {**entries[0].details, "key_fingerprint": new.fingerprint}})
    write_lines(p.audit, resign([first, *entries[1:]], new))
    info = json.loads(p.info.read_text())
    p.info.write_text(json.dumps({**info, "key_fingerprint": new.fingerprint}))
    assert verify_path(node).ok  # alone, the node's state looks fine
    report = verify_path(run)
    issues = [i for i in report.issues if i.file == str(p.audit)]
    assert issues and issues[0].seq == 0 and "coordinator pinned" in issues[0].reason


def test_a_coordinator_log_rewritten_with_its_own_key_is_caught_by_the_nodes_anchors(tmp_path):
    run = make_run(tmp_path / "run", rounds=2)
    p = state_paths(run / "coordinator")
    entries = [AuditEntry.model_validate_json(ln) for ln in lines(p.audit)]
    # The coordinator drops round 1's start and re-signs everything with its real key.
    kept = [e for e in entries if not (e.event == "round_started" and e.details["round"] == 1)]
    write_lines(p.audit, resign(kept, load_signer(p.key)))
    report = verify_path(run)
    assert not report.ok
    first = report.issues[0]
    assert first.file == str(p.audit) and first.seq == 4  # round 1's round_started was seq 4
    assert "rewritten" in first.reason and "nodes/a/audit.jsonl" in first.reason


def test_a_run_names_the_first_bad_entry_by_file_and_seq(tmp_path):
    run = make_run(tmp_path / "run", sites=("a", "b", "c"), rounds=2)
    log = state_paths(run / "nodes" / "c").audit
    ls = lines(log)
    obj = json.loads(ls[2])
    obj["details"]["epsilon_spent"] = 0.0
    ls[2] = json.dumps(obj, separators=(",", ":")).encode()
    write_lines(log, ls)
    report = verify_path(run)
    assert [(i.file, i.seq) for i in report.issues] == [(str(log), 2)]


def test_a_node_missing_from_the_run_is_noted_not_failed(tmp_path):
    run = make_run(tmp_path / "run", sites=("a", "b"), rounds=1)
    import shutil

    shutil.rmtree(run / "nodes" / "b")
    report = verify_path(run)
    assert report.ok and any("'b'" in n for n in report.notes)


def test_an_emptied_state_log_is_caught_even_without_the_coordinator(tmp_path):
    run = make_run(tmp_path / "run", sites=("a",), rounds=1)
    state_paths(run / "nodes" / "a").audit.write_bytes(b"")
    report = verify_path(run / "nodes" / "a")
    assert not report.ok and report.issues[0].seq == 0 and "empty" in report.issues[0].reason
