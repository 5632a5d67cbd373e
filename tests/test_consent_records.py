"""Consent: the latest record per patient and purpose wins; in doubt, the patient is left out."""

import pytest

from twinfed.errors import ConsentError
from twinfed.governance.consent import current_status, granted, read_consent_csv, site_consent

HEADER = "patient_id,status,purpose,recorded_at\n"


def _records(tmp_path, body: str):
    path = tmp_path / "consent.csv"
    path.write_text(HEADER + body)
    return read_consent_csv(path)


def test_the_latest_record_per_patient_and_purpose_wins(tmp_path):
    recs = _records(tmp_path, "a,granted,study,2026-01-01T00:00:00Z\n"
                              "a,withdrawn,study,2026-02-01T00:00:00Z\n"
                              "b,withdrawn,study,2026-01-01T00:00:00Z\n"
                              "b,granted,study,2026-03-01T10:00:00+01:00\n")
    assert granted(recs, "study") == {"b"}


def test_records_out_of_file_order_still_resolve_by_time(tmp_path):
    recs = _records(tmp_path, "a,withdrawn,study,2026-02-01T00:00:00Z\n"
                              "a,granted,study,2026-01-01T00:00:00Z\n")
    assert granted(recs, "study") == set()


def test_a_tie_at_the_same_instant_counts_as_withdrawn(tmp_path):
    recs = _records(tmp_path, "a,granted,study,2026-01-01T00:00:00Z\n"
                              "a,withdrawn,study,2026-01-01T01:00:00+01:00\n")
    assert current_status(recs, "study") == {"a": "withdrawn"}


def test_consent_for_another_purpose_does_not_count(tmp_path):
    recs = _records(tmp_path, "a,granted,billing,2026-01-01T00:00:00Z\n")
    assert granted(recs, "study") == set()


def test_a_site_without_consent_file_has_nobody(tmp_path):
    assert site_consent(tmp_path) == []


@pytest.mark.parametrize("body, expected", [
    ("a,maybe,study,2026-01-01T00:00:00Z\n", "row 1, column status: 'maybe' is not one of granted, withdrawn"),
    ("a,granted,study,yesterday\n", "row 1, column recorded_at: 'yesterday' is not an ISO-8601 time"),
    ("a,granted,study\n", "row 1: 3 fields where the header has 4"),
    (",granted,study,2026-01-01T00:00:00Z\n", "row 1, column patient_id: empty patient id"),
])
def test_malformed_records_are_named_by_row_and_column(tmp_path, body, expected):
    with pytest.raises(ConsentError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        _records(tmp_path, body)


def test_a_wrong_header_is_named(tmp_path):
    path = tmp_path / "consent.csv"
    path.write_text("patient,status,purpose,recorded_at\n")
    with pytest.raises(ConsentError, match="missing column patient_id"):
        read_consent_csv(path)
