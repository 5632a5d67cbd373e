"""A node that refuses a masked round withdraws: its coded reply leaves in its error, and the
coordinator's SecAgg+ workflow reads it back as a refusal (never a failure, never a contributor)."""

import time

import pytest
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.app.message_type import MessageType
from flwr.clientapp.client_app import ClientAppException
from flwr.common import Error

from twinfed.client.boundary import NodeFailure, Withdrawn, make_boundary_mod
from twinfed.client.node import NodeConfig
from twinfed.privacy.secagg import withdrawal_text, withdrawn_reply
from twinfed.server.secagg_workflow import split_withdrawals
from twinfed.wire import NodeHead, NodeReply, Refusal, RefusalCode

REFUSED = NodeReply(site="b", status="refused", refusal=Refusal(code=RefusalCode.PLAN_NOT_APPROVED),
                    audit_head=NodeHead(hash="ab" * 32), key_fingerprint="cd" * 32)


def _train() -> Message:
    meta = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=7, reply_to_message_id="",
                    group_id="1", created_at=time.time(), ttl=3600.0, message_type=MessageType.TRAIN)
    return Message(content=RecordDict({"x": ConfigRecord({})}), metadata=meta)


def _withdraw(_msg, _ctxt):
    raise Withdrawn(REFUSED)


def _node_error(tmp_path) -> NodeFailure:
    node = NodeConfig(site_name="b", site_data=tmp_path, state_dir=tmp_path / "state")
    ctxt = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(NodeFailure) as caught:
        make_boundary_mod(lambda _c: node)(_train(), ctxt, _withdraw)
    return caught.value


def _flower_reasons(exc: Exception) -> list[str]:
    """The error reason the coordinator receives: deployed (flwr-clientapp) and simulated (Ray)."""
    deployed = str(type(exc)) + ":<'" + str(exc) + "'>"
    wrapped = ClientAppException(str(exc))
    return [deployed, str(type(wrapped)) + ":<'" + str(wrapped) + "'>"]


def test_a_withdrawing_node_sends_its_code_and_its_refused_reply_only(tmp_path):
    exc = _node_error(tmp_path)
    assert exc.code == RefusalCode.PLAN_NOT_APPROVED
    assert str(exc) == "twinfed node: plan_not_approved; " + withdrawal_text(REFUSED)
    for reason in _flower_reasons(exc):
        assert withdrawn_reply(reason) == REFUSED


def test_the_workflow_counts_withdrawals_as_refusals_once_and_keeps_real_failures(tmp_path):
    reason = _flower_reasons(_node_error(tmp_path))[1]
    other = Exception(Error(code=0, reason="<class 'RuntimeError'>:<'twinfed node: internal_error'>"))
    # Flower records an error reply twice at the masked-vector stage.
    withdrawn, failures = split_withdrawals([Exception(Error(code=0, reason=reason)), other,
                                             Exception(Error(code=0, reason=reason))])
    assert withdrawn == [REFUSED] and failures == [other]


def test_only_a_refused_reply_is_a_withdrawal():
    ok = NodeReply(site="b", status="ok")
    with pytest.raises(ValueError):
        withdrawal_text(ok)
    assert withdrawn_reply("withdrew from the masked round: " + ok.model_dump_json()) is None
    assert withdrawn_reply("withdrew from the masked round: {not json") is None
    assert withdrawn_reply("twinfed node: too_few_contributors") is None
