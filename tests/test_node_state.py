"""Node and coordinator state: init pins the key in the first audit entry and never replaces anything."""

import json
import stat

import pytest

from audit_builders import T0
from builders import write_site
from twinfed.atomic import WriteError, write_json_atomic
from twinfed.errors import NodeStateError
from twinfed.governance.audit_log import verify_log
from twinfed.governance.consent_registry import consent_counts
from twinfed.governance.keys import load_public_key
from twinfed.governance.layout import open_audit, read_info, state_paths
from twinfed.governance.node_state import init_coordinator, init_node


def test_init_node_pins_its_key_in_the_first_entry_and_imports_consent(tmp_path):
    site = write_site(tmp_path / "site-a", n_patients=5, n_steps=30)
    info = init_node(tmp_path / "state", site_data=site, at=T0)
    p = state_paths(tmp_path / "state")
    assert info.kind == "node" and info.name == "site-a"
    entries = [json.loads(line) for line in p.audit.read_text().splitlines()]
    assert [e["event"] for e in entries] == ["node_initialised", "consent_imported"]
    assert entries[0]["details"]["key_fingerprint"] == info.key_fingerprint
    assert entries[0]["actor"] == "node:site-a" and entries[0]["time"] == "2026-03-01T09:00:00.000000Z"
    assert consent_counts(tmp_path / "state") == {"twin-training": {"granted": 5, "withdrawn": 0}}
    assert verify_log(p.audit, load_public_key(p.public_key)).ok


def test_a_second_init_is_an_error_and_changes_nothing(tmp_path):
    init_node(tmp_path / "s", site_name="a")
    before = state_paths(tmp_path / "s").audit.read_bytes()
    with pytest.raises(NodeStateError, match="already initialised as node 'a'.*nothing was changed"):
        init_node(tmp_path / "s", site_name="a")
    assert state_paths(tmp_path / "s").audit.read_bytes() == before


def test_init_with_exist_ok_is_a_no_op_for_the_same_node_only(tmp_path):
    first = init_node(tmp_path / "s", site_name="a")
    assert init_node(tmp_path / "s", site_name="a", exist_ok=True) == first
    with pytest.raises(NodeStateError, match="not node 'b'"):
        init_node(tmp_path / "s", site_name="b", exist_ok=True)


def test_a_half_initialised_directory_is_an_error_that_says_what_to_do(tmp_path):
    init_node(tmp_path / "s", site_name="a")
    state_paths(tmp_path / "s").info.unlink()  # as if init crashed before its last step
    with pytest.raises(NodeStateError, match="half initialised.*move the directory aside"):
        init_node(tmp_path / "s", site_name="a")


def test_the_coordinator_state_has_the_same_key_and_audit_layout(tmp_path):
    info = init_coordinator(tmp_path / "c", at=T0)
    assert read_info(tmp_path / "c") == info and info.kind == "coordinator"
    e = open_audit(tmp_path / "c").append("test_event", {"round": 1}, at=T0)
    assert e.seq == 1 and e.actor == "coordinator"


def test_an_uninitialised_directory_is_a_clear_error(tmp_path):
    with pytest.raises(NodeStateError, match="not an initialised node state.*twinfed node init"):
        open_audit(tmp_path)


@pytest.mark.parametrize("existed", [False, True], ids=["new-directory", "empty-directory"])
def test_a_failed_init_removes_what_it_created(tmp_path, monkeypatch, existed):
    site = write_site(tmp_path / "site-a", n_patients=3, n_steps=30)
    state = tmp_path / "state"
    if existed:
        state.mkdir()

    def full(*_a, **_k):
        raise WriteError("cannot write consent/records.csv: no space left on the device")

    monkeypatch.setattr("twinfed.governance.consent_registry.import_consent", full)
    with pytest.raises(WriteError):
        init_node(state, site_data=site, at=T0)
    assert (list(state.iterdir()) == []) if existed else not state.exists()
    monkeypatch.undo()
    assert init_node(state, site_data=site, at=T0).name == "site-a"  # and it can be done again


def test_a_coordinator_state_is_private_too(tmp_path):
    init_coordinator(tmp_path / "run" / "coordinator", at=T0)
    root = tmp_path / "run" / "coordinator"
    modes = {p.relative_to(root).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}
    assert modes == {".": 0o700, "keys": 0o700, "keys/audit_ed25519": 0o600, "keys/audit_ed25519.pub": 0o644,
                     "audit.jsonl": 0o600, "state.json": 0o600}


def test_state_files_written_atomically_are_0600_in_0700_directories_by_default(tmp_path):
    write_json_atomic(tmp_path / "state" / "studies" / "x.json", {"a": 1})
    assert stat.S_IMODE((tmp_path / "state" / "studies").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "state" / "studies" / "x.json").stat().st_mode) == 0o600
