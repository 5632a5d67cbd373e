"""One exclusive lock per state directory, held around every read-modify-write of its state.

A node's state (privacy ledger, consent registry, approvals, study calibrations) is changed by
several processes: officers' commands, a deployed node's one process per message, two studies on
one node. Each change reads a file, decides, and writes it back; without a lock two writers both
read the old file and one change is lost (a withdrawal, a revocation, a privacy spend). So every
such change runs under :func:`state_lock`, an ``fcntl.flock`` on ``<state>/.lock``:

- exclusive across processes and threads (each call opens its own file description);
- released by the kernel when the holder dies, so a killed process never leaves it held;
- not re-entrant: code that holds it calls the ``*_locked`` variants, never the locking ones.

The audit log has its own lock on ``audit.jsonl`` (appends only); it is always taken *inside*
this one, never the other way round, so the two cannot deadlock.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from twinfed.atomic import os_reason
from twinfed.errors import NodeStateError

LOCK_FILE = ".lock"
# Long enough for any state change (they take milliseconds), short enough that a stuck holder
# becomes an error a person can act on rather than a silent hang.
DEFAULT_TIMEOUT_S = 120.0
_POLL_S = 0.01


@contextmanager
def state_lock(state_dir: str | Path, *, timeout: float = DEFAULT_TIMEOUT_S) -> Iterator[None]:
    """Hold the state directory's exclusive lock for the ``with`` block."""
    path = Path(state_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except FileNotFoundError:
        raise NodeStateError(f"{state_dir}: no such state directory; run 'twinfed node init "
                             f"--state {state_dir}' first") from None
    except OSError as exc:
        raise NodeStateError(f"{path}: cannot open the state lock: {os_reason(exc)}") from None
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise NodeStateError(f"{path}: cannot take the state lock: {os_reason(exc)}") from None
                if time.monotonic() >= deadline:
                    raise NodeStateError(
                        f"{state_dir}: another twinfed process has held the state lock for over "
                        f"{timeout:g} s; wait for it to finish or stop it") from None
                time.sleep(_POLL_S)
        yield
    finally:
        os.close(fd)  # releases the lock
