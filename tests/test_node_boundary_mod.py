"""The node's outermost mod, with real Flower messages: codes out, shares withheld, the end logged."""

import json
import time

import pytest
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.app.message_type import MessageType
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from twinfed.client.boundary import NodeFailure, make_boundary_mod
from twinfed.client.node import NodeConfig
from twinfed.governance.layout import state_paths
from twinfed.governance.node_state import init_node
from twinfed.privacy.secagg import remember_round
from twinfed.wire import FINISH_RECORD, LogHead, NodeHead, NodeReply, StudyFinish

PLAN = "cd" * 32


@pytest.fixture
def node(tmp_path):
    init_node(tmp_path / "state", site_name="a")
    return NodeConfig(site_name="a", site_data=tmp_path, state_dir=tmp_path / "state")


def _message(content: RecordDict, message_type: str) -> Message:
    """A message as the node receives it from the SuperLink."""
    meta = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=7, reply_to_message_id="",
                    group_id="1", created_at=time.time(), ttl=3600.0, message_type=message_type)
    return Message(content=content, metadata=meta)


def _context() -> Context:
    return Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})


def _unmask(active: list[int]) -> Message:
    configs = ConfigRecord({Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: active,
                            Key.DEAD_NODE_ID_LIST: []})
    return _message(RecordDict({RECORD_KEY_CONFIGS: configs}), MessageType.TRAIN)


def _last_event(node) -> dict:
    return json.loads(state_paths(node.state_dir).audit.read_text().splitlines()[-1])


def test_a_node_withholds_its_shares_when_too_few_sites_contributed(node):
    mod, ctxt = make_boundary_mod(lambda _c: node), _context()
    remember_round(ctxt, plan_sha256=PLAN, server_round=2, min_required=3)
    reached = []
    with pytest.raises(NodeFailure, match="^twinfed node: too_few_contributors$"):
        mod(_unmask([7, 9]), ctxt, lambda m, c: reached.append(m))
    assert reached == []  # SecAgg+ never saw the request: no share left the node
    event = _last_event(node)
    assert event["event"] == "unmask_refused" and event["details"]["contributors"] == 2
    assert event["details"]["round"] == 2 and event["details"]["min_sites"] == 3


def test_enough_contributors_pass_through_to_secagg(node):
    mod, ctxt = make_boundary_mod(lambda _c: node), _context()
    remember_round(ctxt, plan_sha256=PLAN, server_round=1, min_required=3)
    assert mod(_unmask([7, 9, 11]), ctxt, lambda m, c: "passed") == "passed"


def test_an_exception_inside_the_client_app_leaves_as_a_code_only(node, capsys):
    mod = make_boundary_mod(lambda _c: node)

    def inner(_m, _c):
        raise ValueError("/srv/exports/site-a/timeseries.csv row 3: 612.5 for p17")

    with pytest.raises(NodeFailure) as caught:
        mod(_unmask([1, 2, 3]), _context(), inner)
    assert str(caught.value) == "twinfed node: internal_error"
    assert "612.5" in capsys.readouterr().err  # hospital IT's console has the detail


def test_the_end_of_the_study_is_logged_at_the_node_and_its_head_returned(node):
    finish = StudyFinish(plan_sha256=PLAN, coordinator=LogHead(seq=12, hash="ee" * 32), rounds=2,
                         rounds_with_update=2, weights_sha256="aa" * 32, weights_file_sha256="bb" * 32)
    msg = _message(RecordDict({FINISH_RECORD: ConfigRecord({"finish": finish.model_dump_json()})}),
                   MessageType.QUERY)
    reply = make_boundary_mod(lambda _c: node)(msg, _context(), lambda m, c: pytest.fail("not a round"))
    answer = NodeReply.model_validate_json(reply.content.config_records[FINISH_RECORD]["reply"])
    event = _last_event(node)
    assert event["event"] == "study_finished" and event["details"]["coordinator"] == {"seq": 12, "hash": "ee" * 32}
    assert answer.audit_head == NodeHead(hash=event["hash"])
