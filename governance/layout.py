"""Where a node's or the coordinator's governance state lives, and how to open its audit log.

A state directory (node or coordinator) holds:

    state.json                 what it is: kind, name, audit key fingerprint (StateInfo); for a
                               node, the newest log entry that changed its privacy ledger
    keys/audit_ed25519         the Ed25519 audit-signing key, mode 0600 (keys/ is 0700)
    keys/audit_ed25519.pub     its public half, the key verification pins
    audit.jsonl                the signed, hash-chained audit log
    consent/records.csv        node only: the consent registry (patient identifiers, mode 0600)
    approvals.json             node only: the training plans the officer approved

``state.json`` is written last by initialisation, so its presence means the directory is
complete. A node's ``state.json`` also keeps ``ledger_anchor``, the (seq, hash) of the newest
entry of its log that changed its privacy ledger (budget set, spend, rebuild), rewritten after
each such entry. A log cut back below it (the rollback that deletes the ledger too, so that the
budget starts afresh) no longer holds it: the node refuses to act on it (``log_rolled_back``) and
``twinfed audit verify`` of the state fails, unless state.json is edited as well. Other modules (privacy's ledger, the client's checkpoints) may add their own files.

Everything in it is private to the node's account: the directory and its subdirectories are
created 0700, every file 0600 (:mod:`twinfed.atomic`'s default), except the public keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from twinfed.errors import AuditError, NodeStateError
from twinfed.governance.audit_log import AuditEntry, AuditLog, Head, LogRolledBack, holds, not_regular
from twinfed.governance.keys import load_signer

STATE_FORMAT = "twinfed-state-v1"
# The events that change a node's privacy ledger: each moves the state's ledger_anchor.
LEDGER_EVENTS = frozenset({"privacy_budget_set", "privacy_spent", "privacy_ledger_rebuilt"})


class StateInfo(BaseModel):
    """``state.json``: what a state directory belongs to."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["twinfed-state-v1"] = STATE_FORMAT
    kind: Literal["node", "coordinator"]
    name: Annotated[str, Field(min_length=1, max_length=200)]
    key_fingerprint: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    created_at: str
    # node: the newest entry of its log that changed its privacy ledger; the log must hold it
    ledger_anchor: Head | None = None

    @property
    def actor(self) -> str:
        return f"node:{self.name}" if self.kind == "node" else "coordinator"


@dataclass(frozen=True)
class StatePaths:
    root: Path

    @property
    def info(self) -> Path:
        return self.root / "state.json"

    @property
    def key(self) -> Path:
        return self.root / "keys" / "audit_ed25519"

    @property
    def public_key(self) -> Path:
        return self.root / "keys" / "audit_ed25519.pub"

    @property
    def audit(self) -> Path:
        return self.root / "audit.jsonl"

    @property
    def consent(self) -> Path:
        return self.root / "consent" / "records.csv"

    @property
    def approvals(self) -> Path:
        return self.root / "approvals.json"


def state_paths(state_dir: str | Path) -> StatePaths:
    return StatePaths(Path(state_dir))


def is_state_dir(path: str | Path) -> bool:
    p = state_paths(path)
    return p.info.is_file() or (p.audit.is_file() and p.public_key.is_file())


def read_info(state_dir: str | Path) -> StateInfo:
    """The directory's ``state.json``; a clear error if it is not an initialised state."""
    p = state_paths(state_dir)
    try:
        return StateInfo.model_validate_json(p.info.read_bytes())
    except FileNotFoundError:
        raise NodeStateError(f"{state_dir}: not an initialised node state (no state.json); run "
                             f"'twinfed node init --state {state_dir}'") from None
    except ValidationError as exc:
        raise NodeStateError(f"{p.info}: not a valid state file ({exc.errors()[0]['msg']})") from None


def open_audit(state_dir: str | Path, *, actor: str | None = None,
               clock: Callable[[], datetime] | None = None) -> AuditLog:
    """The state's audit log, ready to append, signed with the state's own key.

    ``actor`` defaults to the state's owner (``node:<name>`` or ``coordinator``); officer
    commands pass the officer's name. A log that is not a regular file is refused here, before
    the caller changes anything it would audit.
    """
    info = read_info(state_dir)
    p = state_paths(state_dir)
    problem = not_regular(p.audit)
    if problem:
        raise AuditError(f"{p.audit}: {problem}")
    signer = load_signer(p.key)
    if signer.fingerprint != info.key_fingerprint:
        raise NodeStateError(f"{p.key}: key fingerprint {signer.fingerprint[:16]}... is not the one this "
                             f"state was initialised with ({info.key_fingerprint[:16]}...); restore the "
                             "original key")
    on_append = (lambda entry: _move_ledger_anchor(state_dir, entry)) if info.kind == "node" else None
    return AuditLog(p.audit, signer, actor=actor or info.actor, clock=clock, on_append=on_append)


def write_info(state_dir: str | Path, info: StateInfo) -> None:
    """``state.json``, atomically (fields left unset are not written)."""
    from twinfed.atomic import write_json_atomic

    write_json_atomic(state_paths(state_dir).info, info.model_dump(mode="json", exclude_none=True))


def _move_ledger_anchor(state_dir: str | Path, entry: AuditEntry) -> None:
    """After a ledger-changing entry is durably logged: record it in state.json (never moving the
    anchor back). A crash in between leaves the older anchor: weaker, never wrong."""
    if entry.event not in LEDGER_EVENTS:
        return
    info = read_info(state_dir)
    if info.ledger_anchor is not None and info.ledger_anchor.seq >= entry.seq:
        return
    write_info(state_dir, info.model_copy(update={"ledger_anchor": entry.head}))


def check_not_rolled_back(state_dir: str | Path, entries: list[AuditEntry], *,
                          node_anchor=None) -> None:
    """:class:`LogRolledBack` unless the verified ``entries`` hold the state's ledger anchor and
    ``node_anchor`` (the head of this node's log the coordinator last anchored, a
    :class:`twinfed.wire.NodeHead`, if it sent one). Messages name no path: they may end in
    refusals."""
    try:
        info = read_info(state_dir)
    except NodeStateError:
        info = None
    mark = info.ledger_anchor if info is not None else None
    if mark is not None and not (mark.seq < len(entries) and entries[mark.seq].hash == mark.hash):
        raise LogRolledBack(
            f"this node's audit log has no entry seq {mark.seq} (hash {mark.hash[:16]}...), the newest "
            "change of its privacy ledger that state.json records: the log was cut back (rolled "
            "back). The node will not act on it: restore the log and the ledger from a backup and "
            "run 'twinfed audit verify' on the state")
    if node_anchor is not None and not holds(entries, node_anchor.hash):
        raise LogRolledBack(
            f"this node's audit log has no entry with hash {node_anchor.hash[:16]}..., the head the "
            "coordinator recorded from this node's last reply: the log was cut back (rolled back) or "
            "replaced. The node will not act on it: restore the log and the ledger from a backup and "
            "run 'twinfed audit verify' on the state")


def verified_entries(state_dir: str | Path) -> list:
    """The state's own audit entries, verified against its own key, for a decision that reads
    them (a gate, a ledger check). :class:`AuditError` without a path if they do not verify:
    such messages can end in refusals."""
    from twinfed.errors import TwinfedError
    from twinfed.governance.audit_log import verify_log_entries
    from twinfed.governance.keys import load_public_key

    p = state_paths(state_dir)
    try:
        result, entries = verify_log_entries(p.audit, load_public_key(p.public_key))
    except TwinfedError:
        raise AuditError("this state's audit log or its public key cannot be read; run 'twinfed "
                         "audit verify' on the state directory") from None
    if not result.ok:
        raise AuditError(f"this state's audit log does not verify ({result.reason}); run 'twinfed "
                         "audit verify' on the state directory and restore it")
    check_not_rolled_back(state_dir, entries)
    return entries
