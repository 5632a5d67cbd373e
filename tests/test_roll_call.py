"""The roll call before a study: what the coordinator says when nodes are too few, unconfigured,
refuse, or never answer (Flower's Grid replaced by a stand-in that answers as told)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from flwr.supercore.task_identity import TaskIdentity

from twinfed.errors import TwinfedError
from twinfed.server import roll_call as rc
from twinfed.wire import ROLL_CALL_RECORD, UNCONFIGURED, NodeReply, Refusal, RefusalCode


class Nodes:
    """Node ids, and the replies the nodes give (None: a node that never answers)."""

    def __init__(self, replies: list[NodeReply | None]):
        self.replies = replies
        self.timeouts: list[float | None] = []

    def get_node_ids(self):
        return list(range(1, len(self.replies) + 1))

    def send_and_receive(self, messages, *, timeout=None):
        self.timeouts.append(timeout)
        out = []
        for reply in self.replies:
            if reply is None:
                continue
            content = SimpleNamespace(config_records={ROLL_CALL_RECORD: {"reply": reply.model_dump_json()}})
            out.append(SimpleNamespace(has_error=lambda: False, content=content))
        return out


@pytest.fixture(autouse=True)
def in_a_run(monkeypatch):
    """Flower builds messages only inside a run."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)


def ok(site: str) -> NodeReply:
    return NodeReply(site=site, status="ok")


def test_every_node_ready_passes():
    nodes = Nodes([ok("a"), ok("b"), ok("c")])
    assert [r.site for r in rc.roll_call(nodes, 3, secure=True)] == ["a", "b", "c"]
    assert nodes.timeouts == [rc.REPLY_WAIT_S]


def test_nodes_that_never_answer_are_named_as_such_not_as_uninitialised():
    with pytest.raises(TwinfedError, match=r"2 of 3 SuperNode\(s\) did not answer the roll call") as err:
        rc.roll_call(Nodes([ok("a"), None, None]), 3, secure=True)
    assert "node init" not in str(err.value) and "\n" not in str(err.value)


def test_unconfigured_nodes_get_the_run_config_to_set():
    unconfigured = NodeReply(site=UNCONFIGURED, status="refused",
                             refusal=Refusal(code=RefusalCode.NODE_NOT_INITIALISED))
    with pytest.raises(TwinfedError, match="no site configured.*run-config key sites"):
        rc.roll_call(Nodes([ok("a"), unconfigured, unconfigured]), 3, secure=True)


def test_refusing_nodes_are_named_with_their_code():
    refused = NodeReply(site="b", status="refused", refusal=Refusal(code=RefusalCode.NODE_NOT_INITIALISED))
    with pytest.raises(TwinfedError, match=r"only 2 of 3 .*b: .*node init"):
        rc.roll_call(Nodes([ok("a"), refused, ok("c")]), 3, secure=True)


def test_too_few_nodes_say_how_to_get_more_within_the_wait(monkeypatch):
    monkeypatch.setattr(rc, "_POLL_S", 0.01)
    with pytest.raises(TwinfedError, match="--num-supernodes 3"):
        rc.roll_call(Nodes([ok("a"), ok("b")]), 3, secure=True, wait=0.05)
