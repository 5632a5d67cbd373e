"""The hospital node's Flower ClientApp.

Imports stay light (no torch, no Opacus at module level): in deployment every message starts a
fresh ``flwr-clientapp`` process. A refused round is answered, not raised: the reply carries
``status="refused"`` and a one-line reason, and no weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from flwr.client import ClientApp, NumPyClient
from flwr.common import Context

from twinfed.client.node import NodeConfig
from twinfed.client.session import parse_plan, train_round
from twinfed.errors import TwinfedError


class TwinClient(NumPyClient):
    def __init__(self, node: NodeConfig):
        self.node = node

    def fit(self, parameters, config):
        base = {"site": self.node.site_name}
        try:
            plan = parse_plan(str(config["plan"]))
            out = train_round(self.node, plan, parameters, int(config["round"]))
        except TwinfedError as exc:
            return [], 0, base | {"status": "refused", "reason": str(exc)}
        return out.weights, out.patients_used, base | {
            "status": "ok",
            "patients_used": out.patients_used,
            "patients_excluded": out.patients_excluded,
            "train_loss": out.train_loss,
            "steps": out.steps,
        }


NodeResolver = Callable[[Context], NodeConfig]


def node_from_context(context: Context) -> NodeConfig:
    """A deployed node names its site in its node config; under ``flwr run`` on the simulation
    engine, node ``partition-id`` takes the matching entry of the run config's ``sites``
    (``"name=dir,name=dir"``) and keeps its state under ``<out-dir>/nodes/<name>``."""
    cfg = dict(context.node_config)
    if "site-data" not in cfg and "partition-id" in cfg and context.run_config.get("sites"):
        entries = [e.strip() for e in str(context.run_config["sites"]).split(",") if e.strip()]
        name, _, data = entries[int(cfg["partition-id"]) % len(entries)].partition("=")
        out = Path(str(context.run_config.get("out-dir", "runs/flwr")))
        cfg = {"site-name": name, "site-data": data, "state-dir": str(out / "nodes" / name)}
    return NodeConfig.from_node_config(cfg)


def make_client_app(resolve: NodeResolver = node_from_context) -> ClientApp:
    def client_fn(context: Context):
        return TwinClient(resolve(context)).to_client()

    return ClientApp(client_fn=client_fn)


class SimulatedNodes:
    """Maps Flower's simulated ``partition-id`` to one of the study's sites (picklable for Ray)."""

    def __init__(self, nodes: Sequence[NodeConfig]):
        self.nodes = list(nodes)

    def __call__(self, context: Context) -> NodeConfig:
        return self.nodes[int(context.node_config["partition-id"])]


app = make_client_app()
