"""A whole federated study in one process on Flower's simulation engine.

Each site is a simulated SuperNode that reads only its own site directory and keeps its state in
``RUN_DIR/nodes/<site>/``; the coordinator writes ``RUN_DIR/summary.json`` and ``RUN_DIR/model/``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from twinfed.client.app import SimulatedNodes, make_client_app
from twinfed.client.node import NodeConfig
from twinfed.governance.provision import provision_simulated_node
from twinfed.errors import TwinfedError
from twinfed.models.plan import TrainingPlan
from twinfed.privacy.secagg import check_secagg
from twinfed.server.app import check_new_run, make_server_app
from twinfed.server.strategy import Progress


SIMULATION_OPERATOR = "operator:twinfed-simulate"


@dataclass(frozen=True)
class SiteRef:
    name: str
    data_dir: Path


def run_simulated_study(plan: TrainingPlan, sites: list[SiteRef], out_dir: str | Path, *,
                        progress: Progress, cpus: int | None = None, state_root: Path | None = None,
                        approve_as: str | None = SIMULATION_OPERATOR, outer_mods=(),
                        inner_mods=(), pretrained: Path | None = None) -> dict:
    """``state_root/<site>`` holds each node's state (default ``out_dir/nodes``): give the same
    root to later studies to model the same hospitals, with their privacy ledgers, consent
    registries, approvals and audit logs.

    ``approve_as``: the simulation's operator initialises each node's state (importing its
    site's consent.csv) and approves the plan for it, audited under that name. ``None``: the
    node states are used as their officers left them (``twinfed node init``, ``twinfed plan
    approve``); a node without approval refuses every round."""
    out_dir = Path(out_dir)
    check_new_run(out_dir)
    nodes = _simulated_nodes(plan, sites, out_dir, state_root=state_root, approve_as=approve_as,
                             progress=progress)
    server_app = make_server_app(plan, out_dir=out_dir, min_nodes=len(sites), progress=progress,
                                 extra={"engine": "simulation"}, pretrained=pretrained)
    _run_engine(server_app, make_client_app(SimulatedNodes(nodes), outer_mods=outer_mods,
                                            inner_mods=inner_mods), len(nodes), cpus, "study")
    summary_path = out_dir / "summary.json"
    if not summary_path.is_file():
        raise TwinfedError("the study did not finish (no summary.json); run again with --debug "
                           "to see Flower's log")
    return json.loads(summary_path.read_text())


def run_simulated_trial(plan, weights, sites: list[SiteRef], out_dir: str | Path, *, progress: Progress,
                        cpus: int | None = None, state_root: Path | None = None,
                        approve_as: str | None = SIMULATION_OPERATOR, outer_mods=(), inner_mods=()) -> dict:
    """A federated in-silico trial (``plan``: a :class:`twinfed.models.trial_plan.TrialPlan`) on
    Flower's simulation engine, the twin's ``weights`` sent to every node; nodes as in
    :func:`run_simulated_study` (give ``state_root`` to run it on the hospitals that trained the
    twin, with their ledgers). Writes ``out_dir/trial.json`` and returns it."""
    from twinfed.server.trial import RESULTS_FILE, check_new_trial, make_trial_server_app

    out_dir = Path(out_dir)
    check_new_trial(out_dir)
    nodes = _simulated_nodes(plan, sites, out_dir, state_root=state_root, approve_as=approve_as,
                             progress=progress)
    server_app = make_trial_server_app(plan, weights, out_dir=out_dir, min_nodes=len(sites),
                                       progress=progress, extra={"engine": "simulation"})
    _run_engine(server_app, make_client_app(SimulatedNodes(nodes), outer_mods=outer_mods,
                                            inner_mods=inner_mods), len(nodes), cpus, "trial")
    path = out_dir / RESULTS_FILE
    if not path.is_file():
        raise TwinfedError(f"the trial did not finish (no {RESULTS_FILE}); run again with --debug "
                           "to see Flower's log")
    return json.loads(path.read_text())


def _simulated_nodes(plan, sites: list[SiteRef], out_dir: Path, *, state_root: Path | None,
                     approve_as: str | None, progress: Progress) -> list[NodeConfig]:
    """One simulated node per site (state in ``state_root/<site>``, default ``out_dir/nodes``),
    set up and the plan approved by the operator unless ``approve_as`` is None."""
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise TwinfedError("two --site entries share a name; give each site a unique NAME")
    for s in sites:
        if not s.data_dir.is_dir():
            raise TwinfedError(f"site {s.name}: {s.data_dir} is not a directory")
    try:
        nodes = [NodeConfig(site_name=s.name, site_data=s.data_dir.resolve(),
                            state_dir=(Path(state_root or out_dir / "nodes") / s.name).resolve(),
                            simulated=True)
                 for s in sites]
    except ValueError:
        raise TwinfedError("site names must be plain names (letters, digits, '.', '_' or '-', "
                           "starting with a letter or digit, at most 64 characters)") from None
    check_secagg(plan, len(sites))
    out_dir.mkdir(parents=True, exist_ok=True)
    if approve_as is not None:
        for node in nodes:
            try:
                provision_simulated_node(node.state_dir, site_name=node.site_name,
                                         site_data=node.site_data, plan=plan, operator=approve_as,
                                         reimport_consent=True)
            except TwinfedError as exc:  # that hospital is not ready; the others may still be
                progress(f"site {node.site_name}: not set up ({exc}); it cannot take part")
    return nodes


def _run_engine(server_app, client_app, n_nodes: int, cpus: int | None, what: str) -> None:
    from flwr.simulation import run_simulation

    cpus = cpus or min(2, os.cpu_count() or 1)
    # Flower's own log is for developers; failures still surface through the results.
    logging.getLogger("flwr").setLevel(logging.ERROR)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    try:
        run_simulation(
            server_app=server_app, client_app=client_app, num_supernodes=n_nodes,
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"num_cpus": cpus, "logging_level": "ERROR", "log_to_driver": False},
            },
        )
    except TwinfedError:
        raise
    except Exception as exc:  # the engine re-raises the ServerApp's failure from its thread
        cause = exc.__cause__ or exc
        if isinstance(cause, TwinfedError):
            raise cause from None
        raise TwinfedError(f"the {what} failed in Flower's engine ({type(cause).__name__}: "
                           f"{str(cause).splitlines()[0] if str(cause) else ''}); run again with "
                           "--debug for the traceback") from exc
