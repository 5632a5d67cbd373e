"""``flwr run .`` as a Flower user types it, on a fresh FLWR_HOME: Flower's managed local SuperLink
(simulation, 2 SuperNodes by default). The study needs 3 (SecAgg+), so it must fail within a
minute or so with the one line that says how to get them, never wait forever. With the
documented set-up (no runtime dependency installation) nothing is installed; without it, the
managed SuperLink installs the app's dependencies with ``uv sync`` but torch resolves to the build
the set-up installed (pyproject's ``[tool.uv] exclude-dependencies``), never a CUDA download."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.studies]

REPO = Path(__file__).resolve().parents[1]
LOCAL_SUPERLINK_PORT = 39091  # Flower 1.42's managed local SuperLink (flwr.cli.local_superlink)


def _port_busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _stop_processes_under(path: Path) -> None:
    """The managed SuperLink outlives `flwr run`: stop every process started for this FLWR_HOME."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if str(path) in cmdline or f"FLWR_HOME={path}".encode() in environ:
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except OSError:
                pass


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


@pytest.mark.parametrize("install", [False, True], ids=["no-runtime-install", "runtime-install"])
def test_flwr_run_on_the_default_local_federation_fails_fast_with_what_to_do(tmp_path, install):
    if _port_busy(LOCAL_SUPERLINK_PORT):
        pytest.skip("a managed local Flower SuperLink is already running on this machine")
    if install and not _pypi_reachable():
        pytest.skip("the managed SuperLink installs the app's dependencies from PyPI, which is unreachable")
    home = tmp_path / "flwr-home"
    env = os.environ | {"FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
                        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", None)
    if not install:
        env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    t0 = time.monotonic()
    try:
        done = subprocess.run([str(Path(sys.executable).parent / "flwr"), "run", str(REPO), "--stream"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    finally:
        _stop_processes_under(home)
        deadline = time.monotonic() + 20
        while _port_busy(LOCAL_SUPERLINK_PORT) and time.monotonic() < deadline:
            time.sleep(0.5)  # the killed SuperLink's port is freed a moment later
    seconds = time.monotonic() - t0
    out = done.stdout + done.stderr
    errors = [line for line in out.splitlines() if line.startswith("twinfed: error:")]
    assert errors, out[-2000:]
    assert "has 2 SuperNode(s) online and this study needs 3" in errors[0]
    assert "--num-supernodes 3" in errors[0] and "secure-aggregation=false" in errors[0]
    assert seconds < (240 if install else 150), f"took {seconds:.0f} s"
    if not install:
        assert not (home / "runtime-envs").exists()  # nothing was installed with uv
    else:
        assert "App dependencies installed successfully" in out, out[-2000:]
        # Flower logs what uv installed ("Installed: [name==version, ...]"), then removes the env.
        [listed] = [line.split("Installed: [", 1)[1] for line in out.splitlines() if "Installed: [" in line]
        installed = {item.split("==")[0].strip().lower() for item in listed.rstrip("]").split(",")}
        assert "opacus" in installed and "torch" not in installed
        assert not any(name.startswith("nvidia") for name in installed)
