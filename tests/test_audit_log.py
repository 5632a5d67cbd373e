"""The audit log: appends are signed and chained; verify names the first bad entry of any tampering."""

import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
from datetime import datetime, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audit_builders import T0, lines, node_with_log, resign, write_lines
from fs_faults import disk_full
from twinfed.errors import AuditError
from twinfed.governance.audit_log import (GENESIS, AuditEntry, AuditLog, Head, encode_entry, line_hash,
                                          read_entries, verify_log)
from twinfed.governance.keys import generate_signing_key, load_public_key, load_signer
from twinfed.governance.layout import state_paths


def _key(state: Path):
    return load_public_key(state_paths(state).public_key)


def _edit(path: Path, seq: int, **details) -> None:
    """Change entry ``seq``'s details in place, leaving its hash and signature as they were."""
    ls = lines(path)
    obj = json.loads(ls[seq])
    obj["details"].update(details)
    ls[seq] = json.dumps(obj, separators=(",", ":")).encode()
    write_lines(path, ls)


def test_a_fresh_log_verifies_and_its_head_is_the_newest_entry(tmp_path):
    log = node_with_log(tmp_path, 5)
    result = verify_log(log, _key(tmp_path))
    assert result.ok and result.n_entries == 5 and result.first_bad_seq is None
    last = AuditEntry.model_validate_json(lines(log)[-1])
    assert result.head == Head(seq=4, hash=last.hash)


def test_entries_chain_from_genesis_with_0_based_seq_and_the_injected_time(tmp_path):
    signer = generate_signing_key(tmp_path / "keys" / "k")
    log = AuditLog(tmp_path / "audit.jsonl", signer, actor="coordinator")
    first = log.append("test_started", {}, at=datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=timezone.utc))
    second = log.append("test_round", {"round": 1}, at=T0)
    assert (first.seq, first.prev, first.time) == (0, GENESIS, "2026-01-02T03:04:05.000006Z")
    assert second.seq == 1 and second.prev == line_hash(lines(log.path)[0])
    assert log.head() == Head(seq=1, hash=second.hash)


def test_verify_names_the_first_edited_entry(tmp_path):
    log = node_with_log(tmp_path, 6)
    _edit(log, 2, epsilon_spent=0.01)
    _edit(log, 4, patients_used=500)
    result = verify_log(log, _key(tmp_path))
    assert not result.ok
    assert (result.first_bad_seq, result.line, result.n_entries) == (2, 3, 2)
    assert "edited" in result.reason and result.reason.startswith("entry 2 (line 3)")


def test_an_edited_entry_with_a_recomputed_hash_is_named_by_its_signature(tmp_path):
    log = node_with_log(tmp_path, 6)
    ls = lines(log)
    forger = generate_signing_key(tmp_path / "other" / "k")  # stands in for any key but the owner's
    e = AuditEntry.model_validate_json(ls[2])
    ls[2] = encode_entry(forger, seq=2, prev=e.prev, actor=e.actor, event=e.event,
                         details={**e.details, "epsilon_spent": 0.0}, time=e.time).rstrip(b"\n")
    write_lines(log, ls)
    result = verify_log(log, _key(tmp_path))
    assert result.first_bad_seq == 2 and "signature" in result.reason


def test_a_deleted_entry_is_named(tmp_path):
    log = node_with_log(tmp_path, 6)
    ls = lines(log)
    write_lines(log, ls[:3] + ls[4:])
    result = verify_log(log, _key(tmp_path))
    assert result.first_bad_seq == 3 and "deleted" in result.reason and "seq 4" in result.reason


def test_an_inserted_entry_is_named(tmp_path):
    log = node_with_log(tmp_path, 5)
    ls = lines(log)
    forger = generate_signing_key(tmp_path / "other" / "k")
    fake = encode_entry(forger, seq=2, prev=line_hash(ls[1]), actor="node:a", event="plan_approved",
                        details={"plan_sha256": "ff" * 32}, time="2026-03-01T09:00:01.500000Z")
    write_lines(log, ls[:2] + [fake.rstrip(b"\n")] + ls[2:])
    result = verify_log(log, _key(tmp_path))
    assert result.first_bad_seq == 2 and "forged" in result.reason


def test_a_replayed_entry_is_named(tmp_path):
    log = node_with_log(tmp_path, 5)
    ls = lines(log)
    write_lines(log, ls[:4] + [ls[3]] + ls[4:])
    result = verify_log(log, _key(tmp_path))
    assert result.first_bad_seq == 4 and "replayed" in result.reason and "seq 3 again" in result.reason


def test_reordered_entries_are_named(tmp_path):
    log = node_with_log(tmp_path, 5)
    ls = lines(log)
    ls[2], ls[3] = ls[3], ls[2]
    write_lines(log, ls)
    result = verify_log(log, _key(tmp_path))
    assert result.first_bad_seq == 2 and "reordered" in result.reason


def test_a_truncated_tail_is_caught_against_an_anchor_and_named(tmp_path):
    log = node_with_log(tmp_path, 6)
    head = verify_log(log, _key(tmp_path)).head
    write_lines(log, lines(log)[:4])
    # Without an anchor a clean prefix is indistinguishable from a shorter honest log.
    assert verify_log(log, _key(tmp_path)).ok
    result = verify_log(log, _key(tmp_path), expected_head=head)
    assert not result.ok and result.first_bad_seq == 4 and "truncated" in result.reason
    assert "seq 5" in result.reason


def test_an_anchor_whose_hash_differs_names_that_entry(tmp_path):
    log = node_with_log(tmp_path, 4)
    result = verify_log(log, _key(tmp_path), expected_head=Head(seq=2, hash="ab" * 32))
    assert result.first_bad_seq == 2 and "rewritten" in result.reason


def test_a_torn_last_line_is_reported_and_everything_before_it_verifies(tmp_path):
    log = node_with_log(tmp_path, 4)
    whole = lines(log)
    with log.open("ab") as fh:
        fh.write(whole[-1][:100])  # a crash mid-append
    result = verify_log(log, _key(tmp_path))
    assert not result.ok and result.n_entries == 4 and result.first_bad_seq == 4 and "torn" in result.reason
    with pytest.raises(AuditError, match=r"audit.jsonl: entry seq 4 \(line 5\) is torn"):
        AuditLog(log, load_signer(state_paths(tmp_path).key), actor="node:a").append("test_event", {})
    assert lines(log) == whole  # the torn bytes are kept, not dropped, and nothing was appended


def test_a_forged_entry_is_named_by_its_signature(tmp_path):
    log = node_with_log(tmp_path, 4)
    forger = generate_signing_key(tmp_path / "other" / "k")
    with pytest.raises(AuditError, match="not signed by this state's key"):
        AuditLog(log, forger, actor="node:a").append("test_event", {})
    fake = encode_entry(forger, seq=4, prev=line_hash(lines(log)[-1]), actor="node:a", event="plan_approved",
                        details={"plan_sha256": "ff" * 32}, time="2026-03-01T10:00:00.000000Z")
    with log.open("ab") as fh:
        fh.write(fake)
    result = verify_log(log, _key(tmp_path))
    assert result.first_bad_seq == 4 and result.n_entries == 4 and "forged" in result.reason


def test_a_log_re_signed_with_another_key_fails_at_its_first_entry(tmp_path):
    log = node_with_log(tmp_path, 8)
    entries = [AuditEntry.model_validate_json(ln) for ln in lines(log)]
    write_lines(log, resign(entries, generate_signing_key(tmp_path / "other" / "k")))
    result = verify_log(log, _key(tmp_path))
    assert result.first_bad_seq == 0 and "another key" in result.reason and result.n_entries == 0


def test_a_changed_signature_on_an_older_entry_is_named(tmp_path):
    log = node_with_log(tmp_path, 5)
    ls = lines(log)
    ls[1] = ls[1][:-10] + (b"0" if ls[1][-10:-9] != b"0" else b"1") + ls[1][-9:]
    write_lines(log, ls)
    result = verify_log(log, _key(tmp_path))
    assert result.first_bad_seq == 1 and "signature" in result.reason


def test_details_that_look_like_patient_identifiers_are_refused(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl", generate_signing_key(tmp_path / "k"), actor="node:a")
    with pytest.raises(AuditError, match="patient identifier"):
        log.append("test_event", {"counts": {"patient_id": "p7"}})
    with pytest.raises(AuditError, match="finite JSON"):
        log.append("test_event", {"epsilon_spent": float("nan")})
    assert not log.path.exists()


# --------------------------------------------------------------------------------------------- property

_details = st.dictionaries(st.from_regex(r"[a-z][a-z_]{0,10}", fullmatch=True),
                           st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False),
                                     st.text(max_size=12), st.booleans(), st.none()), max_size=4)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events=st.lists(st.tuples(st.sampled_from(["test_joined", "test_sent", "test_changed"]), _details),
                       min_size=1, max_size=4))
def test_verify_accepts_every_untampered_log(tmp_path_factory, events):
    d = tmp_path_factory.mktemp("log")
    signer = generate_signing_key(d / "keys" / "k")
    log = AuditLog(d / "audit.jsonl", signer, actor="node:a")
    for event, details in events:
        log.append(event, details, at=T0)
    assert verify_log(log.path, signer.public_key).ok


_SMALL = {}


def _small_log() -> tuple[bytes, object]:
    if not _SMALL:
        d = Path(tempfile.mkdtemp(prefix="twinfed-audit-"))
        node_with_log(d / "n", 3)
        _SMALL["data"] = state_paths(d / "n").audit.read_bytes()
        _SMALL["key"] = load_public_key(state_paths(d / "n").public_key)
    return _SMALL["data"], _SMALL["key"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.floats(0, 1, exclude_max=True), new=st.integers(0, 255))
def test_verify_rejects_any_single_byte_change(tmp_path_factory, where, new):
    data, key = _small_log()
    i = int(where * len(data))
    if data[i] == new:
        new = (new + 1) % 256
    path = tmp_path_factory.mktemp("t") / "audit.jsonl"
    path.write_bytes(data[:i] + bytes([new]) + data[i + 1:])
    assert not verify_log(path, key).ok


# --------------------------------------------------------------------------------------------- crashes

_CHILD = textwrap.dedent("""
    import os, sys, time
    import twinfed.governance.audit_log as audit_log
    from twinfed.governance.audit_log import AuditLog
    from twinfed.governance.keys import load_signer

    log = AuditLog(sys.argv[1], load_signer(sys.argv[2]), actor="node:a")
    stall_after = int(sys.argv[3])
    real_write = os.write

    def stalling_write(fd, data):
        # The file system's failure, faked: half the line reaches the file, then the process
        # hangs inside the append until it is killed.
        n = real_write(fd, bytes(data[: len(data) // 2]))
        print("stalled", flush=True)
        time.sleep(60)
        return n

    for i in range(10**9):
        if i == stall_after:
            audit_log.os.write = stalling_write
        e = log.append("test_event", {"round": i, "epsilon_spent": i * 0.01})
        print(e.seq, flush=True)
""")


def _run_child(tmp_path: Path, stall_after: int):
    node_with_log(tmp_path / "n", 1)
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    paths = state_paths(tmp_path / "n")
    return subprocess.Popen([sys.executable, str(script), str(paths.audit), str(paths.key), str(stall_after)],
                            stdout=subprocess.PIPE, text=True), paths


def test_a_process_killed_while_appending_loses_no_acknowledged_entry(tmp_path):
    proc, paths = _run_child(tmp_path, stall_after=-1)
    acked = [int(proc.stdout.readline()) for _ in range(25)]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    result = verify_log(paths.audit, load_public_key(paths.public_key))
    assert result.n_entries >= acked[-1] + 1  # every append that returned survived
    assert result.ok or (result.first_bad_seq == result.n_entries and "torn" in result.reason)


def test_a_process_killed_mid_write_leaves_a_torn_entry_that_is_reported(tmp_path):
    proc, paths = _run_child(tmp_path, stall_after=5)
    out = [proc.stdout.readline().strip() for _ in range(6)]
    assert out[-1] == "stalled"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    result = verify_log(paths.audit, load_public_key(paths.public_key))
    # seq 0 is node_initialised; the child's entries are seq 1..5; seq 6 was being written.
    assert (result.ok, result.n_entries, result.first_bad_seq) == (False, 6, 6)
    assert "torn" in result.reason
    with pytest.raises(AuditError, match=r"entry seq 6 \(line 7\) is torn"):
        AuditLog(paths.audit, load_signer(paths.key), actor="node:a").append("test_event", {})


# ----------------------------------------------------------------------------------------- the file itself


def test_a_new_log_is_private_0600(tmp_path):
    log = node_with_log(tmp_path, 1)
    assert stat.S_IMODE(os.stat(log).st_mode) == 0o600


@pytest.mark.parametrize("kind", ["link to /dev/null", "named pipe", "link to a copy"])
def test_a_log_that_is_not_a_regular_file_is_refused_by_append_head_and_read_without_hanging(tmp_path, kind):
    log = node_with_log(tmp_path, 2)
    original = log.read_bytes()
    copy = tmp_path.parent / f"{tmp_path.name}-copy.jsonl"
    copy.write_bytes(original)
    log.unlink()
    if kind == "named pipe":
        os.mkfifo(log)
    else:
        log.symlink_to("/dev/null" if kind == "link to /dev/null" else copy)
    audit = AuditLog(log, load_signer(state_paths(tmp_path).key), actor="node:a")
    what = {"link to /dev/null": r"a symbolic link \(to /dev/null\)", "named pipe": "a named pipe",
            "link to a copy": r"a symbolic link \(to .*-copy.jsonl\)"}[kind]
    for call in (lambda: audit.append("test_event", {}), audit.head, lambda: read_entries(log)):
        with pytest.raises(AuditError, match=f"audit.jsonl: is {what}, not a regular file"):
            call()
    assert copy.read_bytes() == original  # nothing was appended through the link


def test_an_append_the_disk_cuts_short_is_cut_back_off_and_the_log_still_verifies(tmp_path, monkeypatch):
    log = node_with_log(tmp_path, 3)
    before = log.read_bytes()
    disk_full(monkeypatch, tmp_path, room=50)  # part of the line reaches the file, then ENOSPC
    audit = AuditLog(log, load_signer(state_paths(tmp_path).key), actor="node:a")
    with pytest.raises(AuditError, match=r"cannot write .*audit.jsonl: no space left on the device"):
        audit.append("test_event", {"round": 9})
    assert log.read_bytes() == before
    monkeypatch.undo()  # space again
    assert audit.append("test_event", {"round": 9}).seq == 3
    assert verify_log(log, _key(tmp_path)).ok
