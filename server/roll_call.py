"""Before a study: enough SuperNodes, each configured for a site, or a one-line error in a minute.

Flower's strategy waits for ``min_nodes`` nodes without limit, and SecAgg+ needs at least three:
on a federation of two simulated SuperNodes (``flwr run .`` on Flower's default local
federation) a study would wait forever. The coordinator instead waits at most
``NODE_WAIT_S`` for the nodes the study needs, asks each who it is (a roll call the nodes'
boundary answers, see ``twinfed.client.boundary``), and stops with what to do when there are too
few, or when nodes have no site configured.
"""

from __future__ import annotations

import time

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType

from twinfed.errors import TwinfedError
from twinfed.wire import ROLL_CALL_RECORD, UNCONFIGURED, NodeReply

NODE_WAIT_S = 30.0
# A node's first message starts its ClientApp (on the simulation engine, a Ray worker importing
# the app): on a loaded machine that alone can take minutes. Nodes that are there but have no
# site configured answer at once, so only a stuck node makes the coordinator wait this long.
REPLY_WAIT_S = 300.0
_POLL_S = 1.0


def roll_call(grid, needed: int, *, secure: bool, wait: float = NODE_WAIT_S,
              answered: dict | None = None) -> list[NodeReply]:
    """The nodes' answers once at least ``needed`` are connected; :class:`TwinfedError` if there
    are fewer within ``wait`` seconds, or fewer than ``needed`` with a site configured.
    ``answered``, if given, receives each answer under its node's id."""
    deadline = time.monotonic() + wait
    node_ids = list(grid.get_node_ids())
    while len(node_ids) < needed and time.monotonic() < deadline:
        time.sleep(_POLL_S)
        node_ids = list(grid.get_node_ids())
    if len(node_ids) < needed:
        raise TwinfedError(too_few(len(node_ids), needed, secure=secure))
    content = RecordDict({ROLL_CALL_RECORD: ConfigRecord({"hello": "twinfed"})})
    messages = [Message(content=content, dst_node_id=nid, message_type=MessageType.QUERY)
                for nid in node_ids]
    replies = []
    for reply in grid.send_and_receive(messages, timeout=REPLY_WAIT_S):
        if reply.has_error():
            continue
        try:
            replies.append(NodeReply.model_validate_json(
                str(reply.content.config_records[ROLL_CALL_RECORD]["reply"])))
            if answered is not None:
                answered[reply.metadata.src_node_id] = replies[-1]
        except (KeyError, ValueError):
            continue
    ready = [r for r in replies if r.status == "ok"]
    unconfigured = sum(1 for r in replies if r.site == UNCONFIGURED)
    silent = len(node_ids) - len(replies)
    if len(ready) < needed and silent and len(ready) + silent >= needed:
        raise TwinfedError(
            f"{silent} of {len(node_ids)} SuperNode(s) did not answer the roll call within "
            f"{REPLY_WAIT_S:.0f} s, so only {len(ready)} are ready and this study needs {needed}: "
            "they may be overloaded or stuck; see their logs and start the study again")
    if len(ready) < needed:
        if unconfigured:
            raise TwinfedError(
                f"{unconfigured} of {len(node_ids)} SuperNode(s) have no site configured, so only "
                f"{len(ready)} can take part and this study needs {needed}: start each SuperNode "
                "with --node-config 'site-name=... site-data=... state-dir=...', or, on Flower's "
                "simulation engine, set the run-config key sites, e.g. "
                "--run-config \"sites='a=/data/site-a,b=/data/site-b,c=/data/site-c'\"")
        refused = ", ".join(sorted({f"{r.site}: {r.refusal.code.value}" for r in replies if r.refusal}))
        raise TwinfedError(f"only {len(ready)} of {len(node_ids)} SuperNode(s) are ready and this "
                           f"study needs {needed}" + (f" ({refused})" if refused else "")
                           + "; initialise their state with 'twinfed node init'")
    return replies


def too_few(online: int, needed: int, *, secure: bool) -> str:
    why = "secure aggregation needs at least 3, and the plan's min-nodes" if secure else "min-nodes"
    return (f"the federation has {online} SuperNode(s) online and this study needs {needed} ({why}); "
            f"on Flower's simulation engine run 'flwr federation simulation-config <federation> "
            f"<connection> --num-supernodes {needed}' (the default local federation has 2), in a "
            "deployment start more SuperNodes; for a labelled baseline without secure aggregation: "
            f"--run-config 'secure-aggregation=false min-nodes={max(online, 1)}'")
