"""The node's consent registry: merged imports, withdrawal from the next round, counts-only audit."""

import os
import stat

from audit_builders import T0
from twinfed.governance.consent_registry import (consent_counts, grant, granted_patients, import_consent,
                                                 patient_status, registry_records, withdraw)
from twinfed.governance.layout import state_paths
from twinfed.governance.node_state import init_node

HEADER = "patient_id,status,purpose,recorded_at\n"
PURPOSE = "twin-training"


def _node(tmp_path, body: str):
    site = tmp_path / "site"
    site.mkdir()
    (site / "consent.csv").write_text(HEADER + body)
    init_node(tmp_path / "state", site_data=site, at=T0)
    return tmp_path / "state"


def test_import_merges_and_deduplicates_records(tmp_path):
    state = _node(tmp_path, "pat-001,granted,twin-training,2026-01-01T00:00:00Z\n"
                            "pat-002,granted,twin-training,2026-01-01T00:00:00Z\n")
    more = tmp_path / "more.csv"
    more.write_text(HEADER + "pat-002,granted,twin-training,2026-01-01T00:00:00+00:00\n"
                             "pat-003,withdrawn,twin-training,2026-01-02T00:00:00Z\n")
    summary = import_consent(state, more)
    assert (summary.records_read, summary.records_added, summary.duplicates) == (2, 1, 1)
    assert len(registry_records(state)) == 3
    assert summary.counts == {PURPOSE: {"granted": 2, "withdrawn": 1}}


def test_withdrawal_removes_the_patient_from_the_granted_set(tmp_path):
    state = _node(tmp_path, "pat-001,granted,twin-training,2026-01-01T00:00:00Z\n"
                            "pat-002,granted,twin-training,2026-01-01T00:00:00Z\n")
    assert granted_patients(state, PURPOSE) == {"pat-001", "pat-002"}
    counts = withdraw(state, "pat-001", PURPOSE, actor="officer:o")
    assert counts == {"granted": 1, "withdrawn": 1}
    assert granted_patients(state, PURPOSE) == {"pat-002"}
    assert patient_status(state, "pat-001") == {PURPOSE: "withdrawn"}


def test_a_later_grant_restores_the_patient_and_another_purpose_is_separate(tmp_path):
    state = _node(tmp_path, "pat-001,withdrawn,twin-training,2026-01-01T00:00:00Z\n")
    grant(state, "pat-001", PURPOSE, actor="officer:o")
    grant(state, "pat-009", "other-study", actor="officer:o")
    assert granted_patients(state, PURPOSE) == {"pat-001"}
    assert consent_counts(state) == {PURPOSE: {"granted": 1, "withdrawn": 0},
                                     "other-study": {"granted": 1, "withdrawn": 0}}


def test_nobody_is_granted_before_any_import(tmp_path):
    init_node(tmp_path / "state", site_name="a")
    assert granted_patients(tmp_path / "state", PURPOSE) == set()
    assert consent_counts(tmp_path / "state") == {}


def test_consent_audit_events_carry_counts_and_never_identifiers(tmp_path):
    state = _node(tmp_path, "pat-001,granted,twin-training,2026-01-01T00:00:00Z\n")
    withdraw(state, "pat-001", PURPOSE, actor="officer:o")
    grant(state, "pat-777", PURPOSE, actor="officer:o")
    text = state_paths(state).audit.read_text()
    assert "pat-" not in text
    assert text.count('"event":"consent_changed"') == 2 and '"granted":1,"withdrawn":1' in text


def test_the_registry_file_is_private_because_it_holds_identifiers(tmp_path):
    state = _node(tmp_path, "pat-001,granted,twin-training,2026-01-01T00:00:00Z\n")
    assert stat.S_IMODE(os.stat(state_paths(state).consent).st_mode) == 0o600
