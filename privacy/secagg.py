"""Secure aggregation wiring: Flower's SecAgg+ on both sides, with twinfed's rules.

- Nodes send the change of the weights over the round, each with weight 1: the SecAgg+ mod
  multiplies an update by ``num_examples / max_weight`` before quantising, so equal weights keep
  the full quantisation precision (and hide each site's size from the sum).
- Each update is clipped to ``[-update_clip, update_clip]`` and quantised to 2^22 levels: a step
  of 2.4e-7 for the default clip of 0.5, far below the DP noise in an update.
- The set-up is derived from the nodes actually sampled in the round (:func:`required_setup`):
  every node shares its keys with all others and the reconstruction threshold is a majority
  (n // 2 + 1, at least 2), so a round survives the loss of any minority of nodes and no
  minority of colluding nodes can unmask one node's update.
- Both sides check it. The coordinator's workflow never unmasks a sum of fewer sites that
  trained than the plan's ``secagg.min_sites`` (the round is skipped and audited); each node
  refuses to train in a round whose set-up is weaker than the plan requires, and withholds its
  unmasking shares when fewer than ``min_sites`` of its neighbours contributed.

Threat model: SecAgg+ protects against an honest-but-curious coordinator (it follows the
protocol; Flower's unmasking hands out shares for whatever lists of active and dropped nodes the
coordinator sends, so a malicious coordinator could ask for both halves) and against coalitions
of fewer than ``threshold`` nodes. Differential privacy holds against everyone, the coordinator
and the other sites included.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ConfigRecord, Context, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.common.secure_aggregation.secaggplus_constants import (RECORD_KEY_CONFIGS,
                                                                 RECORD_KEY_STATE, Key, Stage)

from twinfed.errors import TwinfedError

QUANTIZATION_RANGE = 2**22
MODULUS_RANGE = 2**32
STATE_KEY = "twinfed"
MIN_NODES = 3  # SecAgg+ needs more than two shares


@dataclass(frozen=True)
class SecAggView:
    """What a node knows of its round's secure aggregation (from the SecAgg+ mod's state)."""

    masked: bool
    sampled: int | None = None
    shares: int | None = None
    threshold: int | None = None


def min_sampled(plan) -> int:
    """Nodes a SecAgg+ round must sample: the protocol's minimum and the plan's minimum sum."""
    return max(MIN_NODES, plan.privacy.secagg.min_sites)


def min_sum(plan) -> int:
    """Sites whose updates a sum must hold before anyone helps unmask it."""
    return plan.privacy.secagg.min_sites


def check_secagg(plan, n_nodes: int) -> None:
    if plan.privacy.secure_aggregation and n_nodes < min_sampled(plan):
        raise TwinfedError(f"secure aggregation needs at least {min_sampled(plan)} sites, this study "
                           f"has {n_nodes}; add sites or, for a benchmark only, turn secure "
                           "aggregation off (--no-secagg)")


def required_setup(n_sampled: int, plan) -> tuple[int, int]:
    """``(num_shares, reconstruction_threshold)`` for a round that sampled ``n_sampled`` nodes."""
    return n_sampled, max(2, n_sampled // 2 + 1)


def weaker_than_plan(plan, *, sampled: int | None, shares: int | None,
                     threshold: int | None) -> str | None:
    """Why a round's SecAgg+ set-up falls short of what ``plan`` requires, or None."""
    if sampled is None or shares is None or threshold is None:
        return "the round's SecAgg+ set-up is unknown to this node"
    if sampled < min_sampled(plan):
        return f"the round sampled {sampled} nodes, the plan requires at least {min_sampled(plan)}"
    need_shares, need_threshold = required_setup(sampled, plan)
    if shares < need_shares:
        return f"the round shares keys among {shares} nodes, the plan requires {need_shares}"
    if threshold < need_threshold:
        return f"the round's threshold is {threshold}, the plan requires {need_threshold}"
    return None


# -- node side ----------------------------------------------------------------------------------

def secagg_when_asked(msg: Message, ctxt: Context, call_next) -> Message:
    """Run SecAgg+ on the coordinator's SecAgg+ rounds; record for the node whether this round is
    masked, so a plan that requires secure aggregation can refuse to send an unmasked update."""
    masked = (msg.metadata.message_type == MessageType.TRAIN
              and RECORD_KEY_CONFIGS in msg.content.config_records)
    record = dict(ctxt.state.config_records.get(STATE_KEY, ConfigRecord({})))
    ctxt.state.config_records[STATE_KEY] = ConfigRecord(record | {"secagg": masked})
    return secaggplus_mod(msg, ctxt, call_next) if masked else call_next(msg, ctxt)


def secagg_view(ctxt: Context) -> SecAggView:
    rec = ctxt.state.config_records.get(STATE_KEY)
    if not (rec and rec.get("secagg")):
        return SecAggView(masked=False)
    st = ctxt.state.config_records.get(RECORD_KEY_STATE) or {}
    get = (lambda k: int(st[k]) if k in st else None)
    return SecAggView(masked=True, sampled=get("sample_num"), shares=get("share_num"),
                      threshold=get("threshold"))


def remember_round(ctxt: Context, *, plan_sha256: str, server_round: int, min_required: int) -> None:
    """What the unmask stage must check, kept in the node's context between messages."""
    record = dict(ctxt.state.config_records.get(STATE_KEY, ConfigRecord({})))
    ctxt.state.config_records[STATE_KEY] = ConfigRecord(
        record | {"plan_sha256": plan_sha256, "round": server_round, "min_sites": min_required})


def unmask_contributors(msg: Message) -> int | None:
    """At the unmask stage: how many of this node's neighbours (itself included) the coordinator
    says contributed a masked vector; None for any other message."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return None
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    if configs is None or configs.get(Key.STAGE) != Stage.UNMASK:
        return None
    return len(configs.get(Key.ACTIVE_NODE_ID_LIST, []))


def remembered_round(ctxt: Context) -> dict:
    rec = ctxt.state.config_records.get(STATE_KEY)
    return dict(rec) if rec else {}
