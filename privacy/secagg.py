"""Secure aggregation wiring: Flower's SecAgg+ on both sides, with twinfed's choices.

- Nodes send the change of the weights over the round, each with weight 1: the SecAgg+ mod
  multiplies an update by ``num_examples / max_weight`` before quantising, so equal weights keep
  the full quantisation precision (and hide each site's size from the sum).
- Each update is clipped to ``[-update_clip, update_clip]`` and quantised to 2^22 levels: a step
  of 2.4e-7 for the default clip of 0.5, far below the DP noise in an update.
- Every node shares its keys with all others; the reconstruction threshold is a majority
  (n // 2 + 1, at least 2), so a round survives the loss of any minority of nodes and no minority
  of colluding nodes can unmask one node's update.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

QUANTIZATION_RANGE = 2**22
MODULUS_RANGE = 2**32
STATE_KEY = "twinfed"


MIN_NODES = 3  # SecAgg+ needs more than two shares


def check_secagg(plan, n_nodes: int) -> None:
    from twinfed.errors import TwinfedError

    if plan.privacy.secure_aggregation and n_nodes < MIN_NODES:
        raise TwinfedError(f"secure aggregation needs at least {MIN_NODES} sites, this study has "
                           f"{n_nodes}; add sites or, for a benchmark only, pass --no-secagg")


def threshold(n_nodes: int) -> int:
    return max(2, n_nodes // 2 + 1)


def server_workflow(n_nodes: int, update_clip: float):
    from flwr.server.workflow import SecAggPlusWorkflow

    return SecAggPlusWorkflow(num_shares=n_nodes, reconstruction_threshold=threshold(n_nodes),
                              max_weight=1.0, clipping_range=update_clip,
                              quantization_range=QUANTIZATION_RANGE, modulus_range=MODULUS_RANGE)


def secagg_when_asked(msg: Message, ctxt: Context, call_next) -> Message:
    """Run SecAgg+ on the coordinator's SecAgg+ rounds; record for the node whether this round is
    masked, so a plan that requires secure aggregation can refuse to send an unmasked update."""
    masked = (msg.metadata.message_type == MessageType.TRAIN
              and RECORD_KEY_CONFIGS in msg.content.config_records)
    ctxt.state.config_records[STATE_KEY] = ConfigRecord({"secagg": masked})
    return secaggplus_mod(msg, ctxt, call_next) if masked else call_next(msg, ctxt)


def round_is_masked(ctxt: Context) -> bool:
    rec = ctxt.state.config_records.get(STATE_KEY)
    return bool(rec and rec.get("secagg"))
