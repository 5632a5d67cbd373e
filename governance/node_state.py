"""Initialising a node's or the coordinator's state directory (layout in :mod:`governance.layout`).

Guarantees:
- initialisation makes a fresh audit key, then the audit log's first entry (``node_initialised``
  or ``coordinator_initialised``, which pins the key's fingerprint), then, for a node with site
  data, imports its consent, and writes ``state.json`` last: a directory with ``state.json`` is
  complete;
- it never replaces a key or a log. A second ``init`` of an initialised directory is an error
  (:class:`NodeStateError`), or with ``exist_ok=True`` a no-op returning the existing state,
  provided the kind and name match. A half-initialised directory (a crash mid-init) is an error
  that says what to do.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from twinfed.atomic import write_json_atomic
from twinfed.errors import NodeStateError
from twinfed.events import CoordinatorInitialised, NodeInitialised
from twinfed.governance.audit_log import FORMAT, AuditLog, format_time
from twinfed.governance.keys import generate_signing_key
from twinfed.governance.layout import StateInfo, read_info, state_paths


def init_node(state_dir: str | Path, *, site_name: str | None = None, site_data: str | Path | None = None,
              actor: str | None = None, at: datetime | None = None, exist_ok: bool = False) -> StateInfo:
    """Make ``state_dir`` a node's state; import ``site_data``'s consent.csv if it has one.

    ``site_name`` defaults to the site directory's name, else the state directory's.
    """
    name = site_name or (Path(site_data).name if site_data is not None else Path(state_dir).resolve().name)
    info = _init(state_dir, kind="node", name=name, actor=actor, at=at, exist_ok=exist_ok)
    if info is None:
        return read_info(state_dir)
    if site_data is not None and (Path(site_data) / "consent.csv").is_file():
        from twinfed.governance.consent_registry import import_consent

        _write_info(state_dir, info)  # the import appends through the state's own audit log
        import_consent(state_dir, site_data, actor=actor, at=at)
    else:
        _write_info(state_dir, info)
    return info


def init_coordinator(state_dir: str | Path, *, name: str = "coordinator", actor: str | None = None,
                     at: datetime | None = None, exist_ok: bool = False) -> StateInfo:
    """Make ``state_dir`` the coordinator's state: key and audit log, same layout as a node."""
    info = _init(state_dir, kind="coordinator", name=name, actor=actor, at=at, exist_ok=exist_ok)
    if info is None:
        return read_info(state_dir)
    _write_info(state_dir, info)
    return info


def _init(state_dir, *, kind, name, actor, at, exist_ok) -> StateInfo | None:
    p = state_paths(state_dir)
    if p.info.exists():
        existing = read_info(state_dir)
        if not exist_ok:
            raise NodeStateError(f"{state_dir}: already initialised as {existing.kind} "
                                 f"{existing.name!r} (audit key {existing.key_fingerprint[:16]}...); "
                                 "nothing was changed")
        if (existing.kind, existing.name) != (kind, name):
            raise NodeStateError(f"{state_dir}: initialised as {existing.kind} {existing.name!r}, not "
                                 f"{kind} {name!r}; use another state directory")
        return None
    if p.key.exists() or p.audit.exists():
        raise NodeStateError(f"{state_dir}: half initialised (a key or audit log but no state.json, "
                             "perhaps a crash during init); move the directory aside and init again")
    when = at or datetime.now(timezone.utc)
    p.root.mkdir(parents=True, exist_ok=True)
    signer = generate_signing_key(p.key)
    info = StateInfo(kind=kind, name=name, key_fingerprint=signer.fingerprint,
                     created_at=format_time(when))
    log = AuditLog(p.audit, signer, actor=actor or info.actor)
    log.append(CoordinatorInitialised(format=FORMAT, coordinator=name, key_fingerprint=signer.fingerprint)
               if kind == "coordinator" else
               NodeInitialised(format=FORMAT, site=name, key_fingerprint=signer.fingerprint), at=when)
    return info


def _write_info(state_dir, info: StateInfo) -> None:
    write_json_atomic(state_paths(state_dir).info, info.model_dump(mode="json"))
