"""The signed, hash-chained, append-only audit log: a recipe with two verbs, append and verify.

File format (``twinfed-audit-v1``): UTF-8 JSON lines, one entry per line, each ending in ``\\n``.
An entry's *body* is the canonical JSON (sorted keys, no spaces, ASCII) of

    actor    who caused the event (``node:site-a``, ``coordinator``, an officer's name)
    details  a JSON object of counts, hashes and budgets; never patient data
    event    a snake_case event name
    prev     SHA-256 (hex) of the previous entry's whole line (without its newline), or
             64 zeros (``GENESIS``) for the first entry
    seq      0-based position in the log: the first entry is seq 0 on line 1
    time     ISO-8601 UTC with microseconds, ``2026-01-31T09:30:00.000000Z``

and the line is the body with two fields appended, in this order:

    hash     SHA-256 (hex) of the body's bytes
    sig      Ed25519 signature (hex) of the 32 raw bytes of ``hash``, by the log owner's key

Because ``prev`` hashes the whole previous line, the chain covers every earlier byte including
the earlier signatures: one valid signature on the newest entry vouches for the entire log. So
:func:`verify_log` checks the chain fully (microseconds per entry) and one signature, and only if
that fails bisects the signatures for the first bad one (DESIGN.md section 5: 100,000 entries
well under 5 s). The *head* of a log is ``(seq, hash)`` of its newest entry; other logs record
heads as cross-anchors.

What verification can and cannot see:
- an edited, inserted, deleted, replayed or reordered entry, a forged entry, a log re-signed
  with another key, a torn last line: always, and it names the first bad entry;
- whole entries cut off the end: only against an anchor (an expected head recorded elsewhere,
  e.g. in the coordinator's log). A log that is a clean prefix of itself is indistinguishable
  from a shorter honest log without one; the cross-anchors in :mod:`governance.verify` give it.

Appends hold an exclusive ``flock`` on the file, write one whole line with ``O_APPEND``, and
fsync before returning; a write the system refuses (a full disk) is cut back off, so the file
ends where it did and the error names the file and the reason. A last line without its newline
(a crash mid-append) makes every later append fail with :class:`AuditError` naming the file and
the entry: it is never dropped or accepted silently.

The log is created mode 0600 and must be a regular file: a symbolic link (to ``/dev/null``, say),
a device or a pipe would swallow appends or hang a reader, so appending, reading and verifying
refuse one, naming it.
"""

from __future__ import annotations

import fcntl
import gc
import hashlib
import json
import os
import re
import stat
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from twinfed.atomic import cannot_write, fsync_dir, make_dir, write_all
from twinfed.errors import AuditError
from twinfed.events import EVENTS, AuditEvent
from twinfed.governance.keys import Signer, public_key_fingerprint, signature_ok

FORMAT = "twinfed-audit-v1"
GENESIS = "0" * 64
EVENT_PATTERN = r"^[a-z][a-z0-9_]*$"
# hash and sig are fixed-width hex, so the trailer after the body has a fixed length.
_TRAILER_LEN = len(',"hash":"') + 64 + len('","sig":"') + 128 + len('"}')
# A tripwire, not a guarantee: detail keys that would only ever hold identifiers.
_IDENTIFIER_KEY = re.compile(r"patient_?ids?$|^patients?$|^mrn$", re.IGNORECASE)

Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class AuditEntry(BaseModel):
    """One line of the log, as written."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    actor: Annotated[str, Field(min_length=1, max_length=200)]
    details: dict[str, Any]
    event: Annotated[str, Field(pattern=EVENT_PATTERN, max_length=100)]
    prev: Hex64
    seq: Annotated[int, Field(ge=0)]
    time: Annotated[str, Field(pattern=r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")]
    hash: Hex64
    sig: Annotated[str, Field(pattern=r"^[0-9a-f]{128}$")]

    @property
    def head(self) -> "Head":
        return Head(seq=self.seq, hash=self.hash)

    @property
    def node_head(self):
        """This entry as a node's reply anchors it (:class:`twinfed.wire.NodeHead`): its hash only."""
        from twinfed.wire import NodeHead

        return NodeHead(hash=self.hash)

    @property
    def at(self) -> datetime:
        return datetime.strptime(self.time, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)


class Head(BaseModel):
    """A log's position: the newest entry's seq and hash."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seq: Annotated[int, Field(ge=0)]
    hash: Hex64


class Anchor(BaseModel):
    """An entry another log (or the caller) says this log must contain: at ``seq`` with that
    hash, or, when only the hash was recorded (a node's head as the coordinator receives it,
    :class:`twinfed.wire.NodeHead`), anywhere in the log."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seq: Annotated[int, Field(ge=0)] | None = None
    hash: Hex64
    source: str = "the expected head"  # where the anchor was recorded, for the message


class VerifyResult(BaseModel):
    """The outcome of verifying one log: ok, or the first bad entry and why."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str
    ok: bool
    n_entries: int  # whole entries that verified: seq 0 .. n_entries - 1
    head: Head | None  # head of the verified entries
    key_fingerprint: str
    first_bad_seq: int | None = None
    line: int | None = None  # 1-based line of the first bad entry
    reason: str = ""


class LogRolledBack(AuditError):
    """A log that verifies but lacks an entry it was known to hold: cut back to an earlier prefix
    of itself (a "rollback"), which its chain and signatures alone cannot show."""


def holds(entries: list[AuditEntry], hash: str) -> bool:
    """Whether the verified ``entries`` hold an entry with this hash."""
    return any(e.hash == hash for e in reversed(entries))


def format_time(at: datetime) -> str:
    if at.tzinfo is None:
        raise AuditError("audit times must be timezone-aware (got a naive datetime)")
    return at.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def _check_details(details: dict, event: str) -> None:
    def walk(obj, path):
        if isinstance(obj, dict):
            for k, v in obj.items():
                if not isinstance(k, str):
                    raise AuditError(f"audit event {event}: detail key {k!r} is not a string")
                if _IDENTIFIER_KEY.search(k):
                    raise AuditError(f"audit event {event}: detail {path + k!r} looks like a patient "
                                     "identifier; audit details carry counts and hashes only")
                walk(v, f"{path}{k}.")
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v, path)
    walk(details, "")


def encode_entry(signer: Signer, *, seq: int, prev: str, actor: str, event: str, details: dict,
                 time: str) -> bytes:
    """One signed line, newline included. :class:`AuditLog` is the way to append; this is the
    format itself, exposed for benchmarks and test builders that write many entries at once."""
    body = {"actor": actor, "details": details, "event": event, "prev": prev, "seq": seq, "time": time}
    try:
        body_bytes = _canonical(body)
    except (TypeError, ValueError) as exc:
        raise AuditError(f"audit event {event}: details are not plain finite JSON ({exc})") from None
    digest = hashlib.sha256(body_bytes).digest()
    sig = signer.sign(digest)
    return (body_bytes[:-1] + b',"hash":"' + digest.hex().encode() + b'","sig":"' + sig.hex().encode()
            + b'"}\n')


def line_hash(line: bytes) -> str:
    """What the next entry's ``prev`` must be: SHA-256 of the whole line without its newline."""
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


def not_regular(path: str | Path) -> str | None:
    """Why the existing ``path`` cannot be an audit log (a link, a device, a pipe, a directory),
    for a message after its name; None if it is a regular file or does not exist."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISLNK(mode):
        what = f"a symbolic link (to {os.readlink(path)})"
    else:
        what = ("a directory" if stat.S_ISDIR(mode) else "a character device" if stat.S_ISCHR(mode)
                else "a block device" if stat.S_ISBLK(mode) else "a named pipe" if stat.S_ISFIFO(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "not a file")
    return (f"is {what}, not a regular file; an audit log must be one, or what is written to it "
            "is lost: restore the log from a backup")


def _open_log(path: Path, flags: int) -> int:
    """A descriptor on the log, which must be a regular file: :class:`AuditError` naming it if it
    is not; the system's :class:`OSError` otherwise. Never follows a link, never blocks on a pipe."""
    problem = not_regular(path)
    if problem:
        raise AuditError(f"{path}: {problem}")
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped in since the check above
        os.close(fd)
        raise AuditError(f"{path}: {not_regular(path) or 'is not a regular file'}")
    return fd


def _sig_ok(public_key: Ed25519PublicKey, entry: AuditEntry) -> bool:
    return signature_ok(public_key, bytes.fromhex(entry.sig), bytes.fromhex(entry.hash))


class AuditLog:
    """Append signed entries to one log file; the file is created on the first append."""

    def __init__(self, path: str | Path, signer: Signer, *, actor: str,
                 clock: Callable[[], datetime] | None = None,
                 on_append: Callable[[AuditEntry], None] | None = None) -> None:
        self.path = Path(path)
        self.signer = signer
        self.actor = actor
        self._clock = clock or (lambda: datetime.now(timezone.utc))
        self._on_append = on_append  # told of each entry once it is durably in the log

    def head(self) -> Head | None:
        """The newest entry's (seq, hash), or None for an empty log; raises on a torn tail."""
        if not os.path.lexists(self.path):
            return None
        try:
            fd = _open_log(self.path, os.O_RDONLY)
        except OSError as exc:
            raise AuditError(f"{self.path}: cannot read the audit log ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # never read a line a concurrent append is writing
            last, _ = self._last_entry(fd)
        finally:
            os.close(fd)
        return last.head if last else None

    def append(self, event: str | AuditEvent, details: dict | None = None, *,
               at: datetime | None = None, actor: str | None = None) -> AuditEntry:
        """Sign and durably append one event; returns the entry as written.

        ``event`` is a typed payload (:mod:`twinfed.events`), or a name and ``details``. Details
        of a name in :data:`twinfed.events.EVENTS` must validate against its model: the models
        are the allow-list of what each event may carry.
        """
        if isinstance(event, AuditEvent):
            event, details = event.EVENT, event.model_dump(mode="json")
        details = dict(details or {})
        if not re.match(EVENT_PATTERN, event):
            raise AuditError(f"audit event name {event!r} must be snake_case")
        if event in EVENTS:
            try:
                details = EVENTS[event].model_validate(details).model_dump(mode="json")
            except ValidationError as exc:
                err = exc.errors()[0]
                loc = ".".join(str(x) for x in err.get("loc", ())) or "(details)"
                raise AuditError(f"audit event {event}: {loc}: {err['msg']}") from None
        _check_details(details, event)
        try:  # refuse bad details before the file is touched
            _canonical(details)
        except (TypeError, ValueError) as exc:
            raise AuditError(f"audit event {event}: details are not plain finite JSON ({exc})") from None
        when = format_time(at or self._clock())
        created = not os.path.lexists(self.path)
        make_dir(self.path.parent)
        try:
            fd = _open_log(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
        except OSError as exc:
            raise AuditError(cannot_write(self.path, exc)) from None
        try:
            # One writer at a time across processes: reading the head and appending after it
            # must be one step, or two writers would both chain onto the same entry.
            fcntl.flock(fd, fcntl.LOCK_EX)
            last, prev = self._last_entry(fd)
            seq = 0 if last is None else last.seq + 1
            line = encode_entry(self.signer, seq=seq, prev=prev, actor=actor or self.actor, event=event,
                                details=details, time=when)
            self._write_line(fd, line)
        finally:
            os.close(fd)  # also releases the lock
        if created:
            fsync_dir(self.path.parent)
        entry = AuditEntry.model_validate_json(line)
        if self._on_append is not None:
            self._on_append(entry)
        return entry

    def _write_line(self, fd: int, line: bytes) -> None:
        """Append ``line`` whole and durably, or cut off what part of it was written and raise."""
        size = os.fstat(fd).st_size
        try:
            write_all(fd, line)
            os.fsync(fd)
        except OSError as exc:
            try:  # we hold the lock: nobody appended after us
                os.ftruncate(fd, size)
                os.fsync(fd)
            except OSError:
                raise AuditError(f"{cannot_write(self.path, exc)}; part of the entry may remain: run "
                                 f"'twinfed audit verify {self.path}'") from None
            raise AuditError(cannot_write(self.path, exc)) from None

    def _last_entry(self, fd: int) -> tuple[AuditEntry | None, str]:
        """The newest whole entry (checked) and the SHA-256 of its line, read from the file's end."""
        size = os.fstat(fd).st_size
        if size == 0:
            return None, GENESIS
        chunk = 4096
        while True:  # widen the window until it holds one whole line (entries are ~0.5 KB)
            start = max(0, size - chunk)
            pieces = os.pread(fd, size - start, start).split(b"\n")
            whole = pieces[1:-1] if start > 0 else pieces[:-1]  # pieces[0] may be cut mid-line
            if whole or start == 0:
                break
            chunk *= 4
        tail = pieces[-1]  # empty when the file ends with a newline, as every append leaves it
        if tail:
            before = self._parse_tail_line(whole[-1]) if whole else None
            torn_seq = before.seq + 1 if before else 0
            raise AuditError(
                f"{self.path}: entry seq {torn_seq} (line {torn_seq + 1}) is torn: the file ends without "
                "a newline because an append was interrupted (a crash?). Nothing was dropped: run "
                f"'twinfed audit verify {self.path}', keep a copy, and cut the file to its first "
                f"{size - len(tail)} bytes to append again")
        raw = whole[-1]
        last = self._parse_tail_line(raw)
        if hashlib.sha256(raw[:-_TRAILER_LEN] + b"}").hexdigest() != last.hash:
            raise AuditError(f"{self.path}: the newest entry (seq {last.seq}) does not match its hash; "
                             f"run 'twinfed audit verify {self.path}'")
        if not _sig_ok(self.signer.public_key, last):
            raise AuditError(f"{self.path}: the newest entry (seq {last.seq}) is not signed by this "
                             f"state's key ({self.signer.fingerprint[:16]}...); run 'twinfed audit verify "
                             f"{self.path}' before appending")
        return last, hashlib.sha256(raw).hexdigest()

    def _parse_tail_line(self, raw: bytes) -> AuditEntry:
        try:
            return AuditEntry.model_validate_json(raw)
        except ValidationError:
            raise AuditError(f"{self.path}: the last whole line is not a valid audit entry; run "
                             f"'twinfed audit verify {self.path}'") from None


# ---------------------------------------------------------------------------------------------
# verification


def read_entries(path: str | Path) -> tuple[list[bytes], bytes | None]:
    """The log's whole lines (without newlines) and the torn tail, if any."""
    try:
        with os.fdopen(_open_log(Path(path), os.O_RDONLY), "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise AuditError(f"{path}: no audit log") from None
    except OSError as exc:
        raise AuditError(f"{path}: cannot read the audit log ({exc.strerror})") from None
    if not data:
        return [], None
    lines = data.split(b"\n")
    torn = lines.pop() or None  # a complete file ends in "\n", leaving an empty last piece
    return lines, torn


def verify_log(path: str | Path, public_key: Ed25519PublicKey, *, expected_head: Head | None = None,
               anchors: Iterable[Anchor] = ()) -> VerifyResult:
    """Check the whole log against ``public_key``; name the first bad entry if there is one.

    ``expected_head`` and ``anchors`` are entries the log must contain (seq with that hash): the
    only way to detect whole entries cut off the end.
    """
    result, entries = verify_log_entries(path, public_key)
    anchors = list(anchors)
    if expected_head is not None:
        anchors.append(Anchor(seq=expected_head.seq, hash=expected_head.hash))
    return apply_anchors(result, entries, anchors)


def verify_log_entries(path: str | Path, public_key: Ed25519PublicKey
                       ) -> tuple[VerifyResult, list[AuditEntry]]:
    """Like :func:`verify_log` without anchors; also returns the verified entries."""
    # Entries hold no reference cycles; pausing the cycle collector while 100,000 of them are
    # built saves its repeated scans of a growing heap (a quarter of the time at that size).
    paused = gc.isenabled()
    gc.disable()
    try:
        return _verify_entries(Path(path), public_key)
    finally:
        if paused:
            gc.enable()


def _verify_entries(path: Path, public_key: Ed25519PublicKey) -> tuple[VerifyResult, list[AuditEntry]]:
    lines, torn = read_entries(path)
    fp = public_key_fingerprint(public_key)
    entries: list[AuditEntry] = []
    bad: tuple[int, str] | None = None
    prev = GENESIS
    sha256 = hashlib.sha256
    for i, raw in enumerate(lines):
        try:
            e = AuditEntry.model_validate_json(raw)
        except ValidationError as exc:
            where = exc.errors()[0].get("loc") or ()
            bad = (i, "not a valid audit entry" + (f" (field {where[0]})" if where else "")
                   + ": edited or corrupted")
            break
        if e.seq != i:
            if e.seq < i:
                bad = (i, f"holds seq {e.seq} again where seq {i} belongs: a replayed or reordered entry")
            else:
                bad = (i, f"holds seq {e.seq} where seq {i} belongs: entry {i} was deleted or the "
                          "entries were reordered")
            break
        if raw[-_TRAILER_LEN:] != b',"hash":"' + e.hash.encode() + b'","sig":"' + e.sig.encode() + b'"}':
            bad = (i, "fields are not in the written order: edited")
            break
        if sha256(raw[:-_TRAILER_LEN] + b"}").hexdigest() != e.hash:
            bad = (i, "its content does not match its hash: the entry was edited")
            break
        if e.prev != prev:
            # Either entry i does not belong here, or entry i-1 was re-hashed after an edit
            # (then i-1's own signature no longer verifies): name the earlier one if so.
            if i > 0 and not _sig_ok(public_key, entries[-1]):
                entries.pop()
                bad = (i - 1, "its signature does not verify: the entry was forged or edited")
            else:
                bad = (i, "does not link to the entry before it (prev hash differs): an entry was "
                          "inserted, deleted or reordered")
            break
        entries.append(e)
        prev = sha256(raw).hexdigest()

    # One signature vouches for the chain below it; bisect only when it fails.
    if entries and not _sig_ok(public_key, entries[-1]):
        lo, hi = 0, len(entries) - 1  # entries[hi] is known bad; find the first bad
        while lo < hi:
            mid = (lo + hi) // 2
            if _sig_ok(public_key, entries[mid]):
                lo = mid + 1
            else:
                hi = mid
        reason = ("its signature does not verify with the pinned key "
                  f"{fp[:16]}...: the log was signed by another key" if hi == 0 else
                  "its signature does not verify with the pinned key: the entry was forged")
        bad = (hi, reason)
        del entries[hi:]
    if bad is None and torn is not None:
        bad = (len(entries), f"is torn: the file ends without a newline ({len(torn)} bytes of an "
                             "interrupted append)")
    ok = bad is None
    result = VerifyResult(
        file=str(path), ok=ok, n_entries=len(entries), key_fingerprint=fp,
        head=entries[-1].head if entries else None,
        first_bad_seq=None if ok else bad[0], line=None if ok else bad[0] + 1,
        reason="" if ok else f"entry {bad[0]} (line {bad[0] + 1}) {bad[1]}")
    return result, entries


def apply_anchors(result: VerifyResult, entries: list[AuditEntry],
                  anchors: Iterable[Anchor]) -> VerifyResult:
    """Check that the verified log contains every anchored (seq, hash), or hash alone; the
    earliest failure wins."""
    best: tuple[int, str] | None = None
    hashes: set[str] | None = None
    for a in anchors:
        if a.seq is None:  # only the hash was recorded: the entry may be anywhere
            if hashes is None:
                hashes = {e.hash for e in entries}
            if a.hash in hashes or not result.ok:
                continue  # found; or the log already failed, and so cannot tell where this was
            last = len(entries) - 1
            found = (len(entries), f"entry {len(entries)} (line {len(entries) + 1}) is missing: the log "
                                   f"ends at seq {last} and holds no entry with the hash "
                                   f"{a.hash[:16]}... recorded by {a.source}: the tail was truncated "
                                   "(or the log rewritten)")
        elif a.seq < len(entries):
            if entries[a.seq].hash != a.hash:
                found = (a.seq, f"entry {a.seq} (line {a.seq + 1}) differs from the hash {a.hash[:16]}... "
                                f"recorded by {a.source}: the log was rewritten")
            else:
                continue
        elif result.ok:
            last = len(entries) - 1
            found = (len(entries), f"entry {len(entries)} (line {len(entries) + 1}) is missing: the log "
                                   f"ends at seq {last} but {a.source} records seq {a.seq}: the tail "
                                   "was truncated")
        else:
            continue  # already failed earlier than this anchor can tell
        if best is None or found[0] < best[0]:
            best = found
    if best is None or (result.first_bad_seq is not None and result.first_bad_seq <= best[0]):
        return result
    kept = entries[:best[0]]
    return result.model_copy(update=dict(ok=False, n_entries=len(kept),
                                         head=kept[-1].head if kept else None,
                                         first_bad_seq=best[0], line=best[0] + 1, reason=best[1]))
