"""Consent records: who may be used for which purpose.

The rule (DESIGN.md section 3): the latest record per patient and purpose wins; a patient with no
granted record for the study's purpose is never used. Records made at the same instant resolve to
``withdrawn``: when in doubt, leave the patient out. A record is not in effect before its time:
one dated more than :data:`CLOCK_SKEW` after now is ignored, so a mistyped year (2099) can never
outrank the withdrawals made meanwhile. This module needs no torch.

Patient ids are kept exactly as the site exported them (any non-empty string: CSV quoting carries
commas, quotes and line breaks), as the data contract keeps them. Error messages name the file,
row and column, and never echo an id or a data cell's value: a shifted row puts an id in any column.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from twinfed.errors import ConsentError

CONSENT_COLUMNS = ("patient_id", "status", "purpose", "recorded_at")
STATUSES = ("granted", "withdrawn")
# How far ahead of this node's clock a record may be dated and still count: clocks of the
# machines that export consent drift by seconds, never by minutes.
CLOCK_SKEW = timedelta(minutes=5)


@dataclass(frozen=True)
class ConsentRecord:
    patient_id: str
    status: str
    purpose: str
    recorded_at: datetime


# The times a consent record may carry. Outside them a time is a typo or a broken export, and at
# the far ends (year 1 at +01:00, 9999 at -05:00) it cannot even be converted to UTC.
EARLIEST = datetime(1970, 1, 1, tzinfo=timezone.utc)
LATEST = datetime(2200, 1, 1, tzinfo=timezone.utc)


class TimeOutOfRange(ValueError):
    """An ISO-8601 time outside :data:`EARLIEST` .. :data:`LATEST` (UTC)."""


def parse_time(text: str) -> datetime:
    """An ISO-8601 time; one without a zone is taken as UTC. :class:`ValueError` if it is not
    one, :class:`TimeOutOfRange` (a ValueError) if it is before 1970 or from 2200 on in UTC."""
    t = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    t = t if t.tzinfo else t.replace(tzinfo=timezone.utc)
    try:
        in_range = EARLIEST <= t.astimezone(timezone.utc) < LATEST
    except OverflowError:  # beyond year 1 or 9999 once converted
        in_range = False
    if not in_range:
        raise TimeOutOfRange(f"not between {EARLIEST:%Y-%m-%d} and {LATEST:%Y-%m-%d} (UTC)")
    return t


def read_consent_csv(path: str | Path, *, not_after: datetime | None = None) -> list[ConsentRecord]:
    """Every record of a ``consent.csv``, validated; errors name the row and column.

    With ``not_after``, a record dated later than it is an error (an import refuses records from
    the future: see :func:`future_limit`).
    """
    path = Path(path)
    name = path.name
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:  # a BOM, as in the other files
            reader = csv.reader(fh)
            header = [h.strip() for h in next(reader, [])]
            if tuple(header) != CONSENT_COLUMNS:
                missing = [c for c in CONSENT_COLUMNS if c not in header]
                unknown = [c for c in header if c not in CONSENT_COLUMNS]
                what = f"missing column {missing[0]}" if missing else (
                    f"unknown column {unknown[0]}" if unknown else "columns out of order")
                raise ConsentError(f"{name}: {what}; the header must be {','.join(CONSENT_COLUMNS)}")
            records = []
            for row_no, row in enumerate(reader, start=1):
                if not row:
                    continue
                if len(row) != len(CONSENT_COLUMNS):
                    raise ConsentError(f"{name} row {row_no}: {len(row)} fields where the header has "
                                       f"{len(CONSENT_COLUMNS)}; fix that row")
                where = f"{name} row {row_no}, column"
                pid = row[0]  # as exported: the data contract keeps ids as given
                status, purpose, when = (v.strip() for v in row[1:])
                if not pid.strip():
                    raise ConsentError(f"{where} patient_id: empty patient id")
                if status not in STATUSES:
                    raise ConsentError(f"{where} status: not one of {', '.join(STATUSES)}")
                if not purpose:
                    raise ConsentError(f"{where} purpose: empty purpose")
                try:
                    recorded = parse_time(when)
                except TimeOutOfRange as exc:
                    raise ConsentError(f"{where} recorded_at: {exc}; fix the export's times") from None
                except ValueError:
                    raise ConsentError(f"{where} recorded_at: not an ISO-8601 time "
                                       "(e.g. 2026-01-31T09:30:00Z)") from None
                if not_after is not None and recorded > not_after:
                    raise ConsentError(f"{where} recorded_at: {too_far_ahead(not_after)}; fix the "
                                       "export's times (or this node's clock)")
                records.append(ConsentRecord(pid, status, purpose, recorded))
    except UnicodeDecodeError:
        raise ConsentError(f"{name}: not UTF-8 text; export it as UTF-8 CSV") from None
    except csv.Error as exc:
        raise ConsentError(f"{name}: malformed CSV ({exc})") from None
    return records


def future_limit(now: datetime | None = None) -> datetime:
    """The latest time a record may carry and be in effect at ``now`` (default: this clock)."""
    now = now or datetime.now(timezone.utc)
    if now.tzinfo is None:
        raise ConsentError("consent times must be timezone-aware")
    return now.astimezone(timezone.utc) + CLOCK_SKEW


def too_far_ahead(limit: datetime) -> str:
    """Why a record dated after ``limit`` (a :func:`future_limit`) is refused, for a message."""
    return (f"dated after {format_utc(limit)}, more than {CLOCK_SKEW.total_seconds() / 60:g} minutes "
            "ahead of this node's clock; a record is not in effect before its time")


def format_utc(t: datetime) -> str:
    """A time for a message: UTC to the second, ``2026-01-31T09:30:00Z``."""
    return t.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def current_status(records: list[ConsentRecord], purpose: str, *,
                   now: datetime | None = None) -> dict[str, str]:
    """Each patient's status for ``purpose`` at ``now`` (default: this clock).

    The latest record in effect wins, a tie is ``withdrawn``; records dated after ``now`` plus
    :data:`CLOCK_SKEW` are not in effect yet and are ignored.
    """
    limit = future_limit(now)
    latest: dict[str, tuple[datetime, int, str]] = {}
    for rec in records:
        if rec.purpose != purpose or rec.recorded_at > limit:
            continue
        key = (rec.recorded_at, 1 if rec.status == "withdrawn" else 0, rec.status)
        if rec.patient_id not in latest or key > latest[rec.patient_id]:
            latest[rec.patient_id] = key
    return {pid: v[2] for pid, v in latest.items()}


def granted(records: list[ConsentRecord], purpose: str, *, now: datetime | None = None) -> set[str]:
    """The patients whose current status for ``purpose`` is ``granted``."""
    return {pid for pid, s in current_status(records, purpose, now=now).items() if s == "granted"}


def site_consent(site_dir: str | Path) -> list[ConsentRecord]:
    """A site's consent records; a site without ``consent.csv`` has none (nobody is used)."""
    path = Path(site_dir) / "consent.csv"
    return read_consent_csv(path) if path.is_file() else []
