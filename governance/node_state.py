"""Initialising a node's or the coordinator's state directory (layout in :mod:`governance.layout`).

Guarantees:
- initialisation makes a fresh audit key, then the audit log's first entry (``node_initialised``
  or ``coordinator_initialised``, which pins the key's fingerprint), then, for a node with site
  data, imports its consent, and writes ``state.json`` last: a directory with ``state.json`` is
  complete;
- it never replaces a key or a log. A second ``init`` of an initialised directory is an error
  (:class:`NodeStateError`), or with ``exist_ok=True`` a no-op returning the existing state,
  provided the kind and name match. A half-initialised directory (a crash mid-init) is an error
  that says what to do;
- everything it can check is checked before anything is created: the site name (a plain name,
  :data:`twinfed.wire.SiteName`) and the site's consent.csv; and if a step fails all the same (a
  full disk, a permission), what this call created is removed again, so a failed init leaves no
  half-initialised directory behind;
- the state directory it creates, and every directory in it, is mode 0700, every file 0600 (the
  public keys 0644).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from twinfed.atomic import make_dir
from twinfed.errors import NodeStateError
from twinfed.events import CoordinatorInitialised, NodeInitialised
from twinfed.governance.audit_log import FORMAT, AuditLog, format_time
from twinfed.governance.keys import generate_signing_key
from twinfed.governance.layout import StateInfo, read_info, state_paths, write_info

SITE_NAME_RULE = ("letters, digits, '.', '_' and '-', starting with a letter or digit, at most 64 "
                  "characters")


def is_site_name(name: str) -> bool:
    """Whether ``name`` is a plain site name (:data:`twinfed.wire.SiteName`, :data:`SITE_NAME_RULE`)."""
    from pydantic import TypeAdapter, ValidationError

    from twinfed.wire import SiteName

    try:
        TypeAdapter(SiteName).validate_python(name)
    except ValidationError:
        return False
    return True


def init_node(state_dir: str | Path, *, site_name: str | None = None, site_data: str | Path | None = None,
              actor: str | None = None, at: datetime | None = None, exist_ok: bool = False) -> StateInfo:
    """Make ``state_dir`` a node's state; import ``site_data``'s consent.csv if it has one.

    ``site_name`` defaults to the site directory's name, else the state directory's.
    """
    name = site_name or (Path(site_data).name if site_data is not None else Path(state_dir).resolve().name)
    _check_site_name(name, given=site_name is not None,
                     source="site directory" if site_data is not None else "state directory")
    if _existing(state_dir, kind="node", name=name, exist_ok=exist_ok):
        return read_info(state_dir)
    consent = Path(site_data) / "consent.csv" if site_data is not None else None
    if consent is not None and consent.is_file():
        from twinfed.governance.consent import future_limit, read_consent_csv

        read_consent_csv(consent, not_after=future_limit())  # as the import will: before creating
    else:
        consent = None
    with _removed_on_failure(Path(state_dir)):
        info = _init(state_dir, kind="node", name=name, actor=actor, at=at)
        _write_info(state_dir, info)
        if consent is not None:  # the import appends through the state's own audit log
            from twinfed.governance.consent_registry import import_consent

            import_consent(state_dir, site_data, actor=actor, at=at)
    return info


def init_coordinator(state_dir: str | Path, *, name: str = "coordinator", actor: str | None = None,
                     at: datetime | None = None, exist_ok: bool = False) -> StateInfo:
    """Make ``state_dir`` the coordinator's state: key and audit log, same layout as a node."""
    if _existing(state_dir, kind="coordinator", name=name, exist_ok=exist_ok):
        return read_info(state_dir)
    with _removed_on_failure(Path(state_dir)):
        info = _init(state_dir, kind="coordinator", name=name, actor=actor, at=at)
        _write_info(state_dir, info)
    return info


def _check_site_name(name: str, *, given: bool, source: str) -> None:
    if is_site_name(name):
        return
    shown = repr(name) if len(name) <= 40 else f"{name[:32]!r}... ({len(name)} characters)"
    if given:
        raise NodeStateError(f"site name {shown} is not a plain name ({SITE_NAME_RULE}); choose "
                             "another --site-name")
    raise NodeStateError(f"the {source}'s name {shown} is not a plain site name ({SITE_NAME_RULE}); "
                         "name the site with --site-name")


def _existing(state_dir, *, kind, name, exist_ok) -> bool:
    """True if ``state_dir`` is already initialised as this (with ``exist_ok``); an error if it is
    initialised otherwise or half initialised; False if it is free to initialise."""
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
        return True
    if p.key.exists() or os.path.lexists(p.audit):
        raise NodeStateError(f"{state_dir}: half initialised (a key or audit log but no state.json, "
                             "perhaps a crash during init); move the directory aside and init again")
    return False


@contextmanager
def _removed_on_failure(root: Path) -> Iterator[None]:
    """If the block fails, remove what it created in ``root`` (``root`` too, if it made it)."""
    existed = os.path.lexists(root)
    try:
        before = set(os.listdir(root)) if existed else set()
    except OSError:
        before = None  # not a directory we can list: the block fails on its own, saying why
    try:
        yield
    except BaseException:
        try:
            if not existed:
                shutil.rmtree(root, ignore_errors=True)
            elif before is not None:
                for entry in set(os.listdir(root)) - before:
                    target = root / entry
                    if target.is_dir() and not target.is_symlink():
                        shutil.rmtree(target, ignore_errors=True)
                    else:
                        target.unlink(missing_ok=True)
        except OSError:
            pass  # best effort: the error being raised says what went wrong
        raise


def _init(state_dir, *, kind, name, actor, at) -> StateInfo:
    """Key and first audit entry in a fresh ``state_dir``; the caller writes state.json."""
    p = state_paths(state_dir)
    when = at or datetime.now(timezone.utc)
    make_dir(p.root)
    signer = generate_signing_key(p.key)
    info = StateInfo(kind=kind, name=name, key_fingerprint=signer.fingerprint,
                     created_at=format_time(when))
    log = AuditLog(p.audit, signer, actor=actor or info.actor)
    log.append(CoordinatorInitialised(format=FORMAT, coordinator=name, key_fingerprint=signer.fingerprint)
               if kind == "coordinator" else
               NodeInitialised(format=FORMAT, site=name, key_fingerprint=signer.fingerprint), at=when)
    return info


def _write_info(state_dir, info: StateInfo) -> None:
    write_info(state_dir, info)
