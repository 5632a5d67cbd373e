"""A real consortium on loopback: flower-superlink and flower-supernode processes, TLS, node auth.

Each test starts real processes (127.0.0.1 only) and stops every one of them in a finalizer, even
when it fails. Every Flower message starts a fresh flwr-clientapp process (seconds of imports),
so the cohort and the rounds are tiny. A killed node is noticed by the SuperLink only after two
missed heartbeats (Flower's fixed 30 s interval), which bounds the fault test from below.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from twinfed.cli.main import main
from twinfed.deploy import flower
from twinfed.deploy.launcher import LocalConsortium, plan_run_config

pytestmark = [pytest.mark.deploy, pytest.mark.slow]

SITES = ("site-a", "site-b", "site-c")
STUDY_TIMEOUT_S = 420.0
TINY = {"rounds": 2, "local_steps": 3, "hidden": 16}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    from twinfed.models.cohort import generate_cohort

    out = tmp_path_factory.mktemp("cohort")
    generate_cohort("glucose", sites=3, patients=20, days=1, seed=0, out=out)
    return out


def sites_of(cohort: Path, names=SITES) -> dict[str, Path]:
    return {n: cohort / n for n in names}


def study_plan(cohort: Path, **settings):
    from twinfed.server.settings import StudySettings

    return StudySettings(spec=str(cohort / "spec.toml"), **(TINY | settings)).plan()


def run_config(cohort: Path, out_dir: Path, plan) -> dict:
    return plan_run_config(plan, out_dir=out_dir, min_nodes=3)


@pytest.fixture
def consortium(tmp_path, cohort):
    """A factory of consortia; each is stopped at teardown and must leave no process behind."""
    made: list[LocalConsortium] = []

    def make(names=SITES, run_dir=None, state_root=None) -> LocalConsortium:
        c = LocalConsortium(run_dir or tmp_path / "run", sites_of(cohort, names),
                            state_root=state_root)
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop()
    for c in made:
        procs = [c.superlink, *c.nodes.values(), *c._others]
        assert not [p.name for p in procs if p is not None and p.alive()]


def wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def log_text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


# -- the study end to end (and, on the same SuperLink database, a second one) ----------------

def audit_entries(state_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (state_dir / "audit.jsonl").read_text().splitlines()
            if line.strip()]


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, cohort):
    """`twinfed deploy local`, 3 nodes x 2 rounds, through the CLI."""
    run = tmp_path_factory.mktemp("deployed") / "run"
    argv = ["deploy", "local", "--spec", str(cohort / "spec.toml"), "--out", str(run),
            "--rounds", "2", "--local-steps", "3", "--hidden", "16", "--timeout", str(STUDY_TIMEOUT_S)]
    for name in SITES:
        argv += ["--site", f"{name}={cohort / name}"]
    t0 = time.perf_counter()
    code = main(argv)
    seconds = time.perf_counter() - t0
    print(f"\n[timing] twinfed deploy local, 3 nodes x 2 rounds: {seconds:.1f} s")
    assert code == 0
    return SimpleNamespace(run=run, summary=json.loads((run / "summary.json").read_text()))


def test_deploy_local_writes_the_simulate_layout(deployed, cohort):
    from twinfed.governance.consent import granted, site_consent
    from twinfed.models.calibration import held_out
    from twinfed.models.plan import TrainingPlan

    summary, run = deployed.summary, deployed.run
    assert summary["rounds"] == 2 and summary["engine"] == "flwr-run"
    assert [h["sites_trained"] for h in summary["history"]] == [3, 3]
    plan = TrainingPlan.model_validate_json((run / "model" / "plan.json").read_text())
    assert plan.calibration is not None  # deploy local calibrates the intervals by default
    for name in SITES:
        site = summary["sites"][name]
        assert site["rounds_joined"] == 2 and site["release"]["patients_used"] == "dp-released"
        entries = audit_entries(run / "nodes" / name)
        exact = {e["details"]["patients_used"] for e in entries if e["event"] == "round_joined"}
        consented = sorted(granted(site_consent(cohort / name), plan.spec.purpose))
        calibrating = int(held_out(plan.sha256(), consented, plan.calibration.holdout_fraction).sum())
        assert len(consented) == 20 and 0 < calibrating < 20
        assert exact == {20 - calibrating}  # the exact count stays in the node's own log
        released = [e["details"] for e in entries if e["event"] == "aggregate_released"]
        # (a day of data is shorter than the identification window: all of them are excluded)
        assert [(r["kind"], r["patients_used"] + r["patients_excluded"]) for r in released] == \
            [("calibration", calibrating)]
        assert (run / "nodes" / name / "privacy_ledger.json").is_file()
    coordinator = (run / "coordinator" / "audit.jsonl").read_text()
    assert "patients_used" not in coordinator and "loss" not in coordinator
    assert {p.name for p in (run / "model").iterdir()} >= {"weights.npz", "spec.toml", "plan.json",
                                                          "calibration.json"}
    assert summary["privacy"]["secure_aggregation"] is True
    assert (run / "coordinator" / "audit.jsonl").is_file()


def test_deploy_local_logs_name_no_patient(deployed, cohort):
    logs = list((deployed.run / "deploy" / "logs").glob("*.log"))
    assert {p.stem for p in logs} >= {"superlink", "flwr-run", *(f"supernode-{n}" for n in SITES)}
    text = "\n".join(log_text(p) for p in logs)
    patient_ids = set()
    for name in SITES:
        lines = (cohort / name / "patients.csv").read_text().splitlines()[1:]
        patient_ids |= {ln.split(",")[0] for ln in lines}
    assert patient_ids and not [pid for pid in patient_ids if pid in text]


def test_deploy_local_leaves_keys_private(deployed):
    keys = [*(deployed.run / "deploy" / "certs").glob("*.key"),
            *(deployed.run / "deploy" / "keys").glob("*/supernode-auth.key")]
    assert len(keys) == 2 + len(SITES)
    assert all(p.stat().st_mode & 0o077 == 0 for p in keys)


@pytest.fixture(scope="module")
def second_study(deployed, cohort):
    """The SuperLink restarted on the first study's database, then a second study on the same
    nodes (its run in RUN/second: a run is never overwritten), which site-c's officer has not
    approved. The first study spent the sites' whole budget, so site-a's and site-b's officers
    raise it (audited); the plan accepts a sum of two sites."""
    from twinfed.governance.provision import provision_simulated_node

    plan = study_plan(cohort, rounds=1, secagg_min_sites=2)
    c = LocalConsortium(deployed.run, sites_of(cohort))
    try:
        for name in ("site-a", "site-b"):
            node = c.node_state(name)
            provision_simulated_node(node.state_dir, site_name=name, site_data=node.site_data,
                                     plan=plan, operator="operator:test")
            assert main(["ledger", "set-budget", "--state", str(node.state_dir), "--epsilon", "6",
                         "--actor", "officer:test"]) == 0
        c.prepare()
        c.start_superlink()
        enrolled = [c.enrol(n) for n in SITES]
        for name in SITES:
            c.start_node(name)
        c.wait_nodes_online()
        t0 = time.perf_counter()
        summary = c.run_study(run_config(cohort, deployed.run / "second", plan), timeout=STUDY_TIMEOUT_S,
                              log_name="flwr-run-2")
        print(f"\n[timing] second study after a SuperLink restart, 1 round: "
              f"{time.perf_counter() - t0:.1f} s")
        cp = flower.flwr_cli(["ls", flower.CONNECTION, "--format", "json"], c.cli_env)
    finally:
        c.stop()
    assert not [p.name for p in [c.superlink, *c.nodes.values(), *c._others] if p.alive()]
    return SimpleNamespace(summary=summary, enrolled=enrolled, plan=plan, runs=cp)


def test_a_second_study_runs_after_the_superlink_restarts_on_the_same_database(deployed,
                                                                               second_study):
    # The enrolments of the first study survived in the database: nothing new to enrol.
    assert second_study.enrolled == [None, None, None]
    assert [h["sites_trained"] for h in second_study.summary["history"]] == [2]
    # Both studies are in the SuperLink's own record ...
    cp = second_study.runs
    assert cp.returncode == 0, cp.stderr
    assert len(json.loads(cp.stdout[cp.stdout.find("{"):])["runs"]) == 2
    # ... and in each run's coordinator log and the nodes' logs, which verify together, run by run.
    from twinfed.governance.verify import verify_path

    first, second = deployed.summary["plan_sha256"], second_study.plan.sha256()
    for run, plan in ((deployed.run, first), (deployed.run / "second", second)):
        started = [e for e in audit_entries(run / "coordinator") if e["event"] == "study_started"]
        assert [e["details"]["plan_sha256"] for e in started] == [plan]
    assert {first, second} <= {e["details"].get("plan_sha256")
                               for e in audit_entries(deployed.run / "nodes" / "site-a")}
    for report in (verify_path(deployed.run),
                   verify_path(deployed.run / "second", node_states=deployed.run / "nodes")):
        assert report.ok, report.issues


def test_a_node_without_approval_refuses_and_the_study_goes_on(deployed, second_study):
    summary, plan = second_study.summary, second_study.plan
    assert summary["sites"]["site-c"]["rounds_refused"] == 1
    assert summary["sites"]["site-c"]["refusals"][0]["code"] == "plan_not_approved"
    assert summary["rounds_with_update"] == 1
    # The refusal is in the node's audit log and in the coordinator's.
    node = [e for e in audit_entries(deployed.run / "nodes" / "site-c")
            if e["details"].get("plan_sha256") == plan.sha256()]
    assert "plan_refused" in {e["event"] for e in node}
    aggregated = [e for e in audit_entries(deployed.run / "second" / "coordinator")
                  if e["event"] == "round_aggregated" and e["details"]["plan_sha256"] == plan.sha256()]
    assert list(aggregated[0]["details"]["sites_refused"]) == ["site-c"]


# -- who may connect ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def bare_link(tmp_path_factory, cohort):
    """A SuperLink with one enrolled key ("enrolled") and one that is not ("stranger")."""
    c = LocalConsortium(tmp_path_factory.mktemp("link") / "run",
                        {"enrolled": cohort / "site-a", "stranger": cohort / "site-b"})
    try:
        c.prepare()
        c.start_superlink()
        assert c.enrol("enrolled") is not None
        yield c
    finally:
        c.stop()
        assert not c.superlink.alive()


def test_a_node_whose_key_is_not_enrolled_is_refused(bare_link):
    node = bare_link.start_node("stranger")
    code = node.wait(timeout=60)
    assert code not in (None, 0), "the unenrolled SuperNode should exit with an error"
    assert "Failed to activate SuperNode" in log_text(node.log_path)
    assert bare_link.superlink.alive()
    statuses = flower.node_status(bare_link.cli_env)
    assert list(statuses.values()) == ["registered"], "only the enrolled key is known"


def test_an_enrolled_node_connects(bare_link):
    node = bare_link.start_node("enrolled")
    wait_for(lambda: "online" in flower.node_status(bare_link.cli_env).values(), 60,
             "the enrolled node to come online")
    assert node.alive()
    node.stop()


def test_plaintext_to_the_tls_port_gets_nothing(bare_link):
    node = bare_link.start_node("enrolled", insecure=True, log_name="supernode-plaintext",
                                extra_args=["--max-retries", "3", "--max-wait-time", "30"])
    code = node.wait(timeout=60)
    assert code not in (None, 0), "a plaintext SuperNode must not get through"
    # The TLS port answers plaintext with nothing: gRPC sees the server hang up, or (depending on
    # when the TLS handshake gives up) the connection reset; never a reply.
    log = log_text(node.log_path)
    assert "Server disconnected without sending a response" in log or "Connection reset by peer" in log, log
    # A raw plaintext HTTP request gets no HTTP answer either.
    with socket.create_connection(("127.0.0.1", bare_link.superlink_port), timeout=5) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        s.settimeout(5)
        try:
            reply = s.recv(4096)
        except (TimeoutError, ConnectionResetError):
            reply = b""
    assert not reply.startswith(b"HTTP/")
    # A TLS client that does not trust the consortium CA is refused in the handshake.
    ctx = ssl.create_default_context()
    with socket.create_connection(("127.0.0.1", bare_link.superlink_port), timeout=5) as s:
        with pytest.raises(ssl.SSLCertVerificationError):
            ctx.wrap_socket(s, server_hostname="127.0.0.1")


def test_a_port_in_use_is_a_one_line_error_naming_the_log(consortium):
    from twinfed.deploy.processes import DeployError

    c = consortium(names=("site-a",))
    c.prepare()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))  # bound, not listening: only the SuperLink's bind fails
        with pytest.raises(DeployError, match=r"could not bind .*in use.*superlink\.log") as err:
            c.start_superlink(port=taken.getsockname()[1])
    assert "\n" not in str(err.value)


# -- a node dies in the middle of a round ----------------------------------------------------

def test_a_node_killed_mid_round_is_dropped_and_rejoins_the_next_round(consortium, cohort,
                                                                     tmp_path):
    c = consortium()
    plan = study_plan(cohort, secagg_min_sites=2)  # a round may complete with 2 of the 3 sites
    c.provision(plan)
    c.start()
    out = tmp_path / "run"
    result: dict = {}

    def study():
        try:
            result["summary"] = c.run_study(run_config(cohort, out, plan), timeout=STUDY_TIMEOUT_S,
                                            watch_nodes=False)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            result["error"] = exc

    t0 = time.perf_counter()
    runner = threading.Thread(target=study, daemon=True)
    runner.start()
    victim_log = c.logs / "supernode-site-c.log"
    # SecAgg+ sends four train messages per round; the third (collect masked vectors) trains.
    # (The roll call before the study is a query message.) The kill waits for the training
    # message: this is a node lost mid-training; one lost before it shared its keys is
    # tests/test_privacy_study.py's.
    wait_for(lambda: log_text(victim_log).count("Receiving: train message") >= 3, 240,
             "site-c to start training in round 1")
    time.sleep(1.0)
    c.kill_node("site-c")
    killed_at = time.perf_counter()
    wait_for(lambda: "round 1/2:" in log_text(c.logs / "flwr-run.log"), 240,
             "round 1 to complete without site-c")
    round1_done = time.perf_counter()
    c.start_node("site-c")
    c.wait_node_active("site-c")
    runner.join(STUDY_TIMEOUT_S)
    assert not runner.is_alive(), "the study did not finish"
    assert "error" not in result, result.get("error")
    print(f"\n[timing] kill test: round 1 done {round1_done - killed_at:.1f} s after the kill; "
          f"whole study {time.perf_counter() - t0:.1f} s")

    summary = result["summary"]
    assert [h["sites_trained"] for h in summary["history"]] == [2, 3]
    assert summary["sites"]["site-c"]["rounds_joined"] == 1
    assert summary["sites"]["site-a"]["rounds_joined"] == 2
    # The killed node's privacy ledger is intact (written atomically) and within budget.
    from twinfed.privacy.ledger import LedgerState

    state = LedgerState.model_validate_json((c.state_root / "site-c" / "privacy_ledger.json").read_text())
    assert 2 <= len(state.segments) <= 3  # the counts, round 1 (reserved before the kill), round 2
    # Its audit log survived the kill: it verifies, with the coordinator's, and records round 2.
    from twinfed.governance.verify import verify_path

    report = verify_path(out)
    assert report.ok, report.issues
    joined = [e["details"]["round"] for e in audit_entries(out / "nodes" / "site-c")
              if e["event"] == "round_joined"]
    assert 2 in joined
