"""The hospital node's Flower ClientApp.

Imports stay light (no torch, no Opacus at module level): in deployment every message starts a
fresh ``flwr-clientapp`` process. Every round goes through the node's gate
(:mod:`twinfed.client.gate`), and every message through the boundary mod
(:mod:`twinfed.client.boundary`): what leaves the node is the (masked) update and one
:class:`twinfed.wire.NodeReply`, or a coded error, never an exception's text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from flwr.client import ClientApp, NumPyClient
from flwr.common import Context

from twinfed.client.node import NodeConfig


class TwinClient(NumPyClient):
    """Replies with the round's weight change, weight 1 (see ``twinfed.privacy.secagg``).

    A refusal in an unmasked round replies with a zero change of the right shape and the reply's
    status tells the strategy. In a SecAgg+ round a refusing node *withdraws*
    (:class:`twinfed.client.boundary.Withdrawn`): it sends no masked vector, so it counts as a
    contributor for nobody (the coordinator's minimum sum, every node's at the unmask stage),
    and its coded reply reaches the coordinator in its error instead.
    """

    def __init__(self, node: NodeConfig, context: Context):
        self.node = node
        self.ctx = context

    def fit(self, parameters, config):
        from twinfed.client.gate import serve
        from twinfed.privacy.secagg import min_sum, remember_round, secagg_view

        view = secagg_view(self.ctx)
        result = serve(self.node, dict(config), list(parameters), secagg=view)
        if view.masked and result.reply.status != "ok":
            from twinfed.client.boundary import Withdrawn

            raise Withdrawn(result.reply)
        if result.plan is not None:
            remember_round(self.ctx, plan_sha256=result.plan.sha256(), server_round=result.round,
                           min_required=min_sum(result.plan))
        return result.update, 1, result.reply.to_metrics()


NodeResolver = Callable[[Context], NodeConfig]


def node_from_context(context: Context) -> NodeConfig:
    """A deployed node names its site in its node config; under ``flwr run`` on the simulation
    engine, node ``partition-id`` takes the matching entry of the run config's ``sites``
    (``"name=dir,name=dir"``) and keeps its state under ``<out-dir>/nodes/<name>`` (set up by
    the ServerApp before the first round, see ``twinfed.governance.provision``)."""
    cfg = dict(context.node_config)
    if "site-data" not in cfg and "partition-id" in cfg and context.run_config.get("sites"):
        from twinfed.governance.provision import run_config_sites

        entries = run_config_sites(str(context.run_config["sites"]))
        name, data = entries[int(cfg["partition-id"]) % len(entries)]
        out = Path(str(context.run_config.get("out-dir", "runs/flwr")))
        return NodeConfig(site_name=name, site_data=data, state_dir=out / "nodes" / name,
                          simulated=True)
    return NodeConfig.from_node_config(cfg)


def make_client_app(resolve: NodeResolver = node_from_context, *, outer_mods: Sequence = (),
                    inner_mods: Sequence = ()) -> ClientApp:
    """``outer_mods`` see what leaves the node (masked under SecAgg+); ``inner_mods`` see the
    training function's own reply (for tests and probes)."""
    from twinfed.client.boundary import make_boundary_mod
    from twinfed.privacy.secagg import secagg_when_asked

    def client_fn(context: Context):
        return TwinClient(resolve(context), context).to_client()

    return ClientApp(client_fn=client_fn,
                     mods=[make_boundary_mod(resolve), *outer_mods, secagg_when_asked, *inner_mods])


class SimulatedNodes:
    """Maps Flower's simulated ``partition-id`` to one of the study's sites (picklable for Ray)."""

    def __init__(self, nodes: Sequence[NodeConfig]):
        self.nodes = list(nodes)

    def __call__(self, context: Context) -> NodeConfig:
        return self.nodes[int(context.node_config["partition-id"])]


app = make_client_app()
