"""Consent records: who may be used for which purpose.

The rule (DESIGN.md section 3): the latest record per patient and purpose wins; a patient with no
granted record for the study's purpose is never used. Records made at the same instant resolve to
``withdrawn``: when in doubt, leave the patient out. This module needs no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import csv

from twinfed.errors import ConsentError

CONSENT_COLUMNS = ("patient_id", "status", "purpose", "recorded_at")
STATUSES = ("granted", "withdrawn")


@dataclass(frozen=True)
class ConsentRecord:
    patient_id: str
    status: str
    purpose: str
    recorded_at: datetime


def parse_time(text: str) -> datetime:
    """An ISO-8601 time; one without a zone is taken as UTC."""
    t = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def read_consent_csv(path: str | Path) -> list[ConsentRecord]:
    """Every record of a ``consent.csv``, validated; errors name the row and column."""
    path = Path(path)
    name = path.name
    try:
        with path.open(newline="", encoding="utf-8") as fh:
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
                pid, status, purpose, when = (v.strip() for v in row)
                if not pid:
                    raise ConsentError(f"{name} row {row_no}, column patient_id: empty patient id")
                if status not in STATUSES:
                    raise ConsentError(f"{name} row {row_no}, column status: {status!r} is not one "
                                       f"of {', '.join(STATUSES)}")
                if not purpose:
                    raise ConsentError(f"{name} row {row_no}, column purpose: empty purpose")
                try:
                    recorded = parse_time(when)
                except ValueError:
                    raise ConsentError(f"{name} row {row_no}, column recorded_at: {when!r} is not an "
                                       "ISO-8601 time (e.g. 2026-01-31T09:30:00Z)") from None
                records.append(ConsentRecord(pid, status, purpose, recorded))
    except UnicodeDecodeError:
        raise ConsentError(f"{name}: not UTF-8 text; export it as UTF-8 CSV") from None
    except csv.Error as exc:
        raise ConsentError(f"{name}: malformed CSV ({exc})") from None
    return records


def current_status(records: list[ConsentRecord], purpose: str) -> dict[str, str]:
    """Each patient's status for ``purpose``: the latest record wins, a tie is ``withdrawn``."""
    latest: dict[str, tuple[datetime, int, str]] = {}
    for rec in records:
        if rec.purpose != purpose:
            continue
        key = (rec.recorded_at, 1 if rec.status == "withdrawn" else 0, rec.status)
        if rec.patient_id not in latest or key > latest[rec.patient_id]:
            latest[rec.patient_id] = key
    return {pid: v[2] for pid, v in latest.items()}


def granted(records: list[ConsentRecord], purpose: str) -> set[str]:
    """The patients whose current status for ``purpose`` is ``granted``."""
    return {pid for pid, s in current_status(records, purpose).items() if s == "granted"}


def site_consent(site_dir: str | Path) -> list[ConsentRecord]:
    """A site's consent records; a site without ``consent.csv`` has none (nobody is used)."""
    path = Path(site_dir) / "consent.csv"
    return read_consent_csv(path) if path.is_file() else []
