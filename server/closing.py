"""The end of a study, told to every node and anchored in both kinds of log.

After the coordinator's ``study_finished`` entry, each node gets one last message
(:class:`twinfed.wire.StudyFinish`) carrying that entry's head; the node logs its own
``study_finished`` anchored to it and replies with its audit head, which the coordinator records
in ``study_closed`` (by hash only, :class:`twinfed.wire.NodeHead`) and keeps as the node's
anchor for its next study. Then removing the last round, or the end, from any log breaks an anchor.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType

from twinfed.events import StudyClosed
from twinfed.wire import FINISH_RECORD, LogHead, NodeHead, NodeReply, StudyFinish


def close_study(grid, audit, finished, *, timeout: float, anchors=None) -> dict[str, NodeHead]:
    """Send the end of the study to every connected node; audit the heads they reply with (and
    keep them as the nodes' anchors, :class:`twinfed.server.strategy.NodeAnchors`, if given)."""
    d = finished.details
    finish = StudyFinish(plan_sha256=d["plan_sha256"], coordinator=LogHead(seq=finished.seq, hash=finished.hash),
                         rounds=d["rounds"], rounds_with_update=d["rounds_with_update"],
                         skipped_rounds=tuple(d["skipped_rounds"]), weights_sha256=d["weights_sha256"],
                         weights_file_sha256=d["weights_file_sha256"],
                         calibration_file_sha256=d.get("calibration_file_sha256"))
    node_ids = list(grid.get_node_ids())
    content = RecordDict({FINISH_RECORD: ConfigRecord({"finish": finish.model_dump_json()})})
    messages = [Message(content=content, dst_node_id=nid, message_type=MessageType.QUERY)
                for nid in node_ids]
    heads: dict[str, NodeHead] = {}
    acknowledged: list[NodeReply] = []
    for reply in grid.send_and_receive(messages, timeout=timeout) if messages else []:
        if reply.has_error():
            continue
        try:
            node = NodeReply.model_validate_json(str(reply.content.config_records[FINISH_RECORD]["reply"]))
        except (KeyError, ValueError):
            continue
        if node.status == "ok" and node.audit_head is not None:
            heads[node.site] = node.audit_head
            acknowledged.append(node)
    if anchors is not None:
        anchors.record(acknowledged)
    audit.append(StudyClosed(plan_sha256=finish.plan_sha256, node_heads=heads,
                             nodes_silent=len(node_ids) - len(heads)))
    return heads
