"""Consent: the latest record in effect per patient and purpose wins; in doubt, the patient is left out."""

from datetime import datetime, timedelta, timezone

import pytest

from twinfed.errors import ConsentError
from twinfed.governance.consent import (CLOCK_SKEW, current_status, granted, read_consent_csv,
                                        site_consent)

NOW = datetime(2026, 3, 1, 9, 0, tzinfo=timezone.utc)

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
    ("a,maybe,study,2026-01-01T00:00:00Z\n", "row 1, column status: not one of granted, withdrawn"),
    ("a,granted,study,yesterday\n", "row 1, column recorded_at: not an ISO-8601 time"),
    ("a,granted,study\n", "row 1: 3 fields where the header has 4"),
    (",granted,study,2026-01-01T00:00:00Z\n", "row 1, column patient_id: empty patient id"),
    ("  ,granted,study,2026-01-01T00:00:00Z\n", "row 1, column patient_id: empty patient id"),
])
def test_malformed_records_are_named_by_row_and_column(tmp_path, body, expected):
    with pytest.raises(ConsentError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        _records(tmp_path, body)


def test_a_wrong_header_is_named(tmp_path):
    path = tmp_path / "consent.csv"
    path.write_text("patient,status,purpose,recorded_at\n")
    with pytest.raises(ConsentError, match="missing column patient_id"):
        read_consent_csv(path)


@pytest.mark.parametrize("row", [
    "granted,site-a-pae-00001,study,2026-01-01T00:00:00Z\n",  # id and status swapped
    "site-a-pae-00001,2026-01-01T00:00:00Z,study,granted\n",  # time and status swapped
    "2026-01-01T00:00:00Z,granted,study,site-a-pae-00001\n",  # id and time swapped
])
def test_errors_on_shifted_columns_never_echo_the_id_or_the_cell(tmp_path, row):
    with pytest.raises(ConsentError, match="row 1, column (status|recorded_at): not") as exc:
        _records(tmp_path, row)
    assert "pae-00001" not in str(exc.value) and "2026-01-01" not in str(exc.value)


def test_ids_are_kept_exactly_as_exported_with_spaces_commas_quotes_and_line_breaks(tmp_path):
    path = tmp_path / "consent.csv"
    path.write_bytes(HEADER.encode() + b'" p,1 ""x""\r\nline\r2 ", granted , study ,2026-01-01T00:00:00Z\n')
    (rec,) = read_consent_csv(path)
    assert rec.patient_id == ' p,1 "x"\r\nline\r2 '
    assert (rec.status, rec.purpose) == ("granted", "study")


def test_a_record_dated_in_the_future_is_not_in_effect_before_its_time(tmp_path):
    recs = _records(tmp_path, "a,granted,study,2099-01-01T00:00:00Z\n"
                              "a,withdrawn,study,2026-02-01T00:00:00Z\n"
                              "b,granted,study,2099-01-01T00:00:00Z\n")
    assert current_status(recs, "study", now=NOW) == {"a": "withdrawn"}
    assert granted(recs, "study", now=NOW) == set()
    assert current_status(recs, "study", now=datetime(2099, 1, 1, tzinfo=timezone.utc)) == {
        "a": "granted", "b": "granted"}


def test_a_record_within_the_clock_skew_is_already_in_effect(tmp_path):
    ahead = (NOW + CLOCK_SKEW).isoformat()
    beyond = (NOW + CLOCK_SKEW + timedelta(microseconds=1)).isoformat()
    recs = _records(tmp_path, f"a,granted,study,{ahead}\nb,granted,study,{beyond}\n")
    assert granted(recs, "study", now=NOW) == {"a"}


def test_the_clock_skew_is_five_minutes():
    assert CLOCK_SKEW == timedelta(minutes=5)


def test_a_reader_can_refuse_records_dated_after_a_limit_naming_row_and_column(tmp_path):
    path = tmp_path / "consent.csv"
    path.write_text(HEADER + "a,granted,study,2026-01-01T00:00:00Z\n"
                             "secret-id,granted,study,2099-01-01T00:00:00Z\n")
    with pytest.raises(ConsentError, match="^consent.csv row 2, column recorded_at: dated after "
                                           "2026-03-01T09:00:00Z, more than 5 minutes ahead") as exc:
        read_consent_csv(path, not_after=NOW)
    assert "secret-id" not in str(exc.value)


def test_a_byte_order_mark_before_the_header_is_accepted(tmp_path):
    path = tmp_path / "consent.csv"
    path.write_bytes(b"\xef\xbb\xbf" + (HEADER + "a,granted,study,2026-01-01T00:00:00Z\n").encode())
    (rec,) = read_consent_csv(path)
    assert (rec.patient_id, rec.status) == ("a", "granted")
