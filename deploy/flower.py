"""Flower's deployment commands as twinfed uses them (flwr 1.42; see FLOWER-NOTES.md).

Command lines for ``flower-superlink`` and ``flower-supernode`` (the same flags appear in
``deploy/compose.yaml`` and ``deploy/systemd/``), the ``flwr`` CLI's connection file, and node
enrolment. Everything here keeps Flower's own files in a ``FLWR_HOME`` we choose, never in the
user's ``~/.flwr``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from twinfed.deploy.processes import DeployError
from twinfed.deploy.supernode import DEFAULT_PULL_INTERVAL_S

CONNECTION = "twinfed"
BINARIES = ("flower-superlink", "twinfed-supernode", "flower-supernode", "flower-superexec", "flwr",
            "flwr-serverapp", "flwr-clientapp")
CLI_TIMEOUT_S = 60.0
# How often a SuperNode's SuperExec looks for a message to run (Flower's default: 1 s). Every
# message starts a flwr-clientapp process only when the SuperExec sees it, and a SecAgg+ round
# sends four messages to every node; a local look-up every 0.1 s costs nothing measurable.
TASK_POLL_INTERVAL_S = "0.1"


def flower_env(flwr_home: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every Flower process we start: ``FLWR_HOME`` set, telemetry off, the
    SuperExec's task poll at :data:`TASK_POLL_INTERVAL_S` (unless the caller's environment sets
    it), and this interpreter's ``bin/`` first on ``PATH`` (Flower starts its helpers by name)."""
    env = dict(os.environ if base is None else base)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bindir, *[p for p in env.get("PATH", "").split(os.pathsep)
                                             if p and p != bindir]])
    env["FLWR_HOME"] = str(flwr_home)
    # Flower sends anonymous usage events to its servers by default; a hospital node must not
    # phone home (and without internet each exit would wait for the event's time-out).
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", TASK_POLL_INTERVAL_S)
    return env


def check_binaries(env: Mapping[str, str]) -> None:
    missing = [b for b in BINARIES if shutil.which(b, path=env.get("PATH")) is None]
    if missing:
        raise DeployError(f"{', '.join(missing)} not found on PATH; install twinfed in a "
                          "virtualenv (make install) and run it from there, or put the "
                          "virtualenv's bin/ on PATH")


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def superlink_argv(*, tls: TlsFiles, database: Path, host: str, port: int) -> list[str]:
    """The coordinator's SuperLink: Fleet, Control and Runtime APIs over HTTPS on host:port, a
    persistent database, and only enrolled SuperNodes admitted."""
    return ["flower-superlink",
            "--ssl-ca-certfile", str(tls.ca_cert),
            "--ssl-certfile", str(tls.server_cert),
            "--ssl-keyfile", str(tls.server_key),
            "--database", str(database),
            "--enable-supernode-auth",
            # otherwise the SuperLink runs `uv sync` for each app, which needs the internet
            "--disable-runtime-dependency-installation",
            "--host", host, "--port", str(port)]


def node_config(*, site_name: str, site_data: Path, state_dir: Path) -> str:
    """``--node-config`` for a hospital node (values quoted: paths may contain spaces)."""
    def q(v) -> str:
        s = str(v)
        if '"' in s or "\\" in s:
            raise DeployError(f"node config value {s!r} contains a quote or backslash; rename it")
        return f'"{s}"'

    return (f"site-name={q(site_name)} site-data={q(Path(site_data).resolve())} "
            f"state-dir={q(Path(state_dir).resolve())}")


def supernode_argv(*, superlink: str, ca_cert: Path, auth_key: Path, node_config: str,
                   port: int, host: str = "127.0.0.1", insecure: bool = False,
                   pull_interval: float | None = None, extra: Sequence[str] = ()) -> list[str]:
    """A hospital's SuperNode: Flower's, through ``twinfed-supernode`` (asks for work every
    ``pull_interval`` seconds, default 0.25, instead of Flower's 3: see
    :mod:`twinfed.deploy.supernode`). ``port`` is its local runtime API (loopback only): several
    nodes on one host each need their own. ``insecure`` exists only to test that the SuperLink
    gives a plaintext client nothing: such a client sends no authentication key (Flower itself
    refuses to send one without TLS)."""

    if insecure:
        security = ["--insecure"]
    else:
        security = ["--root-certificates", str(ca_cert), "--auth-supernode-private-key",
                    str(auth_key)]
    return ["twinfed-supernode", "--pull-interval", f"{pull_interval or DEFAULT_PULL_INTERVAL_S:g}",
            *security,
            "--superlink", superlink,
            "--node-config", node_config,
            "--host", host, "--port", str(port), *extra]


def write_cli_connection(flwr_home: Path, *, address: str, ca_cert: Path,
                         name: str = CONNECTION) -> Path:
    """``$FLWR_HOME/config.toml`` with one default SuperLink connection for the ``flwr`` CLI."""
    flwr_home.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = flwr_home / "config.toml"
    path.write_text(f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\n'
                    f'address = "{address}"\nroot-certificates = "{Path(ca_cert).resolve()}"\n')
    return path


def flwr_cli(args: list[str], env: Mapping[str, str], *,
             timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["flwr", *args], env=dict(env), capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise DeployError(f"`flwr {args[0]} {args[1] if len(args) > 1 else ''}` did not answer "
                          f"within {timeout:.0f} s; is the SuperLink running?") from None
    except FileNotFoundError:
        raise DeployError("flwr not found on PATH; run twinfed from its virtualenv") from None


def _json_out(cp: subprocess.CompletedProcess) -> dict:
    start = cp.stdout.find("{")
    try:
        return json.loads(cp.stdout[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        return {}


def register_node(public_key: Path, env: Mapping[str, str], *, name: str,
                  connection: str = CONNECTION) -> int | None:
    """Enrol a SuperNode's public key; its node id, or ``None`` if it was already enrolled."""
    cp = flwr_cli(["supernode", "register", str(public_key), connection, "--name", name,
                   "--format", "json"], env)
    out = _json_out(cp)
    if cp.returncode == 0 and out.get("success"):
        return int(out["node-id"])
    msg = str(out.get("error-message") or out.get("error") or cp.stderr or cp.stdout).strip()
    if "already in use" in msg:
        return None
    raise DeployError(f"enrolling {name}'s key {public_key} failed: {msg.splitlines()[-1] if msg else cp.returncode}")


def node_status(env: Mapping[str, str], *, connection: str = CONNECTION) -> dict[int, str]:
    """Each enrolled node id with its status (``registered``, ``online``, ``offline``, ...)."""
    cp = flwr_cli(["supernode", "list", connection, "--format", "json"], env)
    out = _json_out(cp)
    if cp.returncode != 0 or not out.get("success"):
        raise DeployError(f"`flwr supernode list` failed: {(cp.stderr or cp.stdout).strip()[-300:]}")
    return {int(n["node-id"]): str(n["status"]) for n in out.get("nodes", [])}


def flwr_run_argv(app_dir: Path, run_config: Path, *, connection: str = CONNECTION) -> list[str]:
    return ["flwr", "run", str(app_dir), connection, "--run-config", str(run_config), "--stream"]
