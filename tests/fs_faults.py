"""File-system faults for tests: a read-only directory, a full disk.

``read_only`` really removes the write bits (``chmod -R a-w``) and, when the tests run as root
(whom modes do not stop), also makes the system calls twinfed's writers use fail with EACCES as
the kernel would for anyone else. ``disk_full`` makes ``os.write`` to files under a directory
fail with ENOSPC after ``room`` bytes. Both patch through ``monkeypatch``: undone when the test
ends, or at once with ``monkeypatch.undo()``.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _under(path, tops: list[Path]) -> bool:
    p = Path(os.path.abspath(path))
    return any(p == t or t in p.parents for t in tops)


def _denied(path) -> PermissionError:
    return PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))


def read_only(monkeypatch, *paths: Path, files: bool = True) -> None:
    """Each path, and everything below it, made read-only; ``files=False``: the directories only
    (the files in them stay writable)."""
    for top in paths:
        for p in [top, *top.rglob("*")]:
            if not p.is_symlink() and (files or p.is_dir()):
                os.chmod(p, stat.S_IMODE(p.stat().st_mode) & ~0o222)
    if os.geteuid() == 0:
        _enforce_modes(monkeypatch, [Path(os.path.abspath(t)) for t in paths])


def _enforce_modes(monkeypatch, tops: list[Path]) -> None:
    """What the kernel checks for a user without CAP_DAC_OVERRIDE, on the calls our writers make."""
    real_open, real_mkdir, real_replace, real_unlink = os.open, os.mkdir, os.replace, os.unlink

    def writable(path) -> bool:
        return bool(os.stat(path).st_mode & stat.S_IWUSR)

    def check_entry(path) -> None:  # creating, renaming or removing an entry in its directory
        if _under(path, tops) and not writable(os.path.dirname(os.path.abspath(path))):
            raise _denied(path)

    def fake_open(path, flags, mode=0o777, *, dir_fd=None):
        if dir_fd is None and flags & _WRITE_FLAGS and _under(path, tops):
            if os.path.lexists(path):
                if not writable(path):
                    raise _denied(path)
            elif flags & os.O_CREAT:
                check_entry(path)
        return real_open(path, flags, mode, dir_fd=dir_fd)

    def fake_mkdir(path, mode=0o777, *, dir_fd=None):
        if dir_fd is None and not os.path.lexists(path):
            check_entry(path)
        return real_mkdir(path, mode, dir_fd=dir_fd)

    def fake_replace(src, dst, *, src_dir_fd=None, dst_dir_fd=None):
        check_entry(dst)
        return real_replace(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)

    def fake_unlink(path, *, dir_fd=None):
        if dir_fd is None:
            check_entry(path)
        return real_unlink(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)
    monkeypatch.setattr(os, "replace", fake_replace)
    monkeypatch.setattr(os, "unlink", fake_unlink)


def disk_full(monkeypatch, root: Path, *, room: int = 0) -> None:
    """Writes to files under ``root`` fail with ENOSPC once ``room`` more bytes are written; the
    write that crosses it is cut short, as on a real disk."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc/self/fd to tell which file a write goes to")
    top = [Path(os.path.realpath(root))]
    left = [room]
    real_write = os.write

    def fake_write(fd, data):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if not target.startswith("/") or not _under(target, top):
            return real_write(fd, data)
        if left[0] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = real_write(fd, bytes(data[:left[0]]))
        left[0] -= n
        return n

    monkeypatch.setattr(os, "write", fake_write)
