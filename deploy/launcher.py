"""A whole consortium on one machine: a real SuperLink and one real SuperNode per site, on loopback.

``twinfed deploy local`` runs a study this way and leaves ``RUN_DIR`` in the layout of
``twinfed simulate`` (``summary.json``, ``model/``, ``nodes/<site>/``), plus ``RUN_DIR/deploy/``:

    deploy/certs/            consortium CA and SuperLink certificate (keys 0600)
    deploy/keys/<site>/      each node's authentication key pair (private key 0600)
    deploy/superlink.db      the SuperLink's persistent state (enrolled nodes, runs)
    deploy/flwr/<process>/   FLWR_HOME of each Flower process (installed app bundles)
    deploy/logs/<process>.log  Flower's own logs: counts, ids and timings, never patient data
    deploy/run-config.toml   the study's run config as given to ``flwr run``

Guarantees: TLS and SuperNode authentication are always on; every process started here is
stopped (SIGTERM, then SIGKILL) when the study ends, fails, or is interrupted (Ctrl-C or
SIGTERM); a process that dies early is named with its log in a one-line error.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from twinfed.deploy import flower
from twinfed.deploy.certs import ConsortiumCerts, make_consortium_certs, make_node_auth_key
from twinfed.deploy.processes import DeployError, ManagedProcess, free_ports, port_accepts

Progress = Callable[[str], None]

LOOPBACK = "127.0.0.1"
SUPERLINK_START_TIMEOUT_S = 60.0
NODES_ONLINE_TIMEOUT_S = 90.0
STUDY_TIMEOUT_S = 3600.0
POLL_S = 0.5

# `twinfed simulate`'s study flags (argparse dest) -> the Flower App's run-config keys.
FLAG_KEYS = {
    "rounds": "rounds", "seed": "seed", "hidden": "hidden", "layers": "layers",
    "local_steps": "local-steps", "batch_size": "batch-size", "lr": "learning-rate",
    "epsilon": "epsilon", "delta": "delta", "clip": "clip", "accountant": "accountant",
    "no_dp": "no-dp", "no_secagg": "no-secagg",
}


def default_app_dir() -> Path:
    """The Flower App ``flwr run`` bundles: the twinfed source tree (its ``pyproject.toml`` has
    ``[tool.flwr.app]``). The nodes import their *installed* twinfed; the bundle carries the app's
    identity and run-config defaults."""
    import twinfed

    root = Path(twinfed.__file__).resolve().parent.parent
    if not _app_config_path(root):
        raise DeployError(f"no Flower App at {root} (pyproject.toml with [tool.flwr.app]); pass "
                          "--app with the directory of twinfed's pyproject.toml")
    return root


def _app_config_path(app_dir: Path) -> Path | None:
    p = app_dir / "pyproject.toml"
    try:
        cfg = tomllib.loads(p.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    return p if "app" in cfg.get("tool", {}).get("flwr", {}) else None


def app_run_config_keys(app_dir: Path) -> set[str]:
    p = _app_config_path(app_dir)
    if p is None:
        raise DeployError(f"{app_dir} is not a Flower App (no [tool.flwr.app] in pyproject.toml)")
    return set(tomllib.loads(p.read_text())["tool"]["flwr"]["app"].get("config", {}))


def study_run_config(app_keys: set[str], *, spec: str, out_dir: Path, min_nodes: int,
                     flags: dict, defaults: dict) -> dict:
    """The run config for ``flwr run`` from the study flags. A key the app does not declare is
    left out when its flag has its default, and is an error otherwise (``flwr run`` would reject
    it, and silently dropping a privacy setting is not an option)."""
    cfg = {"spec": spec, "out-dir": str(Path(out_dir).resolve()), "min-nodes": min_nodes}
    for dest, key in FLAG_KEYS.items():
        if dest in flags:
            cfg[key] = flags[dest]
    out = {}
    for key, value in cfg.items():
        if key in app_keys:
            out[key] = value
            continue
        dest = next((d for d, k in FLAG_KEYS.items() if k == key), None)
        if dest is not None and defaults.get(dest) == value:
            continue
        flag = "--" + (dest or key).replace("_", "-")
        raise DeployError(f"this twinfed app has no run-config key {key!r}, so {flag} cannot "
                          "reach the coordinator; leave it at its default or update twinfed")
    return out


class LocalConsortium:
    """A SuperLink and SuperNodes for ``sites`` (``{name: data_dir}``) on loopback.

    Use as a context manager: leaving it stops every process. Tests drive the steps one by one
    (kill a node, restart the SuperLink); :func:`run_deployed_study` runs them all.
    """

    def __init__(self, run_dir: str | Path, sites: dict[str, Path], *,
                 state_root: Path | None = None, progress: Progress | None = None):
        self.run_dir = Path(run_dir).resolve()
        self.sites = {n: Path(d).resolve() for n, d in sites.items()}
        self.state_root = Path(state_root or self.run_dir / "nodes").resolve()
        self.deploy_dir = self.run_dir / "deploy"
        self.logs = self.deploy_dir / "logs"
        self.database = self.deploy_dir / "superlink.db"
        self.progress = progress or (lambda _m: None)
        self.cli_env = flower.flower_env(self.deploy_dir / "flwr" / "cli")
        self.certs: ConsortiumCerts | None = None
        self.node_keys: dict[str, tuple[Path, Path]] = {}
        self.superlink: ManagedProcess | None = None
        self.superlink_port: int | None = None
        self.nodes: dict[str, ManagedProcess] = {}
        self._others: list[ManagedProcess] = []
        self._lock = threading.Lock()

    # -- set-up ------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Certificates and node keys under ``deploy/`` (kept when they exist: a second study
        in the same RUN_DIR talks to the same, already enrolled, nodes)."""
        flower.check_binaries(self.cli_env)
        for name, d in self.sites.items():
            if not d.is_dir():
                raise DeployError(f"site {name}: {d} is not a directory")
        self.logs.mkdir(parents=True, exist_ok=True)
        certs_dir = self.deploy_dir / "certs"
        if (certs_dir / "superlink.key").exists():
            self.certs = ConsortiumCerts(
                ca_cert=certs_dir / "ca.crt", ca_key=certs_dir / "ca.key",
                server_cert=certs_dir / "superlink.crt", server_key=certs_dir / "superlink.key",
                hosts=("localhost", LOOPBACK), new_ca=False)
        else:
            self.certs = make_consortium_certs(certs_dir, [LOOPBACK])
        for name in self.sites:
            self.node_keys[name] = self.node_key(name)

    def node_key(self, name: str) -> tuple[Path, Path]:
        d = self.deploy_dir / "keys" / name
        priv = d / "supernode-auth.key"
        if priv.exists():
            return priv, Path(f"{priv}.pub")
        return make_node_auth_key(d)

    @property
    def address(self) -> str:
        if self.superlink_port is None:
            raise DeployError("the SuperLink is not started")
        return f"{LOOPBACK}:{self.superlink_port}"

    def start_superlink(self, port: int | None = None) -> ManagedProcess:
        assert self.certs is not None, "prepare() first"
        port = port or self.superlink_port or free_ports(1)[0]
        argv = flower.superlink_argv(
            tls=flower.TlsFiles(self.certs.ca_cert, self.certs.server_cert, self.certs.server_key),
            database=self.database, host=LOOPBACK, port=port)
        proc = ManagedProcess("superlink", argv, self.logs / "superlink.log",
                              env=flower.flower_env(self.deploy_dir / "flwr" / "superlink"),
                              cwd=self.deploy_dir)
        with self._lock:
            self.superlink, self.superlink_port = proc.start(), port
        deadline = time.monotonic() + SUPERLINK_START_TIMEOUT_S
        while not port_accepts(LOOPBACK, port):
            if not proc.alive():
                if "address already in use" in proc.last_log_line().lower() or \
                        proc.last_log_line("already in use"):
                    raise DeployError(f"the SuperLink could not bind {LOOPBACK}:{port} (in use); "
                                      f"free the port or retry; see {proc.log_path}")
                raise proc.died_error("while starting")
            if time.monotonic() > deadline:
                raise DeployError(f"the SuperLink did not open {LOOPBACK}:{port} within "
                                  f"{SUPERLINK_START_TIMEOUT_S:.0f} s; see {proc.log_path}")
            time.sleep(0.2)
        flower.write_cli_connection(self.deploy_dir / "flwr" / "cli", address=self.address,
                                    ca_cert=self.certs.ca_cert)
        return proc

    def enrol(self, name: str) -> int | None:
        return flower.register_node(self.node_keys[name][1], self.cli_env, name=name)

    def start_node(self, name: str, *, auth_key: Path | None = None, insecure: bool = False,
                   log_name: str | None = None) -> ManagedProcess:
        assert self.certs is not None, "prepare() first"
        state = self.state_root / name
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        argv = flower.supernode_argv(
            superlink=self.address, ca_cert=self.certs.ca_cert,
            auth_key=auth_key or self.node_keys[name][0], insecure=insecure,
            node_config=flower.node_config(site_name=name, site_data=self.sites[name],
                                           state_dir=state),
            port=free_ports(1)[0])
        proc = ManagedProcess(f"supernode {name}", argv,
                              self.logs / f"{log_name or 'supernode-' + name}.log",
                              env=flower.flower_env(self.deploy_dir / "flwr" / name),
                              cwd=self.deploy_dir)
        with self._lock:
            if log_name:
                self._others.append(proc)
            else:
                old = self.nodes.get(name)
                if old is not None and old.alive():
                    raise DeployError(f"supernode {name} is already running")
                self.nodes[name] = proc
        return proc.start()

    def wait_nodes_online(self, count: int | None = None,
                          timeout: float = NODES_ONLINE_TIMEOUT_S) -> None:
        """Until ``count`` enrolled nodes (default: all sites) are online at the SuperLink."""
        count = len(self.sites) if count is None else count
        deadline = time.monotonic() + timeout
        while True:
            self._check_processes("before the study", watch_nodes=True)
            online = sum(1 for s in flower.node_status(self.cli_env).values() if s == "online")
            if online >= count:
                return
            if time.monotonic() > deadline:
                raise DeployError(f"only {online} of {count} SuperNodes came online within "
                                  f"{timeout:.0f} s; see the logs in {self.logs}")
            time.sleep(POLL_S)

    def start(self) -> None:
        """Everything up to a study: keys, SuperLink, enrolment, nodes online."""
        self.prepare()
        self.start_superlink()
        self.progress(f"SuperLink on https://{self.address} (TLS, node authentication on)")
        for name in self.sites:
            self.enrol(name)
        for name in self.sites:
            self.start_node(name)
        self.wait_nodes_online()
        self.progress(f"{len(self.sites)} SuperNodes enrolled and online")

    # -- a study -----------------------------------------------------------------------------

    def run_study(self, run_config: dict, *, app_dir: Path | None = None,
                  timeout: float = STUDY_TIMEOUT_S, watch_nodes: bool = True,
                  log_name: str = "flwr-run") -> dict:
        """``flwr run`` the app with ``run_config``; the summary the ServerApp wrote to its
        ``out-dir``. With ``watch_nodes=False`` a node may die (fault tests)."""
        import tomli_w

        app_dir = Path(app_dir or default_app_dir())
        out_dir = Path(run_config["out-dir"])
        cfg_path = self.deploy_dir / f"{log_name}-config.toml"
        cfg_path.write_text(tomli_w.dumps(run_config))
        summary_path = out_dir / "summary.json"
        summary_path.unlink(missing_ok=True)
        run = ManagedProcess("flwr run", flower.flwr_run_argv(app_dir, cfg_path),
                             self.logs / f"{log_name}.log", env=self.cli_env, cwd=self.deploy_dir)
        with self._lock:
            self._others.append(run)
        run.start()
        deadline = time.monotonic() + timeout
        offset = 0
        try:
            while run.alive():
                offset = self._relay_rounds(run.log_path, offset)
                self._check_processes("during the study", watch_nodes=watch_nodes)
                if time.monotonic() > deadline:
                    raise DeployError(f"the study did not finish within {timeout:.0f} s; see "
                                      f"{run.log_path} and {self.logs}/superlink.log")
                time.sleep(POLL_S)
            self._relay_rounds(run.log_path, offset)
        finally:
            run.stop()
        if not summary_path.is_file():
            hint = run.last_log_line("rror") or run.last_log_line()
            raise DeployError(f"the study did not finish (no {summary_path.name}; flwr run exited "
                              f"{run.returncode}); see {run.log_path}"
                              + (f" (last line: {hint})" if hint else ""))
        return json.loads(summary_path.read_text())

    def _relay_rounds(self, log_path: Path, offset: int) -> int:
        """Pass the coordinator's one-line round reports on to ``progress``."""
        try:
            with open(log_path, "rb") as fh:
                fh.seek(offset)
                chunk = fh.read()
        except OSError:
            return offset
        end = chunk.rfind(b"\n") + 1
        for line in chunk[:end].decode(errors="replace").splitlines():
            if line.startswith("round "):
                self.progress(line.strip())
        return offset + end

    def _check_processes(self, when: str, *, watch_nodes: bool) -> None:
        if self.superlink is not None:
            self.superlink.check_alive(when)
        if watch_nodes:
            for proc in list(self.nodes.values()):
                proc.check_alive(when)

    # -- faults and shut-down ----------------------------------------------------------------

    def kill_node(self, name: str) -> None:
        self.nodes[name].kill_hard()

    def stop_superlink(self) -> None:
        if self.superlink is not None:
            self.superlink.stop()

    def stop(self) -> None:
        """Stop every process this consortium started: runs, nodes, then the SuperLink."""
        with self._lock:
            procs = [*self._others, *self.nodes.values(),
                     *([self.superlink] if self.superlink else [])]
        with _signals_deferred():  # a second Ctrl-C must not leave processes behind
            for proc in procs:
                try:
                    proc.stop()
                except Exception:  # keep stopping the others whatever one does  # noqa: BLE001
                    pass

    def __enter__(self) -> LocalConsortium:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@contextmanager
def _signals_deferred() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt while a study runs, so ``finally`` blocks stop the
    consortium (a no-op outside the main thread, where signals cannot be handled)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(_sig, _frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_deployed_study(sites: dict[str, Path], run_dir: str | Path, run_config: dict, *,
                       app_dir: Path | None = None, state_root: Path | None = None,
                       timeout: float = STUDY_TIMEOUT_S, progress: Progress | None = None) -> dict:
    """Start a consortium for ``sites`` on loopback, run one study, stop everything; the summary.

    ``run_config`` needs at least ``out-dir``; the other keys are the app's (see
    :func:`study_run_config`)."""
    with sigterm_as_interrupt(), LocalConsortium(run_dir, sites, state_root=state_root,
                                                 progress=progress) as consortium:
        consortium.start()
        return consortium.run_study(run_config, app_dir=app_dir, timeout=timeout)


def site_map(sites: Sequence) -> dict[str, Path]:
    """``{name: data_dir}`` from ``SiteRef``-like objects, refusing duplicate names."""
    out: dict[str, Path] = {}
    for s in sites:
        if s.name in out:
            raise DeployError(f"two --site entries are named {s.name}; give each site a unique NAME")
        out[s.name] = Path(s.data_dir)
    return out
