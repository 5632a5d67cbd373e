"""One long-running Flower process: started in its own process group, logged to a file, stopped.

Guarantees: the process and everything it started (Flower's ``flower-superexec``,
``flwr-serverapp`` and ``flwr-clientapp`` helpers, some of which open their own process groups)
get SIGTERM, then SIGKILL after a grace period; :meth:`ManagedProcess.stop` is idempotent and
safe to call from ``finally`` blocks. Children live in their own session, so a Ctrl-C in the
launcher's terminal reaches only the launcher, which then stops them in order.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from twinfed.errors import TwinfedError

STOP_GRACE_S = 10.0


class DeployError(TwinfedError):
    """A deployment process could not be started, died early, or timed out."""


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports that were free on ``host`` a moment ago (all held open together, so
    they differ); a process that then fails to bind one is reported with its log."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    except OSError as exc:
        raise DeployError(f"cannot find a free port on {host}: {exc.strerror}") from None
    finally:
        for s in socks:
            s.close()


def port_accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (from /proc), children before grandchildren."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read().decode(errors="replace")
        except OSError:
            continue
        # the command name may contain spaces and parentheses: fields follow the last ')'
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(0), []):
            out.append(child)
            todo.append(child)
    return out


class ManagedProcess:
    """A named process whose stdout and stderr go to ``log_path``."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, *,
                 env: Mapping[str, str] | None = None, cwd: Path | None = None):
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log_path = Path(log_path)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None
        self.log_start = 0

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            try:
                self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, env=self.env, cwd=self.cwd,
                                             start_new_session=True)
            except OSError as exc:
                raise DeployError(f"cannot start {self.name} ({self.argv[0]}): {exc.strerror}; "
                                  "is twinfed's virtualenv bin/ on PATH?") from None
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def died_error(self, when: str) -> DeployError:
        code = self.returncode
        hint = self.last_log_line()
        return DeployError(f"{self.name} exited with code {code} {when}; see {self.log_path}"
                           + (f" (last line: {hint})" if hint else ""))

    def check_alive(self, when: str) -> None:
        if not self.alive():
            raise self.died_error(when)

    def log_since_start(self) -> str:
        """What this run of the process logged (logs are appended across restarts)."""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(self.log_start)
                return fh.read().decode(errors="replace")
        except OSError:
            return ""

    def last_log_line(self, pattern: str | None = None) -> str:
        """The last non-empty log line (containing ``pattern`` if given), ANSI colours removed."""
        import re

        text = self.log_since_start()[-16384:]
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in text.splitlines()]
        lines = [ln for ln in lines if ln and not set(ln) <= set("│╭╮╰╯─ ")]
        if pattern:
            lines = [ln for ln in lines if pattern in ln]
        return lines[-1][:300] if lines else ""

    def wait(self, timeout: float) -> int | None:
        """The exit code, or ``None`` if still running after ``timeout`` seconds."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill_hard(self) -> None:
        """SIGKILL the whole process tree at once, as a power cut would (fault tests)."""
        if self.proc is None:
            return
        tree = descendants(self.proc.pid)
        self._signal_all(self.proc.pid, tree, signal.SIGKILL)
        self.proc.wait(timeout=STOP_GRACE_S)

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM the process, so Flower shuts down in order (a SuperNode tells the SuperLink
        it leaves); then SIGTERM whatever of its tree is left; SIGKILL all after ``grace``."""
        if self.proc is None:
            return
        pid = self.proc.pid
        tree = descendants(pid)
        if self.proc.poll() is None or any(_exists(p) for p in tree):
            deadline = time.monotonic() + grace
            if self.proc.poll() is None:
                try:
                    os.kill(pid, signal.SIGTERM)
                except OSError:
                    pass
                self._wait_until(lambda: self.proc.poll() is not None, deadline - grace / 2)
            tree = [p for p in {*tree, *descendants(pid)} if _exists(p)]
            self._signal_all(pid, tree, signal.SIGTERM)
            self._wait_until(lambda: self.proc.poll() is not None
                             and not any(_exists(p) for p in tree), deadline)
            tree = [p for p in {*tree, *descendants(pid)} if _exists(p)]
            self._signal_all(pid, tree, signal.SIGKILL)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
            pass

    @staticmethod
    def _wait_until(done, deadline: float) -> None:
        while time.monotonic() < deadline and not done():
            time.sleep(0.1)

    @staticmethod
    def _signal_all(pid: int, tree: list[int], sig: signal.Signals) -> None:
        groups = {pid}
        for p in tree:
            try:
                groups.add(os.getpgid(p))
            except OSError:
                pass
        # Never signal our own group (a helper that did not start its own session).
        own = os.getpgrp()
        for g in groups - {own}:
            try:
                os.killpg(g, sig)
            except OSError:
                pass
        for p in [pid, *tree]:
            try:
                os.kill(p, sig)
            except OSError:
                pass


def _exists(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except OSError:
        return False
