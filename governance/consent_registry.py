"""A node's consent registry: the records training reads, kept in the node's own state.

Guarantees:
- records are only ever added (an import merges and de-duplicates; grant and withdraw add one
  record at the current time), so the registry is the full history; the rule of
  :mod:`governance.consent` decides (latest record per patient and purpose wins, a tie is
  withdrawn). A withdrawal is effective for every round that starts after it returns;
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
from twinfed.governance.consent import (CONSENT_COLUMNS, STATUSES, ConsentRecord, current_status,
                                        read_consent_csv)
from twinfed.governance.layout import open_audit, read_info, state_paths


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


def granted_patients(state_dir: str | Path, purpose: str) -> set[str]:
    """The patients training may use for ``purpose`` now: latest record granted, ties withdrawn."""
    return {pid for pid, s in current_status(registry_records(state_dir), purpose).items()
            if s == "granted"}


def consent_counts(state_dir: str | Path, purpose: str | None = None) -> dict[str, dict[str, int]]:
    """Patients per current status for each purpose (or just ``purpose``): counts only."""
    return _counts(registry_records(state_dir), purpose)


def patient_status(state_dir: str | Path, patient_id: str, purpose: str | None = None) -> dict[str, str]:
    """One patient's current status per purpose (only what the officer asked for)."""
    records = [r for r in registry_records(state_dir) if r.patient_id == patient_id]
    purposes = sorted({r.purpose for r in records} if purpose is None else {purpose})
    out = {}
    for p in purposes:
        status = current_status(records, p).get(patient_id)
        if status is not None:
            out[p] = status
    return out


def import_consent(state_dir: str | Path, source: str | Path, *, actor: str | None = None,
                   at: datetime | None = None) -> ImportSummary:
    """Merge a site's ``consent.csv`` (or a site directory holding one) into the registry."""
    source = Path(source)
    csv_path = source / "consent.csv" if source.is_dir() else source
    if not csv_path.is_file():
        raise ConsentError(f"{csv_path}: no consent file to import; export consent.csv from the site")
    read_info(state_dir)  # fail on an uninitialised state before reading patient data
    incoming = read_consent_csv(csv_path)
    existing = registry_records(state_dir)
    seen = {_key(r) for r in existing}
    added = []
    for rec in incoming:
        if _key(rec) not in seen:
            seen.add(_key(rec))
            added.append(rec)
    records = existing + added
    summary = ImportSummary(records_read=len(incoming), records_added=len(added),
                            duplicates=len(incoming) - len(added), counts=_counts(records, None))
    # Audit before the registry changes: a crash in between leaves an audited change that did
    # not happen, never a patient made usable without a trace.
    open_audit(state_dir, actor=actor).append("consent_imported", {
        "source_sha256": hashlib.sha256(csv_path.read_bytes()).hexdigest(),
        "records_read": summary.records_read, "records_added": summary.records_added,
        "duplicates": summary.duplicates, "purposes": summary.counts}, at=at)
    if added:
        _write(state_dir, records)
    return summary


def grant(state_dir: str | Path, patient_id: str, purpose: str, **kw) -> dict[str, int]:
    return record_consent(state_dir, patient_id, purpose, "granted", **kw)


def withdraw(state_dir: str | Path, patient_id: str, purpose: str, **kw) -> dict[str, int]:
    return record_consent(state_dir, patient_id, purpose, "withdrawn", **kw)


def record_consent(state_dir: str | Path, patient_id: str, purpose: str, status: str, *,
                   actor: str | None = None, at: datetime | None = None) -> dict[str, int]:
    """Add one record now (or ``at``); returns the purpose's counts after the change."""
    if status not in STATUSES:
        raise ConsentError(f"consent status {status!r} is not one of {', '.join(STATUSES)}")
    for what, value in (("patient id", patient_id), ("purpose", purpose)):
        if not value or value != value.strip() or any(c in value for c in ",\"\r\n"):
            raise ConsentError(f"{what} {value!r} must be non-empty, without surrounding spaces, "
                               "commas, quotes or line breaks")
    log = open_audit(state_dir, actor=actor)
    when = (at or datetime.now(timezone.utc))
    if when.tzinfo is None:
        raise ConsentError("consent times must be timezone-aware")
    records = registry_records(state_dir)
    records.append(ConsentRecord(patient_id, status, purpose, when.astimezone(timezone.utc)))
    counts = _counts(records, purpose)[purpose]
    details = {"purpose": purpose, "status": status, "records_added": 1, "purposes": {purpose: counts}}
    # Order by which failure is harmless: a grant is audited before it takes effect, a
    # withdrawal takes effect before it is audited. A crash in between never leaves a patient
    # usable without a trace or a withdrawal waiting on the audit log.
    if status == "granted":
        log.append("consent_changed", details, at=when)
        _write(state_dir, records)
    else:
        _write(state_dir, records)
        log.append("consent_changed", details, at=when)
    return counts


def _key(rec: ConsentRecord) -> tuple:
    return rec.patient_id, rec.status, rec.purpose, rec.recorded_at


def _counts(records: list[ConsentRecord], purpose: str | None) -> dict[str, dict[str, int]]:
    purposes = sorted({r.purpose for r in records}) if purpose is None else [purpose]
    out = {}
    for p in purposes:
        statuses = list(current_status(records, p).values())
        out[p] = {s: statuses.count(s) for s in STATUSES}
    return out


def _write(state_dir: str | Path, records: list[ConsentRecord]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CONSENT_COLUMNS)
    for r in records:
        w.writerow([r.patient_id, r.status, r.purpose,
                    r.recorded_at.astimezone(timezone.utc).isoformat(timespec="microseconds")
                    .replace("+00:00", "Z")])
    path = state_paths(state_dir).consent
    path.parent.mkdir(mode=0o700, exist_ok=True)
    write_bytes_atomic(path, buf.getvalue().encode("utf-8"), mode=0o600)
