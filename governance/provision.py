"""A simulated node's governance set-up, done by the operator of a simulation.

On a deployed node, hospital IT runs ``twinfed node init`` and the privacy officer runs
``twinfed plan approve``. A simulated node has neither, so the simulation's operator does both,
under their own name, from the simulation's entry point (``twinfed simulate``, ``twinfed deploy
local``, ``flwr run`` on the simulation engine) before the study starts, never from the node's
round: every approval and consent import so made is in the node's audit log with
``actor = operator:...``, never passed off as an officer's.
"""

from __future__ import annotations

from pathlib import Path

from twinfed.models.plan import TrainingPlan


def provision_simulated_node(state_dir: Path, *, site_name: str, site_data: Path,
                             plan: TrainingPlan | None, operator: str,
                             reimport_consent: bool = False) -> None:
    """Initialise the node's state if new (importing the site's consent.csv), approve ``plan``
    if it is not approved yet; ``reimport_consent`` merges the site's current consent.csv into
    an existing registry (new records only: the latest record per patient still wins)."""
    from twinfed.atomic import make_dir
    from twinfed.governance.approvals import approve_plan, is_approved
    from twinfed.governance.consent_registry import import_consent
    from twinfed.governance.layout import is_state_dir
    from twinfed.governance.node_state import init_node

    make_dir(state_dir)
    has_consent = (Path(site_data) / "consent.csv").is_file()
    if not is_state_dir(state_dir):
        init_node(state_dir, site_name=site_name, site_data=site_data, actor=operator)
    elif reimport_consent and has_consent:
        import_consent(state_dir, site_data, actor=operator)
    if plan is not None and not is_approved(state_dir, plan.sha256()):
        approve_plan(state_dir, plan, actor=operator)


FLWR_RUN_OPERATOR = "operator:flwr-run-simulation"


def run_config_sites(sites: str) -> list[tuple[str, Path]]:
    """``flwr run`` on the simulation engine names its simulated nodes in the run config's
    ``sites``: ``"name=dir,name=dir"``, in partition order; names must be plain names."""
    from twinfed.errors import TwinfedError
    from twinfed.governance.node_state import SITE_NAME_RULE, is_site_name

    out = []
    for entry in (e.strip() for e in sites.split(",") if e.strip()):
        name, sep, data = entry.partition("=")
        if not is_site_name(name.strip()):
            raise TwinfedError(f"run config 'sites': {name.strip()!r} is not a plain site name "
                               f"({SITE_NAME_RULE})")
        if not sep or not data.strip():
            raise TwinfedError(f"run config 'sites': write name=dir for every site, got {entry!r}")
        out.append((name.strip(), Path(data.strip())))
    return out


def provision_run_config_sites(out_dir: Path, sites: str, plan: TrainingPlan) -> None:
    """Set up the simulated nodes a ``flwr run`` simulation names (state in OUT/nodes/<name>),
    from its ServerApp before the first round, as ``twinfed simulate`` does for its sites."""
    for name, data in run_config_sites(sites):
        provision_simulated_node(Path(out_dir) / "nodes" / name, site_name=name, site_data=data,
                                 plan=plan, operator=FLWR_RUN_OPERATOR, reimport_consent=True)
