"""A simulated node's governance set-up, done by the operator of a simulation.

On a deployed node, hospital IT runs ``twinfed node init`` and the privacy officer runs
``twinfed plan approve``. A simulated node has neither, so the simulation's operator does both,
under their own name: every approval and consent import so made is in the node's audit log with
``actor = operator:...``, never passed off as an officer's.
"""

from __future__ import annotations

from twinfed.client.node import NodeConfig
from twinfed.models.plan import TrainingPlan


def provision_simulated_node(node: NodeConfig, plan: TrainingPlan | None, *, operator: str,
                             reimport_consent: bool = False) -> None:
    """Initialise the node's state if new (importing the site's consent.csv), approve ``plan``
    if it is not approved yet; ``reimport_consent`` merges the site's current consent.csv into
    an existing registry (new records only: the latest record per patient still wins)."""
    from twinfed.governance.approvals import approve_plan, is_approved
    from twinfed.governance.consent_registry import import_consent
    from twinfed.governance.layout import is_state_dir
    from twinfed.governance.node_state import init_node

    node.ensure_state_dir()
    has_consent = (node.site_data / "consent.csv").is_file()
    if not is_state_dir(node.state_dir):
        init_node(node.state_dir, site_name=node.site_name, site_data=node.site_data, actor=operator)
    elif reimport_consent and has_consent:
        import_consent(node.state_dir, node.site_data, actor=operator)
    if plan is not None and not is_approved(node.state_dir, plan.sha256()):
        approve_plan(node.state_dir, plan, actor=operator)
