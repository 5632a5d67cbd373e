"""Consortium soak: one long study on a real local consortium while SuperNodes are SIGKILLed and
restarted (``python -m bench.soak [--rounds N] [--kill-every K] [--quick] [--workdir DIR]``).

A tiny glucose cohort (3 sites x 10 patients, 1 day) is generated; a real SuperLink (TLS,
SuperNode authentication, persistent database) and one real SuperNode per site start on loopback
through :class:`twinfed.deploy.launcher.LocalConsortium`; one study of ``rounds`` rounds runs with
DP and SecAgg+ on (hidden 16, 3 local steps). In rounds ``kill_every``, ``2*kill_every``, ...
(only rounds that have a later round, so every restarted node has a round left to rejoin) one
SuperNode, rotating over the sites, is SIGKILLed with its whole process tree as soon as its own
audit log shows it received the round's model (i.e. while it trains); once the coordinator has
aggregated that round without it, the node is started again, as a service manager would, and we
wait until the SuperLink has activated it.

Everything is read from what the product writes: the coordinator's signed audit log
(``RUN/coordinator/audit.jsonl``: ``round_started`` / ``round_aggregated``, with the sites that
replied and refused), the nodes' audit logs, ``summary.json``, the privacy ledgers, and
:func:`twinfed.governance.verify.verify_path` over the run directory. Every process started is
stopped at the end, also on failure, Ctrl-C or SIGTERM, and the module checks that no process with
this run's ``FLWR_HOME`` is left.

``run()`` returns figures ``{"soak.<name>": {"value", "unit", "conditions"}}`` (no targets: DESIGN.md
sets none for the soak). ``soak.study_completed`` is 0 with the error in its conditions when the
study did not finish; the figures then describe the rounds that did. The work directory defaults
to ``bench/results/work/soak`` (``soak-quick`` with ``--quick``) and is replaced on each run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
SITES = ("site-a", "site-b", "site-c")
PATIENTS_PER_SITE = 10
DAYS = 1
SEED = 0
HIDDEN = 16
LOCAL_STEPS = 3
QUICK_ROUNDS, QUICK_KILL_EVERY = 3, 2

# Bounds. A killed node is noticed by the SuperLink after two missed 30 s heartbeats, so a round
# with a kill takes a minute longer than the others; a round on this 2-core machine takes tens of
# seconds. Every wait below is bounded by one of these.
ROUND_WAIT_S = 480.0  # for any one round to start, reach the victim, or be aggregated
REJOIN_WAIT_S = 240.0  # for a restarted SuperNode to be activated again
STUDY_BASE_S = 900.0  # flwr run's limit: this plus STUDY_PER_ROUND_S a round
STUDY_PER_ROUND_S = 300.0
JOIN_GRACE_S = 120.0  # for the study thread to return once flwr run has ended
POLL_S = 0.25
MARKER = ".twinfed-soak"  # a work directory holding this file is ours to replace


def _progress(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _fig(value: float, unit: str, conditions: dict | None = None) -> dict:
    return {"value": float(value), "unit": unit, "conditions": dict(conditions or {})}


def _audit(path: Path) -> list[dict]:
    """The complete entries of an audit log (a line still being written is skipped)."""
    try:
        raw = path.read_bytes()
    except OSError:
        return []
    out = []
    for line in raw[: raw.rfind(b"\n") + 1].splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _events(path: Path, event: str, round_: int | None = None) -> list[dict]:
    return [e for e in _audit(path) if e.get("event") == event
            and (round_ is None or e.get("details", {}).get("round") == round_)]


def _time(entry: dict) -> float:
    return datetime.fromisoformat(entry["time"]).timestamp()


def _wait(predicate, timeout: float, what: str, alive=lambda: True):
    """``predicate()``'s first truthy value; raises on time-out or when ``alive()`` turns false."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if not alive():
            raise RuntimeError(f"the study ended while waiting for {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(POLL_S)


def _prepare_workdir(root: Path) -> None:
    if root.exists():
        if not (root / MARKER).exists() and any(root.iterdir()):
            raise RuntimeError(f"{root} exists and is not a soak work directory; pass an empty or "
                               "new --workdir")
        shutil.rmtree(root)
    root.mkdir(parents=True)
    (root / MARKER).write_text("bench.soak work directory: replaced by each soak run\n")


def _leftover_processes(flwr_root: Path) -> list[int]:
    """Live processes whose FLWR_HOME lies under this run's deploy directory (every Flower process
    the consortium started, and their helpers, inherit it)."""
    needle = f"FLWR_HOME={flwr_root}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                env = fh.read()
            with open(f"/proc/{entry}/stat", "rb") as fh:
                state = fh.read().rsplit(b")", 1)[-1].split()[0]
        except OSError:
            continue
        if state != b"Z" and any(v.startswith(needle) for v in env.split(b"\0")):
            found.append(int(entry))
    return found


def run(ws=None, sizes=None, *, rounds: int = 20, kill_every: int = 4, quick: bool = False,
        workdir: Path | None = None) -> dict:
    """Run the soak; figures as described in the module docstring. ``ws, sizes``: as
    ``python -m bench`` calls every section (quick sizes mean ``quick``)."""
    quick = quick or getattr(sizes, "name", "") == "quick"
    from twinfed.deploy.launcher import LocalConsortium, plan_run_config, sigterm_as_interrupt
    from twinfed.models.cohort import generate_cohort
    from twinfed.server.settings import StudySettings

    if quick:
        rounds, kill_every = min(rounds, QUICK_ROUNDS), min(kill_every, QUICK_KILL_EVERY)
    if rounds < 2 or kill_every < 1:
        raise ValueError("the soak needs rounds >= 2 and kill_every >= 1")
    root = Path(workdir or HERE / "results" / "work" / ("soak-quick" if quick else "soak")).resolve()
    _prepare_workdir(root)
    cohort, run_dir = root / "cohort", root / "run"
    t_all = time.perf_counter()

    generate_cohort("glucose", sites=len(SITES), patients=PATIENTS_PER_SITE, days=DAYS, seed=SEED,
                    out=cohort)
    spec = str(cohort / "spec.toml")
    # A round in which one node is killed completes with the other two: the plan accepts a sum
    # of two sites (with three, the minimum would skip every kill round).
    plan = StudySettings(spec=spec, rounds=rounds, hidden=HIDDEN, local_steps=LOCAL_STEPS,
                         seed=SEED, secagg_min_sites=2).plan()
    assert plan.privacy.enabled and plan.privacy.secure_aggregation
    run_config = plan_run_config(plan, out_dir=run_dir, min_nodes=len(SITES))
    kill_rounds = list(range(kill_every, rounds, kill_every))  # each has a later round to rejoin
    conditions = {
        "sites": len(SITES), "patients_per_site": PATIENTS_PER_SITE, "days": DAYS,
        "rounds": rounds, "kill_every": kill_every, "kill_rounds": kill_rounds,
        "hidden": HIDDEN, "local_steps": LOCAL_STEPS, "differential_privacy": True,
        "epsilon_per_site": plan.privacy.epsilon, "secure_aggregation": True, "secagg_min_sites": 2,
        "transport": "loopback, TLS, SuperNode authentication", "flwr": _flwr_version(),
        "cpus": os.cpu_count(), "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "quick": quick}

    coord_audit = run_dir / "coordinator" / "audit.jsonl"
    consortium = LocalConsortium(run_dir, {n: cohort / n for n in SITES}, progress=_progress)
    result: dict = {}
    kills: list[dict] = []
    error: str | None = None
    study_seconds = float("nan")
    runner: threading.Thread | None = None

    def study() -> None:
        try:
            result["summary"] = consortium.run_study(
                run_config, timeout=STUDY_BASE_S + STUDY_PER_ROUND_S * rounds, watch_nodes=False)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            result["error"] = exc

    with sigterm_as_interrupt():
        try:
            consortium.provision(plan)
            consortium.start()
            t_study = time.perf_counter()
            runner = threading.Thread(target=study, name="soak-study", daemon=True)
            runner.start()
            alive = runner.is_alive
            for i, r in enumerate(kill_rounds):
                site = SITES[i % len(SITES)]
                node_audit = consortium.state_root / site / "audit.jsonl"
                _wait(lambda r=r: _events(coord_audit, "round_started", r), ROUND_WAIT_S,
                      f"round {r} to start", alive)
                # Kill while the victim trains: its audit log shows the model arrived.
                _wait(lambda r=r, a=node_audit: _events(a, "model_received", r)
                      or _events(coord_audit, "round_aggregated", r), ROUND_WAIT_S,
                      f"{site} to receive round {r}'s model", alive)
                consortium.kill_node(site)
                t_kill = time.perf_counter()
                phase = ("after sending its update" if _events(node_audit, "model_sent", r)
                         else "while training" if _events(node_audit, "model_received", r)
                         else "between rounds")
                _progress(f"round {r}: SIGKILLed supernode {site} {phase}")
                kill = {"round": r, "site": site, "phase": phase}
                kills.append(kill)
                _wait(lambda r=r: _events(coord_audit, "round_aggregated", r), ROUND_WAIT_S,
                      f"round {r} to be aggregated after the kill", alive)
                kill["round_done_after_kill_s"] = round(time.perf_counter() - t_kill, 1)
                consortium.start_node(site)
                consortium.wait_node_active(site, timeout=REJOIN_WAIT_S)
                kill["restarted"] = True
                kill["active_after_kill_s"] = round(time.perf_counter() - t_kill, 1)
                _progress(f"round {r}: {site} restarted and active again "
                          f"{kill['active_after_kill_s']:.0f} s after the kill")
            runner.join(STUDY_BASE_S + STUDY_PER_ROUND_S * rounds)
            if runner.is_alive():
                raise TimeoutError("the study thread did not return")
            study_seconds = time.perf_counter() - t_study
            if "error" in result:
                raise result["error"]
        except BaseException as exc:  # noqa: BLE001 - reported in the figures; processes stopped below
            if "error" in result and exc is not result["error"]:
                exc = result["error"]  # the study's own failure explains the wait's
            error = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:600]
            _progress(f"FAILED: {error}")
            if isinstance(exc, KeyboardInterrupt):
                raise
        finally:
            consortium.stop()
            if runner is not None:
                runner.join(JOIN_GRACE_S)
    leftovers = _leftover_processes(consortium.deploy_dir / "flwr")

    figures = _figures(run_dir, coord_audit, consortium, result.get("summary"), kills,
                       rounds=rounds, conditions=conditions)
    figures["soak.study_completed"] = _fig(error is None and "summary" in result, "yes=1",
                                           conditions | ({"error": error} if error else {}))
    figures["soak.processes_left"] = _fig(len(leftovers), "processes",
                                          conditions | {"pids": leftovers})
    figures["soak.study_seconds"] = _fig(round(study_seconds, 1), "s", conditions)
    figures["soak.total_seconds"] = _fig(round(time.perf_counter() - t_all, 1), "s", conditions)
    (root / "soak.json").write_text(json.dumps(figures, indent=2) + "\n")
    return figures


def _flwr_version() -> str:
    try:
        import flwr

        return flwr.__version__
    except Exception:  # noqa: BLE001
        return ""


def _figures(run_dir: Path, coord_audit: Path, consortium, summary: dict | None,
             kills: list[dict], *, rounds: int, conditions: dict) -> dict:
    from twinfed.governance.verify import verify_path
    from twinfed.privacy.ledger import LedgerState

    figs: dict = {}
    entries = _audit(coord_audit)
    started = {e["details"]["round"]: e for e in entries if e.get("event") == "round_started"}
    aggregated = {e["details"]["round"]: e for e in entries if e.get("event") == "round_aggregated"}
    done = sorted(aggregated)

    # Who trained, refused, or was absent in each round, from the coordinator's signed record.
    per_round: dict[int, dict[str, str]] = {}
    for r in done:
        d = aggregated[r]["details"]
        refused = set(d.get("sites_refused") or {})
        replied = set(d.get("node_heads") or {}) | refused
        per_round[r] = {s: ("refused" if s in refused else "trained" if s in replied else "absent")
                        for s in SITES}
    figs["soak.rounds_completed"] = _fig(len(summary["history"]) if summary else len(done),
                                         "rounds", conditions | {"requested": rounds})
    history = summary["history"] if summary else []
    mismatched = [h["round"] for h in history if h["round"] in per_round and h["sites_trained"]
                  != sum(v == "trained" for v in per_round[h["round"]].values())]
    for site in SITES:
        outcome = [per_round[r][site] for r in done]
        rec = (summary or {}).get("sites", {}).get(site)
        trained = rec["rounds_joined"] if rec else outcome.count("trained")
        refused = rec["rounds_refused"] if rec else outcome.count("refused")
        absent_rounds = [r for r in done if per_round[r][site] == "absent"]
        c = conditions | {"site": site, "source": "summary.json sites" if rec else "coordinator audit"}
        figs[f"soak.{site}.rounds_trained"] = _fig(trained, "rounds", c)
        figs[f"soak.{site}.rounds_refused"] = _fig(refused, "rounds", c)
        figs[f"soak.{site}.rounds_absent"] = _fig(len(done) - trained - refused, "rounds",
                                                  c | {"absent_in_rounds": absent_rounds})

    # Kills, restarts, and whether each restarted node trained again in a later round.
    for k in kills:
        later = [r for r in done if r > k["round"] and per_round[r][k["site"]] == "trained"]
        k["rejoined_round"] = later[0] if later else None
        node_joined = [e["details"]["round"] for e in
                       _events(consortium.state_root / k["site"] / "audit.jsonl", "round_joined")]
        k["node_logged_training_in_kill_round"] = k["round"] in node_joined
    restarted = [k for k in kills if k.get("restarted")]
    rejoined = [k for k in restarted if k["rejoined_round"] is not None]
    figs["soak.kills"] = _fig(len(kills), "SIGKILLs", conditions | {"kills": kills})
    figs["soak.restarts"] = _fig(len(restarted), "restarts", conditions)
    figs["soak.restarted_nodes_rejoined"] = _fig(len(rejoined), "nodes",
                                                 conditions | {"of_restarted": len(restarted)})
    # Every killed node was restarted and trained again (1 when nothing was killed).
    figs["soak.all_restarted_nodes_rejoined"] = _fig(len(rejoined) == len(restarted) == len(kills),
                                                     "yes=1", conditions)
    figs["soak.rejoined_in_next_round"] = _fig(
        sum(k["rejoined_round"] == k["round"] + 1 for k in rejoined), "nodes", conditions)
    if restarted:
        active = [k["active_after_kill_s"] for k in restarted]
        figs["soak.node_active_after_kill_mean_seconds"] = _fig(round(statistics.mean(active), 1),
                                                                "s", conditions)
        figs["soak.node_active_after_kill_max_seconds"] = _fig(max(active), "s", conditions)

    # Per-round wall time: the coordinator's round_started to round_aggregated (audit clock).
    secs = {r: _time(aggregated[r]) - _time(started[r]) for r in done if r in started}
    killed = {k["round"] for k in kills}
    if secs:
        v = list(secs.values())
        c = conditions | {"measured": "coordinator audit, round_started to round_aggregated",
                          "per_round_s": {r: round(s, 1) for r, s in sorted(secs.items())}}
        figs["soak.round_seconds_mean"] = _fig(round(statistics.mean(v), 1), "s", c)
        figs["soak.round_seconds_max"] = _fig(round(max(v), 1), "s", conditions | {
            "round": max(secs, key=secs.get)})
        quiet = [s for r, s in secs.items() if r not in killed and r - 1 not in killed and r > 1]
        if quiet:
            figs["soak.round_seconds_mean_undisturbed"] = _fig(round(statistics.mean(quiet), 1), "s",
                                                               conditions | {"excludes": "round 1, kill "
                                                                             "rounds and the rounds after"})
        hit = [secs[r] for r in killed if r in secs]
        if hit:
            figs["soak.round_seconds_mean_with_kill"] = _fig(round(statistics.mean(hit), 1), "s",
                                                             conditions)
        after = [secs[r + 1] for r in killed if r + 1 in secs]
        if after:
            figs["soak.round_seconds_mean_after_kill"] = _fig(round(statistics.mean(after), 1), "s",
                                                              conditions)
    if mismatched:
        figs["soak.rounds_where_summary_and_audit_disagree"] = _fig(
            len(mismatched), "rounds", conditions | {"rounds": mismatched})

    # Ledgers and audit logs after the kills.
    intact = 0
    for site in SITES:
        try:
            LedgerState.model_validate_json(
                (consortium.state_root / site / "privacy_ledger.json").read_text())
            intact += 1
        except Exception:  # noqa: BLE001 - counted as not intact
            pass
    figs["soak.ledgers_intact"] = _fig(intact, "nodes", conditions | {"of": len(SITES)})
    try:
        report = verify_path(run_dir)
        ok, issues = report.ok, [f"{i.file}: {i.reason}" for i in report.issues][:10]
    except Exception as exc:  # noqa: BLE001 - e.g. nothing written before a failure
        ok, issues = False, [f"{type(exc).__name__}: {exc}"]
    figs["soak.audit_verify_ok"] = _fig(ok, "yes=1", conditions | {
        "checked": "verify_path(RUN): coordinator and node audit logs, signatures, cross-anchors",
        "issues": issues})
    return figs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak",
                                description="Consortium soak: one long study on a real local "
                                            "consortium while SuperNodes are SIGKILLed and restarted; "
                                            "prints the figures as JSON.")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--kill-every", type=int, default=4)
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK_ROUNDS} rounds, a kill in round {QUICK_KILL_EVERY} (a smoke test)")
    p.add_argument("--workdir", type=Path, help="default bench/results/work/soak[-quick]; replaced")
    args = p.parse_args(argv)
    figs = run(rounds=args.rounds, kill_every=args.kill_every, quick=args.quick, workdir=args.workdir)
    print(json.dumps(figs, indent=2))
    good = (figs["soak.study_completed"]["value"] == 1 and figs["soak.audit_verify_ok"]["value"] == 1
            and figs["soak.all_restarted_nodes_rejoined"]["value"] == 1
            and figs["soak.processes_left"]["value"] == 0)
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
