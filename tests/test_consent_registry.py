"""The node's consent registry: merged imports, withdrawal from the next round, counts-only audit.

Times are injected (``now=``, ``at=``): the node's clock reads ``NOW`` unless a test says otherwise.
"""

import json
import os
import stat
from datetime import timedelta

import pytest

from audit_builders import T0
from twinfed.errors import ConsentError
from twinfed.governance.consent import CLOCK_SKEW, read_consent_csv
from twinfed.governance.consent_registry import (consent_counts, grant, granted_patients, import_consent,
                                                 patient_status, registry_records, withdraw)
from twinfed.governance.layout import state_paths
from twinfed.governance.node_state import init_node
from twinfed.governance.verify import verify_path

HEADER = "patient_id,status,purpose,recorded_at\n"
PURPOSE = "twin-training"
NOW = T0 + timedelta(days=1)


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


def _events(state):
    return [json.loads(line) for line in state_paths(state).audit.read_text().splitlines()]


def test_an_import_dated_in_the_future_is_refused_naming_file_row_and_column(tmp_path):
    state = _node(tmp_path, "pat-001,granted,twin-training,2026-01-01T00:00:00Z\n")
    before = state_paths(state).consent.read_bytes(), state_paths(state).audit.read_bytes()
    late = tmp_path / "late.csv"
    late.write_text(HEADER + "pat-002,granted,twin-training,2026-01-01T00:00:00Z\n"
                             "pat-003,granted,twin-training,2099-01-01T00:00:00Z\n")
    with pytest.raises(ConsentError) as exc:
        import_consent(state, late, now=NOW)
    assert str(exc.value) == ("late.csv row 2, column recorded_at: dated after 2026-03-02T09:05:00Z, more "
                              "than 5 minutes ahead of this node's clock; a record is not in effect before "
                              "its time; fix the export's times (or this node's clock)")
    assert (state_paths(state).consent.read_bytes(), state_paths(state).audit.read_bytes()) == before


def test_an_import_within_the_clock_skew_is_accepted(tmp_path):
    state = _node(tmp_path, "pat-001,granted,twin-training,2026-01-01T00:00:00Z\n")
    soon = tmp_path / "soon.csv"
    soon.write_text(HEADER + f"pat-002,granted,twin-training,{(NOW + CLOCK_SKEW).isoformat()}\n")
    assert import_consent(state, soon, now=NOW).records_added == 1
    assert granted_patients(state, PURPOSE, now=NOW) == {"pat-001", "pat-002"}


@pytest.mark.parametrize("record", [grant, withdraw])
def test_a_grant_or_withdrawal_dated_after_the_clock_skew_is_refused(tmp_path, record):
    state = _node(tmp_path, "pat-001,granted,twin-training,2026-01-01T00:00:00Z\n")
    with pytest.raises(ConsentError, match="dated after 2026-03-02T09:05:00Z, more than 5 minutes ahead "
                                           "of this node's clock"):
        record(state, "pat-001", PURPOSE, at=NOW + CLOCK_SKEW + timedelta(seconds=1), now=NOW)
    assert len(registry_records(state)) == 1
    record(state, "pat-001", PURPOSE, at=NOW + CLOCK_SKEW, now=NOW)
    assert len(registry_records(state)) == 2


def test_a_withdrawal_wins_over_a_2099_record_left_in_an_old_registry(tmp_path):
    state = _node(tmp_path, "pat-001,granted,twin-training,2026-01-01T00:00:00Z\n")
    registry = state_paths(state).consent
    registry.write_text(registry.read_text() + "pat-001,granted,twin-training,2099-01-01T00:00:00.000000Z\n")
    assert granted_patients(state, PURPOSE, now=NOW) == {"pat-001"}
    withdraw(state, "pat-001", PURPOSE, actor="officer:o", now=NOW)
    assert granted_patients(state, PURPOSE, now=NOW) == set()
    assert patient_status(state, "pat-001", now=NOW) == {PURPOSE: "withdrawn"}


def test_a_withdrawal_outranked_by_a_later_record_is_an_error_never_a_success(tmp_path):
    state = _node(tmp_path, "pat-001,granted,twin-training,2026-01-01T00:00:00Z\n")
    soon = tmp_path / "soon.csv"
    soon.write_text(HEADER + f"pat-001,granted,twin-training,{(NOW + timedelta(minutes=2)).isoformat()}\n")
    import_consent(state, soon, now=NOW)
    with pytest.raises(ConsentError) as exc:
        withdraw(state, "pat-001", PURPOSE, actor="officer:o", now=NOW)
    assert str(exc.value) == ("the withdrawal for 'twin-training' was recorded, but the patient's status "
                              "stays granted: a record dated 2026-03-02T09:02:00Z outranks it; record the "
                              "withdrawal again after that time")
    assert granted_patients(state, PURPOSE, now=NOW) == {"pat-001"}
    assert _events(state)[-1]["details"]["purposes"] == {PURPOSE: {"granted": 1, "withdrawn": 0}}
    withdraw(state, "pat-001", PURPOSE, actor="officer:o", now=NOW + timedelta(minutes=3))
    assert granted_patients(state, PURPOSE, now=NOW + timedelta(minutes=3)) == set()


@pytest.mark.parametrize("patient, purpose", [("pat-999", PURPOSE), ("pat-001", "twin-trainng")])
def test_withdrawing_an_unknown_patient_or_a_mistyped_purpose_is_an_error(tmp_path, patient, purpose):
    state = _node(tmp_path, "pat-001,granted,twin-training,2026-01-01T00:00:00Z\n")
    before = state_paths(state).consent.read_bytes(), state_paths(state).audit.read_bytes()
    with pytest.raises(ConsentError) as exc:
        withdraw(state, patient, purpose, actor="officer:o")
    assert str(exc.value) == (f"no consent record for this patient and purpose {purpose!r}; check the id and "
                              "the purpose ('twinfed consent status' lists the purposes)")
    assert (state_paths(state).consent.read_bytes(), state_paths(state).audit.read_bytes()) == before


def test_granting_a_new_patient_is_allowed(tmp_path):
    state = _node(tmp_path, "pat-001,granted,twin-training,2026-01-01T00:00:00Z\n")
    assert grant(state, "pat-new", PURPOSE, actor="officer:o") == {"granted": 2, "withdrawn": 0}


@pytest.mark.parametrize("patient", ["p,1", 'p"1', "p\n1", "p\r1", "p\r\n1", " p1 ", "p\x001", ",\"\n"])
def test_an_id_with_a_comma_a_quote_or_a_line_break_can_be_granted_and_withdrawn(tmp_path, patient):
    init_node(tmp_path / "state", site_name="a", at=T0)
    state = tmp_path / "state"
    grant(state, patient, PURPOSE, actor="officer:o")
    grant(state, "p1", PURPOSE, actor="officer:o")
    assert granted_patients(state, PURPOSE) == {patient, "p1"}
    withdraw(state, patient, PURPOSE, actor="officer:o")
    assert granted_patients(state, PURPOSE) == {"p1"}
    assert patient_status(state, patient) == {PURPOSE: "withdrawn"}
    assert verify_path(state).ok


def test_an_imported_id_keeps_its_spaces_and_can_be_withdrawn(tmp_path):
    state = _node(tmp_path, '" pat-001","granted","twin-training","2026-01-01T00:00:00Z"\n')
    assert granted_patients(state, PURPOSE) == {" pat-001"}
    withdraw(state, " pat-001", PURPOSE, actor="officer:o")
    assert granted_patients(state, PURPOSE) == set()


@pytest.mark.parametrize("patient", ["", "   ", "\udcff-surrogate"])
def test_an_empty_or_unencodable_id_is_refused_without_echoing_it(tmp_path, patient):
    state = _node(tmp_path, "pat-001,granted,twin-training,2026-01-01T00:00:00Z\n")
    with pytest.raises(ConsentError, match="patient id") as exc:
        grant(state, patient, PURPOSE, actor="officer:o")
    assert "surrogate" not in str(exc.value)
    assert len(registry_records(state)) == 1


@pytest.mark.parametrize("when, ok", [
    ("1970-01-01T00:00:00Z", True), ("1969-12-31T23:59:59.999999Z", False),
    ("2199-12-31T23:59:59Z", True), ("2199-12-31T23:30:00-01:00", False),
    ("9999-12-31T23:00:00-05:00", False), ("0001-01-01T00:30:00+01:00", False)])
def test_consent_times_must_fall_between_1970_and_2200_utc(tmp_path, when, ok):
    path = tmp_path / "consent.csv"
    path.write_text(HEADER + f"pat-001,granted,twin-training,{when}\n")
    if ok:
        assert len(read_consent_csv(path)) == 1
    else:
        with pytest.raises(ConsentError, match=r"^consent.csv row 1, column recorded_at: not between "
                                               r"1970-01-01 and 2200-01-01 \(UTC\); fix the export's times$"):
            read_consent_csv(path)


def test_an_import_with_a_time_out_of_range_changes_nothing(tmp_path):
    state = _node(tmp_path, "pat-001,granted,twin-training,2026-01-01T00:00:00Z\n")
    before = state_paths(state).audit.read_bytes(), state_paths(state).consent.read_bytes()
    bad = tmp_path / "bad.csv"
    bad.write_text(HEADER + "pat-002,granted,twin-training,0001-01-01T00:30:00+01:00\n")
    with pytest.raises(ConsentError, match="bad.csv row 1, column recorded_at: not between"):
        import_consent(state, bad, now=NOW)
    assert (state_paths(state).audit.read_bytes(), state_paths(state).consent.read_bytes()) == before
