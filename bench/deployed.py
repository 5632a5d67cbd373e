"""Section 7: a deployed round against the same round simulated, and where the difference goes.

The same tiny study (3 sites, the default plan: DP and SecAgg+) runs once on Flower's
simulation engine (``twinfed simulate``'s path) and once on a real consortium on loopback
(``twinfed deploy local``'s path: SuperLink with TLS and node authentication, 3 SuperNodes, each
message in a fresh ``flwr-clientapp`` process). Round time is the coordinator's own (from the
round's start to its aggregate, ``summary.json``), median over rounds after the first. Target
(issue 14): deployed minus simulated at most 8 s per round.

Where the time goes: every Flower process of the deployed run logs with a wall-clock stamp (a
``sitecustomize`` on the children's ``PYTHONPATH``, :data:`STAMPS`, a measuring instrument that
only prefixes Flower's log lines), so each message a node handles splits into
- *task start*: the SuperNode received it until the new ``flwr-clientapp`` process logs its
  start (the SuperExec's poll, the process spawn, Python's and Flower's own imports);
- *clientapp*: from there, the ClientApp's imports and work, until the SuperNode sends the reply;
- *between stages*: the last reply of one stage until the node receives the next message (the
  coordinator's pull of the replies, its own work, the node's idle pull of the SuperLink).
The import cost of a fresh ``flwr-clientapp`` (Flower, the ClientApp module; torch and Opacus for
the training message) is measured apart with ``python -X importtime``.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.report import figure
from bench.sizes import Sizes
from bench.studies import Workspace, default_plan, plan_conditions

TARGET_OVERHEAD_S = 8.0
STAMPS = Path(__file__).resolve().parent / "stamps"
_LINE = re.compile(r"^(?P<t>\d+\.\d+) (?P<pid>\d+) .*?(?P<what>Receiving|Sending|Start `flwr-clientapp`)"
                   r"(?:: (?P<kind>\w+) message)?")


def run(ws: Workspace, sizes: Sizes) -> dict:
    cohort = ws.cohort("glucose", sites=3, patients=sizes.deployed_patients, days=sizes.deployed_days)
    spec = ws.spec(cohort)
    plan = default_plan(spec, sizes.deployed_rounds, calibrate=False)
    simulated = ws.federated(plan, cohort, "deployed-sim")
    sim_round = _steady(simulated.summary)
    summary, run_dir, deployed_seconds = _deployed(ws, plan, cohort)
    dep_round = _steady(summary)
    stages = message_phases(run_dir / "deploy" / "logs", sizes.deployed_rounds)
    imports = import_seconds()
    base = plan_conditions(plan) | {
        "sites": 3, "patients_per_site": sizes.deployed_patients, "days": sizes.deployed_days,
        "rounds": sizes.deployed_rounds, "timing": "the coordinator's round time (summary.json), "
        "median over rounds after the first", "transport": "loopback, TLS, SuperNode authentication",
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "deployed_round_seconds": [h["seconds"] for h in summary["history"]],
        "simulated_round_seconds": [h["seconds"] for h in simulated.summary["history"]]}
    out = {
        "deployed.round_seconds": figure(dep_round, "s", conditions=base),
        "deployed.simulated_round_seconds": figure(sim_round, "s", conditions=base),
        "deployed.round_overhead_seconds": figure(dep_round - sim_round, "s", target=TARGET_OVERHEAD_S,
                                                  conditions=base | {"study_seconds": deployed_seconds}),
        "deployed.ratio": figure(dep_round / sim_round, "x", conditions=base),
    }
    for name, seconds in stages.items():
        unit, suffix = ("count", "") if name == "messages_per_round" else ("s", "_seconds")
        out[f"deployed.phase.{name}{suffix}"] = figure(seconds, unit, conditions={
            "what": PHASES[name], "statistic": "median over every message of every node"
                                                if name != "messages_per_round" else "count"})
    for name, seconds in imports.items():
        out[f"deployed.import.{name}_seconds"] = figure(seconds, "s", conditions={
            "how": "python -X importtime in a fresh process, cumulative, median of 3"})
    return out


PHASES = {
    "task_start": "SuperNode received a message until the new flwr-clientapp process logged its "
                  "start (SuperExec poll, process spawn, Python and Flower imports)",
    "clientapp_light": "flwr-clientapp's start until the reply is sent, SecAgg+ stages without training",
    "clientapp_train": "the same for the message that trains (imports torch and Opacus, DP-SGD)",
    "between_stages": "the last node's reply of a stage until a node receives the next message",
    "messages_per_round": "messages each node handles per round",
}


def _steady(summary: dict) -> float:
    rounds = [float(h["seconds"]) for h in summary["history"]]
    return statistics.median(rounds[1:] if len(rounds) > 1 else rounds)


def _deployed(ws: Workspace, plan, cohort: Path) -> tuple[dict, Path, float]:
    from twinfed.deploy.launcher import run_deployed_study

    run_dir = ws.runs / "deployed"
    sites = {n: cohort / n for n in ws.site_names(cohort)}
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(STAMPS), *([old] if old else [])])
    t0 = time.perf_counter()
    try:
        summary = run_deployed_study(sites, run_dir, plan, progress=ws.progress)
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old
    return summary, run_dir, time.perf_counter() - t0


def message_phases(logs: Path, rounds: int) -> dict[str, float]:
    """Median seconds of each phase of a node's messages, from the SuperNodes' stamped logs, and
    the training messages each node handled per round."""
    wait, light, train, between = [], [], [], []
    per_round = []
    for log in sorted(logs.glob("supernode-*.log")):
        events = []
        for line in log.read_text(errors="replace").splitlines():
            m = _LINE.match(line)
            if m:
                events.append((float(m["t"]), m["what"], m["kind"]))
        # Each message: Receiving -> Start flwr-clientapp -> Sending, in order.
        msgs = []
        for i in range(len(events) - 2):
            (t0, a, kind), (t1, b, _), (t2, c, _) = events[i:i + 3]
            if a == "Receiving" and b.startswith("Start") and c == "Sending":
                msgs.append((t0, t1, t2, kind))
        # SecAgg+'s train messages come in fours per round (set-up, share keys, collect masked
        # vectors, unmask); the third trains.
        trains = [m for m in msgs if m[3] == "train"]
        training = {id(m) for m in trains[2::4]}
        per_round.append(len(trains) / rounds)
        for k, msg in enumerate(msgs):
            t0, t1, t2, _ = msg
            wait.append(t1 - t0)
            (train if id(msg) in training else light).append(t2 - t1)
            if k + 1 < len(msgs):
                between.append(msgs[k + 1][0] - t2)
    med = (lambda v: statistics.median(v) if v else float("nan"))
    return {"task_start": med(wait), "clientapp_light": med(light), "clientapp_train": med(train),
            "between_stages": med(between), "messages_per_round": med(per_round)}


def import_seconds() -> dict[str, float]:
    out = {}
    for name, stmt in (("flwr", "import flwr.client"), ("clientapp", "import twinfed.client.app"),
                       ("torch_opacus", "import torch, opacus")):
        runs = []
        for _ in range(3):
            cp = subprocess.run([sys.executable, "-X", "importtime", "-c", stmt], capture_output=True,
                                text=True, check=True)
            total = 0
            for line in cp.stderr.splitlines():
                parts = line.split("|")
                if len(parts) == 3 and not parts[2].startswith("  "):  # top-level imports only
                    try:
                        total += int(parts[1])
                    except ValueError:
                        continue
            runs.append(total / 1e6)
        out[name] = statistics.median(runs)
    return out
