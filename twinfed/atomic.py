"""Durable whole-file writes: after a crash a file holds either its old content or its new one.

The recipe is the classic one: write a temporary file in the same directory, flush and fsync it,
``os.replace`` it over the target (atomic on POSIX within one file system), then fsync the
directory so the rename itself survives a power cut. Nothing here knows what the bytes mean.

Files are private by default (mode 0600, new directories 0700): the writers here keep state
(a node's registry, approvals, ledger), so a caller that writes for others (a report, a public
key) passes its mode. A write that fails (permissions, a full disk) raises :class:`WriteError`,
naming the file and the system's reason, and leaves the previous file as it was.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path

from twinfed.errors import TwinfedError

FILE_MODE = 0o600
DIR_MODE = 0o700


class WriteError(TwinfedError, OSError):
    """A file or directory could not be written (permissions, a full disk, a file in the way).

    Also an :class:`OSError`, so code that handled the system's error still handles this one.
    """


def os_reason(exc: OSError) -> str:
    """What the system said, and what to do about it, for the end of a one-line message."""
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied; check the directory's permissions"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the device; free some space and run the command again"
    if exc.errno == errno.EROFS:
        return "read-only file system; use a writable directory"
    return (exc.strerror or str(exc)).lower()


def cannot_write(path: str | Path, exc: OSError) -> str:
    """``cannot write <path>: <reason>``, the message of every failed write."""
    return f"cannot write {path}: {os_reason(exc)}"


def make_dir(path: str | Path, *, mode: int = DIR_MODE) -> Path:
    """``path`` as an existing directory, created (with its missing parents) if need be; only a
    directory made here gets ``mode``. :class:`WriteError` if something else is in the way."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True, mode=mode)
    except (FileExistsError, NotADirectoryError):
        raise WriteError(f"cannot write {path}: a file is in the way where a directory belongs; "
                         "name a directory") from None
    except OSError as exc:
        raise WriteError(cannot_write(path, exc)) from None
    return path


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of ``data`` to ``fd`` (``os.write`` may write fewer)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def fsync_dir(path: str | Path) -> None:
    """Make a directory's entries (a create, a rename) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | Path, data: bytes, *, mode: int = FILE_MODE) -> None:
    """Replace ``path`` with ``data`` atomically and durably; the file gets ``mode``.

    :class:`WriteError` naming ``path`` if it cannot be written; the old file is then untouched.
    """
    path = Path(path)
    make_dir(path.parent)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            os.fchmod(fd, mode)
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        tmp = None
        fsync_dir(path.parent)
    except IsADirectoryError:
        raise WriteError(f"cannot write {path}: a directory is in the way; move it aside") from None
    except OSError as exc:
        raise WriteError(cannot_write(path, exc)) from None
    finally:
        if tmp is not None:
            try:
                Path(tmp).unlink(missing_ok=True)
            except OSError:
                pass  # the directory refuses even that; the message already names the file


def write_json_atomic(path: str | Path, obj, *, mode: int = FILE_MODE) -> None:
    """Replace ``path`` with ``obj`` as indented JSON, atomically and durably."""
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"
    write_bytes_atomic(path, text.encode("utf-8"), mode=mode)
