"""A node's consent registry: the records training reads, kept in the node's own state.

Guarantees:
- records are only ever added (an import merges and de-duplicates; grant and withdraw add one
  record at the current time), so the registry is the full history; the rule of
  :mod:`governance.consent` decides (latest record in effect per patient and purpose wins, a tie
  is withdrawn). A withdrawal is effective for every round that starts after it returns;
- every change is one read-modify-write under the state's lock (:func:`twinfed.locking.state_lock`),
  its audit entry included, so changes made at once by several processes all land;
- no record dated more than :data:`governance.consent.CLOCK_SKEW` after now is accepted, and a
  grant or withdrawal returns only once the patient's status for that purpose *is* what it
  recorded: a withdrawal never reports success while the patient stays granted;
- withdrawing for a patient and purpose the registry has no record of is an error: a mistyped id
  or purpose never looks like success. Granting a new patient is allowed;
- ids are stored exactly as given (any non-empty text: CSV quoting carries commas, quotes and line
  breaks); no message echoes one;
- the file (``consent/records.csv``, the same columns as a site's ``consent.csv``) is replaced
  atomically and durably on every change and is mode 0600: it holds patient identifiers;
- every change appends an audit event with counts per purpose and never an identifier.
"""

from __future__ import annotations

import csv
import hashlib
import io
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from twinfed.atomic import write_bytes_atomic
from twinfed.errors import ConsentError
from twinfed.events import ConsentChanged, ConsentImported
from twinfed.governance.consent import (CONSENT_COLUMNS, STATUSES, ConsentRecord, current_status,
                                        format_utc, future_limit, granted, read_consent_csv,
                                        too_far_ahead)
from twinfed.governance.layout import open_audit, read_info, state_paths
from twinfed.locking import state_lock


class ImportSummary(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    records_read: int
    records_added: int
    duplicates: int
    counts: dict[str, dict[str, int]]  # purpose -> {"granted": n, "withdrawn": n}


def registry_records(state_dir: str | Path) -> list[ConsentRecord]:
    """Every record in the registry; none before the first import (nobody is used)."""
    path = state_paths(state_dir).consent
    return read_consent_csv(path) if path.is_file() else []


def granted_patients(state_dir: str | Path, purpose: str, *, now: datetime | None = None) -> set[str]:
    """The patients training may use for ``purpose`` now: latest record in effect granted, ties withdrawn."""
    return granted(registry_records(state_dir), purpose, now=now)


def consent_counts(state_dir: str | Path, purpose: str | None = None, *,
                   now: datetime | None = None) -> dict[str, dict[str, int]]:
    """Patients per current status for each purpose (or just ``purpose``): counts only."""
    return _counts(registry_records(state_dir), purpose, now=now)


def patient_status(state_dir: str | Path, patient_id: str, purpose: str | None = None, *,
                   now: datetime | None = None) -> dict[str, str]:
    """One patient's current status per purpose (only what the officer asked for)."""
    records = [r for r in registry_records(state_dir) if r.patient_id == patient_id]
    purposes = sorted({r.purpose for r in records} if purpose is None else {purpose})
    out = {}
    for p in purposes:
        status = current_status(records, p, now=now).get(patient_id)
        if status is not None:
            out[p] = status
    return out


def import_consent(state_dir: str | Path, source: str | Path, *, actor: str | None = None,
                   at: datetime | None = None, now: datetime | None = None) -> ImportSummary:
    """Merge a site's ``consent.csv`` (or a site directory holding one) into the registry.

    ``now`` is this node's clock (default: the system's); a record dated more than ``CLOCK_SKEW``
    after it refuses the whole import. ``at`` stamps the audit entry (default ``now``).
    """
    source = Path(source)
    csv_path = source / "consent.csv" if source.is_dir() else source
    if not csv_path.is_file():
        raise ConsentError(f"{csv_path}: no consent file to import; export consent.csv from the site")
    read_info(state_dir)  # fail on an uninitialised state before reading patient data
    incoming = read_consent_csv(csv_path, not_after=future_limit(now))
    with state_lock(state_dir):
        existing = registry_records(state_dir)
        seen = {_key(r) for r in existing}
        added = []
        for rec in incoming:
            if _key(rec) not in seen:
                seen.add(_key(rec))
                added.append(rec)
        records = existing + added
        summary = ImportSummary(records_read=len(incoming), records_added=len(added),
                                duplicates=len(incoming) - len(added),
                                counts=_counts(records, None, now=now))
        # Audit before the registry changes: a crash in between leaves an audited change that did
        # not happen, never a patient made usable without a trace.
        open_audit(state_dir, actor=actor).append(ConsentImported(
            source_sha256=hashlib.sha256(csv_path.read_bytes()).hexdigest(),
            records_read=summary.records_read, records_added=summary.records_added,
            duplicates=summary.duplicates, purposes=summary.counts), at=at or now)
        if added:
            _write(state_dir, records)
    return summary


def grant(state_dir: str | Path, patient_id: str, purpose: str, **kw) -> dict[str, int]:
    return record_consent(state_dir, patient_id, purpose, "granted", **kw)


def withdraw(state_dir: str | Path, patient_id: str, purpose: str, **kw) -> dict[str, int]:
    """Withdraw consent; an error if the registry has no record for this patient and purpose."""
    return record_consent(state_dir, patient_id, purpose, "withdrawn", **kw)


def record_consent(state_dir: str | Path, patient_id: str, purpose: str, status: str, *,
                   actor: str | None = None, at: datetime | None = None,
                   now: datetime | None = None) -> dict[str, int]:
    """Add one record dated ``at`` (default ``now``, this node's clock); the purpose's counts after.

    Raises :class:`ConsentError`, before anything changes, for a record dated more than
    ``CLOCK_SKEW`` after ``now`` or a withdrawal for a patient and purpose without records; and,
    after the record is stored and audited, if a later record in effect still outranks it.
    """
    if status not in STATUSES:
        raise ConsentError(f"a consent status must be one of {', '.join(STATUSES)}")
    _check_id(patient_id)
    if not purpose or purpose != purpose.strip() or any(c in purpose for c in ",\"\r\n"):
        raise ConsentError(f"purpose {purpose!r} must be non-empty, without surrounding spaces, "
                           "commas, quotes or line breaks")
    now = now or datetime.now(timezone.utc)
    when = at or now
    if when.tzinfo is None:
        raise ConsentError("consent times must be timezone-aware")
    if when > future_limit(now):
        raise ConsentError(f"this {status} record is {too_far_ahead(future_limit(now))}: record it at "
                           "the current time (or fix this node's clock)")
    read_info(state_dir)
    with state_lock(state_dir):
        log = open_audit(state_dir, actor=actor)
        records = registry_records(state_dir)
        if status == "withdrawn" and not any(r.patient_id == patient_id and r.purpose == purpose
                                             for r in records):
            raise ConsentError(f"no consent record for this patient and purpose {purpose!r}; check the "
                               "id and the purpose ('twinfed consent status' lists the purposes)")
        records.append(ConsentRecord(patient_id, status, purpose, when.astimezone(timezone.utc)))
        counts = _counts(records, purpose, now=now)[purpose]
        event = ConsentChanged(purpose=purpose, status=status, records_added=1,
                               purposes={purpose: counts})
        # Order by which failure is harmless: a grant is audited before it takes effect, a
        # withdrawal takes effect before it is audited. A crash in between never leaves a patient
        # usable without a trace or a withdrawal waiting on the audit log.
        if status == "granted":
            log.append(event, at=when)
            _write(state_dir, records)
        else:
            _write(state_dir, records)
            log.append(event, at=when)
        _check_in_effect(state_dir, patient_id, purpose, status, now)
    return counts


def _check_id(patient_id: str) -> None:
    if not isinstance(patient_id, str) or not patient_id.strip():
        raise ConsentError("empty patient id; give the id exactly as in the site export")
    try:
        patient_id.encode("utf-8")
    except UnicodeEncodeError:
        raise ConsentError("the patient id is not valid text; pass it with --patient-file as UTF-8, "
                           "exactly as in the site export") from None
    if len(patient_id) > csv.field_size_limit():
        raise ConsentError(f"the patient id is longer than {csv.field_size_limit()} characters, more "
                           "than a consent file can hold; check the id")


def _check_in_effect(state_dir: str | Path, patient_id: str, purpose: str, status: str,
                     now: datetime) -> None:
    """The patient's status, read back from the stored registry, is the one just recorded."""
    records = [r for r in registry_records(state_dir)
               if r.patient_id == patient_id and r.purpose == purpose]
    effective = current_status(records, purpose, now=now).get(patient_id)
    if effective == status:
        return
    limit = future_limit(now)
    latest = max((r.recorded_at for r in records if r.recorded_at <= limit), default=None)
    verb = "withdrawal" if status == "withdrawn" else "grant"
    raise ConsentError(f"the {verb} for {purpose!r} was recorded, but the patient's status stays "
                       f"{effective or 'unknown'}: a record dated {format_utc(latest) if latest else '?'} "
                       f"outranks it; record the {verb} again after that time")


def _key(rec: ConsentRecord) -> tuple:
    return rec.patient_id, rec.status, rec.purpose, rec.recorded_at


def _counts(records: list[ConsentRecord], purpose: str | None, *,
            now: datetime | None = None) -> dict[str, dict[str, int]]:
    purposes = sorted({r.purpose for r in records}) if purpose is None else [purpose]
    out = {}
    for p in purposes:
        statuses = list(current_status(records, p, now=now).values())
        out[p] = {s: statuses.count(s) for s in STATUSES}
    return out


def _write(state_dir: str | Path, records: list[ConsentRecord]) -> None:
    buf = io.StringIO()
    # "\r\n" ends rows, as RFC 4180 says; it also makes the writer quote an id holding a lone
    # "\r" (with "\n" it would not, and the id would not read back).
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(CONSENT_COLUMNS)
    for r in records:
        w.writerow([r.patient_id, r.status, r.purpose,
                    r.recorded_at.astimezone(timezone.utc).isoformat(timespec="microseconds")
                    .replace("+00:00", "Z")])
    # consent/ is made 0700 and the file 0600 as it is written: it holds patient identifiers.
    write_bytes_atomic(state_paths(state_dir).consent, buf.getvalue().encode("utf-8"), mode=0o600)
