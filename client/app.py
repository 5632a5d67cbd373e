"""The hospital node's Flower ClientApp.

Imports stay light (no torch, no Opacus at module level): in deployment every message starts a
fresh ``flwr-clientapp`` process. Every round goes through the governance gate
(``twinfed.client.gate``). A refused round is answered, not raised: the reply carries
``status="refused"``, a one-line reason and a zero update; every reply carries the node's audit
head and key fingerprint for the coordinator's log.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from flwr.client import ClientApp, NumPyClient
from flwr.common import Context

from twinfed.client.node import NodeConfig


class TwinClient(NumPyClient):
    """Replies with the round's weight change, weight 1 (see ``twinfed.privacy.secagg``).

    A refusal still replies with a zero change of the right shape, so a SecAgg+ round keeps its
    shape and the coordinator's sum is untouched; ``status`` tells the strategy to leave it out.
    """

    def __init__(self, node: NodeConfig, context: Context):
        self.node = node
        self.ctx = context

    def fit(self, parameters, config):
        from twinfed.client.gate import serve_round
        from twinfed.privacy.secagg import round_is_masked

        coordinator = ({"seq": int(config["coordinator_seq"]), "hash": str(config["coordinator_hash"])}
                       if "coordinator_hash" in config else None)
        reply = serve_round(self.node, str(config["plan"]), parameters, int(config["round"]),
                            masked=round_is_masked(self.ctx), coordinator=coordinator)
        base = {"site": self.node.site_name, "key_fingerprint": reply.key_fingerprint}
        if reply.audit_head is not None:
            base |= {"audit_seq": reply.audit_head["seq"], "audit_hash": reply.audit_head["hash"]}
        out = reply.outcome
        if out is None:
            zeros = [np.zeros_like(p, dtype=np.float32) for p in parameters]
            return zeros, 1, base | {"status": "refused", "reason": reply.reason}
        metrics = base | {
            "status": "ok",
            "patients_used": out.patients_used,
            "patients_excluded": out.patients_excluded,
            "train_loss": out.train_loss,
            "steps": out.steps,
            "update_clip_fraction": out.update_clip_fraction,
            "privacy": json.dumps(out.privacy) if out.privacy is not None else "",
        }
        return out.update, 1, metrics


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
        node = NodeConfig.from_node_config(cfg)
        return node.model_copy(update={"simulation_operator": "operator:flwr-run-simulation"})
    return NodeConfig.from_node_config(cfg)


def make_client_app(resolve: NodeResolver = node_from_context, *, outer_mods: Sequence = (),
                    inner_mods: Sequence = ()) -> ClientApp:
    """``outer_mods`` see what leaves the node (masked under SecAgg+); ``inner_mods`` see the
    training function's own reply (for tests and probes)."""
    from twinfed.privacy.secagg import secagg_when_asked

    def client_fn(context: Context):
        return TwinClient(resolve(context), context).to_client()

    return ClientApp(client_fn=client_fn, mods=[*outer_mods, secagg_when_asked, *inner_mods])


class SimulatedNodes:
    """Maps Flower's simulated ``partition-id`` to one of the study's sites (picklable for Ray)."""

    def __init__(self, nodes: Sequence[NodeConfig]):
        self.nodes = list(nodes)

    def __call__(self, context: Context) -> NodeConfig:
        return self.nodes[int(context.node_config["partition-id"])]


app = make_client_app()
