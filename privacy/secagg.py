"""Secure aggregation wiring: Flower's SecAgg+ on both sides, with twinfed's rules.

- Nodes send the change of the weights over the round, each with weight 1: the SecAgg+ mod
  multiplies an update by ``num_examples / max_weight`` before quantising, so equal weights keep
  the full quantisation precision (and hide each site's size from the sum).
- Each update is clipped to ``[-update_clip, update_clip]`` and quantised to 2^22 levels: a step
  of 2.4e-7 for the default clip of 0.5, far below the DP noise in an update.
- The set-up is derived from the nodes actually sampled in the round and the assumptions the
  officers approved in the plan (:func:`required_setup`, :mod:`twinfed.privacy.neighbourhood`):
  each node shares its keys with a neighbourhood of k nodes (itself included; k grows like
  log n: 5 of 10 sampled nodes, 21 of 100, 45 of 1,000 under the default assumptions) and the
  reconstruction threshold t is chosen so that, with at most ``corrupt_fraction`` of the nodes
  corrupt and ``dropout_fraction`` dropping out, no honest node's update is exposed except with
  probability ``2^-security_bits`` and a round fails to complete with at most
  ``2^-correctness_bits``. Small consortia are all-to-all with a majority threshold.
- Both sides check it, with the same function. The coordinator's workflow never unmasks a sum
  of fewer sites that trained than the plan's ``secagg.min_sites`` (the round is skipped and
  audited); each node refuses to train in a round whose set-up (nodes sampled, shares,
  threshold) exposes it beyond the plan's bound, and withholds its unmasking shares when fewer
  than ``min_sites`` of its neighbours contributed.
- Only contributors count. A node that refuses a masked round *withdraws* from it: it sends no
  masked vector (not even a masked zero) and its coded reply travels in its error instead
  (:func:`withdrawal_text`). For SecAgg+ it is a node dropped before its vector: the survivors'
  shares remove its pairwise masks, the sum holds only the sites that trained, and the active
  list every node is sent at the unmask stage (what :func:`unmask_contributors` counts) is the
  list of nodes whose masked vectors the coordinator summed. A coordinator that skipped its own
  minimum-sum rule would still find every node's count short.

Threat model: SecAgg+ protects against an honest-but-curious coordinator (it follows the
protocol, shuffles the ring at random and reports dropouts truthfully; Flower's unmasking hands
out shares for whatever lists of active and dropped nodes the coordinator sends, so a malicious
coordinator could ask for both halves) colluding with up to the assumed fraction of nodes: a
node's update can be unmasked by t corrupt nodes *among its k - 1 neighbours* (not any t nodes
of the consortium), or if the corrupt and dropped nodes cut the honest ones' masking graph.
Differential privacy holds against everyone, the coordinator and the other sites included.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from fractions import Fraction

from flwr.app import ConfigRecord, Context, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.common.secure_aggregation.secaggplus_constants import (RECORD_KEY_CONFIGS,
                                                                 RECORD_KEY_STATE, Key, Stage)

from twinfed.errors import TwinfedError
from twinfed.privacy.neighbourhood import (MIN_SHARES, MIN_THRESHOLD, Assumptions, neighbourhood,
                                           privacy_failure)

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
    if plan.privacy.secure_aggregation:
        required_setup(n_nodes, plan)  # one line naming the assumption to relax if none fits


def required_setup(n_sampled: int, plan) -> tuple[int, int]:
    """``(num_shares, reconstruction_threshold)`` for a round that sampled ``n_sampled`` nodes:
    the neighbourhood the plan's assumptions call for (:mod:`twinfed.privacy.neighbourhood`).
    ``num_shares`` is odd or ``n_sampled``, so Flower builds exactly what it sends."""
    chosen = neighbourhood(n_sampled, Assumptions.of(plan))
    return chosen.shares, chosen.threshold


def weaker_than_plan(plan, *, sampled: int | None, shares: int | None,
                     threshold: int | None) -> str | None:
    """Why a round's SecAgg+ set-up falls short of what ``plan`` requires, or None.

    The node judges the set-up Flower will build from what it was sent, with the same bound the
    coordinator chose it by: too few shares (the honest nodes' masks may split) or a threshold
    too low for that many shares (too few corrupt neighbours could rebuild a node's key) exposes
    an update with more than the plan's ``2^-security_bits``. More shares with a threshold raised
    to match are as safe, and accepted."""
    if sampled is None or shares is None or threshold is None:
        return "the round's SecAgg+ set-up is unknown to this node"
    if sampled < min_sampled(plan):
        return f"the round sampled {sampled} nodes, the plan requires at least {min_sampled(plan)}"
    a = Assumptions.of(plan)
    if threshold < MIN_THRESHOLD or shares < MIN_SHARES:
        return f"the round's set-up ({shares} shares, threshold {threshold}) is not a SecAgg+ set-up"
    if privacy_failure(sampled, shares, threshold, a) > Fraction(1, 2**a.security_bits):
        try:
            need_shares, need_threshold = required_setup(sampled, plan)
        except TwinfedError as e:
            return str(e)
        return (f"the round shares keys among {shares} of {sampled} nodes with threshold {threshold}; "
                f"the plan's assumptions require e.g. {need_shares} shares with threshold "
                f"{need_threshold} (exposure above 2^-{a.security_bits})")
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
    says contributed a masked vector; None for any other message. Flower's active list is the
    nodes whose masked vectors were summed; a refusing node withdrew before sending one, so it
    is never among them."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return None
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    if configs is None or configs.get(Key.STAGE) != Stage.UNMASK:
        return None
    return len(configs.get(Key.ACTIVE_NODE_ID_LIST, []))


def remembered_round(ctxt: Context) -> dict:
    rec = ctxt.state.config_records.get(STATE_KEY)
    return dict(rec) if rec else {}


# -- a refusing node withdraws from a masked round ----------------------------------------------

WITHDREW = "withdrew from the masked round: "


def withdrawal_text(reply) -> str:
    """What a node that refuses a masked round says in its error instead of sending a masked
    vector: its coded :class:`twinfed.wire.NodeReply` (a refused one), nothing else."""
    if reply.status != "refused":
        raise ValueError("only a refusing node withdraws")
    return WITHDREW + reply.model_dump_json()


def withdrawn_reply(text: str):
    """The refused :class:`twinfed.wire.NodeReply` in a node's error text (however Flower
    wrapped it), or None when the error is no withdrawal."""
    from twinfed.wire import NodeReply

    at = text.find(WITHDREW)
    if at < 0:
        return None
    try:
        doc, _end = json.JSONDecoder().raw_decode(text, at + len(WITHDREW))
        reply = NodeReply.model_validate(doc)
    except ValueError:
        return None
    return reply if reply.status == "refused" else None
