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
STUDY_TIMEOUT_S = 3600.0
POLL_S = 0.5
# Two missed heartbeats at Flower's fixed 30 s interval, and a margin.
ACTIVATION_TIMEOUT_S = 90.0
RESTART_DELAY_S = 3.0
# What flower-supernode 1.42 logs once the SuperLink has activated it, and when it refuses to.
ACTIVATED = "SuperNode ID:"
REFUSED_ACTIVATION = "Failed to activate SuperNode"

# Whoever runs `deploy local` sets up the nodes' governance state for them, audited under this
# name (never passed off as a privacy officer's approval), as `twinfed simulate` does.
DEPLOY_OPERATOR = "operator:twinfed-deploy-local"


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


def plan_run_config(plan, *, out_dir: Path, min_nodes: int, pretrained: Path | None = None) -> dict:
    """The run config that makes the coordinator's ServerApp run exactly ``plan``: the plan
    travels whole, as its canonical JSON and hash (the nodes approve that hash, so a setting lost
    on the way would make every node refuse). Checked by reading it back the way the ServerApp
    will (``StudySettings``)."""
    from twinfed.server.settings import StudySettings

    cfg = {"plan": plan.canonical_json(), "plan-sha256": plan.sha256(),
           "out-dir": str(Path(out_dir).resolve()), "min-nodes": min_nodes}
    if pretrained is not None:
        cfg["pretrained"] = str(Path(pretrained).resolve())
    if StudySettings.from_run_config(cfg).plan().sha256() != plan.sha256():
        raise DeployError("the run config does not reproduce the study plan; update "
                          "twinfed.deploy.launcher")
    return cfg


def check_run_config_keys(run_config: dict, app_keys: set[str], app_dir: Path) -> None:
    """``flwr run`` accepts only keys the app declares in ``[tool.flwr.app.config]``."""
    unknown = sorted(set(run_config) - app_keys)
    if unknown:
        raise DeployError(f"the Flower App in {app_dir} does not declare run-config key(s) "
                          f"{', '.join(unknown)}; use the twinfed source tree of this version "
                          "(--app) or update its pyproject.toml")


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
        self._enrolled: set[str] = set()
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

    def node_state(self, name: str):
        from twinfed.client.node import NodeConfig

        return NodeConfig(site_name=name, site_data=self.sites[name],
                          state_dir=self.state_root / name)

    def provision(self, plan, *, operator: str = DEPLOY_OPERATOR) -> None:
        """Initialise each node's state (importing its site's consent.csv) and approve ``plan``,
        audited under ``operator``: what hospital IT and the privacy officer do on real nodes."""
        from twinfed.governance.provision import provision_simulated_node

        for name in self.sites:
            node = self.node_state(name)
            provision_simulated_node(node.state_dir, site_name=name, site_data=node.site_data,
                                     plan=plan, operator=operator, reimport_consent=True)

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
                if "already in use" in proc.log_since_start():
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
        """Enrol site ``name``'s key; its node id, or ``None`` if the database already had it."""
        node_id = flower.register_node(self.node_keys[name][1], self.cli_env, name=name)
        self._enrolled.add(name)
        return node_id

    def start_node(self, name: str, *, auth_key: Path | None = None, insecure: bool = False,
                   log_name: str | None = None, extra_args: Sequence[str] = ()) -> ManagedProcess:
        """Start site ``name``'s SuperNode. With ``log_name`` it is a probe (tests): kept apart
        from the study's nodes, and still stopped with the consortium."""
        assert self.certs is not None, "prepare() first"
        state = self.state_root / name
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        argv = flower.supernode_argv(
            superlink=self.address, ca_cert=self.certs.ca_cert,
            auth_key=auth_key or self.node_keys[name][0], insecure=insecure,
            node_config=flower.node_config(site_name=name, site_data=self.sites[name],
                                           state_dir=state),
            port=free_ports(1)[0], extra=extra_args)
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

    def wait_node_active(self, name: str, timeout: float = ACTIVATION_TIMEOUT_S) -> None:
        """Until site ``name``'s SuperNode is activated at the SuperLink.

        After an unclean stop (a crash, SIGKILL) the SuperLink holds the node as online until two
        heartbeats are missed (up to 60 s with Flower's fixed 30 s interval) and refuses to
        activate it again meanwhile: the SuperNode exits. Like a service manager restarting it,
        we start it again every few seconds until then."""
        deadline = time.monotonic() + timeout
        while True:
            proc = self.nodes[name]
            log = proc.log_since_start()
            if ACTIVATED in log:
                return
            if not proc.alive():
                # An unenrolled key is refused with the same message: never retry one.
                if (name not in self._enrolled or REFUSED_ACTIVATION not in log
                        or time.monotonic() > deadline):
                    raise proc.died_error("while connecting to the SuperLink")
                time.sleep(RESTART_DELAY_S)
                self.start_node(name)
                continue
            if time.monotonic() > deadline:
                raise DeployError(f"supernode {name} did not connect within {timeout:.0f} s; "
                                  f"see {proc.log_path}")
            self._check_processes("while nodes connect", watch_nodes=False)
            time.sleep(0.2)

    def wait_nodes_online(self, timeout: float = ACTIVATION_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        for name in self.nodes:
            self.wait_node_active(name, timeout=max(1.0, deadline - time.monotonic()))

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
                  log_name: str = "flwr-run", results: str = "summary.json") -> dict:
        """``flwr run`` the app with ``run_config``; the results (``results``: summary.json of a
        study, trial.json of a trial) the ServerApp wrote to its ``out-dir``. With
        ``watch_nodes=False`` a node may die (fault tests)."""
        import tomli_w

        app_dir = Path(app_dir or default_app_dir())
        out_dir = Path(run_config["out-dir"])
        cfg_path = self.deploy_dir / f"{log_name}-config.toml"
        cfg_path.write_text(tomli_w.dumps(run_config))
        summary_path = out_dir / results
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


def run_deployed_study(sites: dict[str, Path], run_dir: str | Path, plan, *,
                       pretrained: Path | None = None, app_dir: Path | None = None, state_root: Path | None = None,
                       approve_as: str | None = DEPLOY_OPERATOR, timeout: float = STUDY_TIMEOUT_S,
                       progress: Progress | None = None) -> dict:
    """Run ``plan`` on a consortium of ``sites`` on loopback, then stop everything; the summary.

    ``approve_as``: who initialises the node states and approves the plan (audited); ``None``
    leaves the node states as their officers left them (a node without approval refuses)."""
    from twinfed.privacy.secagg import check_secagg
    from twinfed.server.app import check_new_run

    check_secagg(plan, len(sites))
    check_new_run(Path(run_dir))
    app_dir = Path(app_dir or default_app_dir())
    run_config = plan_run_config(plan, out_dir=Path(run_dir), min_nodes=len(sites), pretrained=pretrained)
    return _in_consortium(sites, run_dir, plan, run_config, app_dir=app_dir, state_root=state_root,
                          approve_as=approve_as, timeout=timeout, progress=progress)


def _in_consortium(sites: dict[str, Path], run_dir, plan, run_config: dict, *, app_dir: Path,
                   state_root: Path | None, approve_as: str | None, timeout: float,
                   progress: Progress | None, results: str = "summary.json") -> dict:
    """Start a consortium of ``sites``, provision it for ``plan`` (unless ``approve_as`` is None),
    ``flwr run`` the app with ``run_config``, stop everything; the results file's content."""
    check_run_config_keys(run_config, app_run_config_keys(app_dir), app_dir)
    with sigterm_as_interrupt(), LocalConsortium(run_dir, sites, state_root=state_root,
                                                 progress=progress) as consortium:
        if approve_as is not None:
            consortium.provision(plan, operator=approve_as)
        consortium.start()
        return consortium.run_study(run_config, app_dir=app_dir, timeout=timeout, results=results)


def run_deployed_trial(sites: dict[str, Path], out_dir: str | Path, plan, model_dir: Path, *,
                       app_dir: Path | None = None, state_root: Path | None = None,
                       approve_as: str | None = DEPLOY_OPERATOR, timeout: float = STUDY_TIMEOUT_S,
                       progress: Progress | None = None) -> dict:
    """Run a federated in-silico trial (``plan``: a ``TrialPlan``) on a consortium of ``sites`` on
    loopback, the coordinator sending the twin of ``model_dir``; then stop everything. The
    results (``trial.json``)."""
    from twinfed.privacy.secagg import check_secagg
    from twinfed.server.trial import RESULTS_FILE, check_new_trial

    check_secagg(plan, len(sites))
    check_new_trial(Path(out_dir))
    app_dir = Path(app_dir or default_app_dir())
    run_config = {"trial-plan": plan.canonical_json(), "trial-plan-sha256": plan.sha256(),
                  "trial-model": str(Path(model_dir).resolve()), "out-dir": str(Path(out_dir).resolve()),
                  "min-nodes": len(sites)}
    return _in_consortium(sites, out_dir, plan, run_config, app_dir=app_dir, state_root=state_root,
                          approve_as=approve_as, timeout=timeout, progress=progress, results=RESULTS_FILE)


def site_map(sites: Sequence) -> dict[str, Path]:
    """``{name: data_dir}`` from ``SiteRef``-like objects, refusing duplicate names."""
    out: dict[str, Path] = {}
    for s in sites:
        if s.name in out:
            raise DeployError(f"two --site entries are named {s.name}; give each site a unique NAME")
        out[s.name] = Path(s.data_dir)
    return out
