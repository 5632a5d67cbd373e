"""The outermost Flower mod of a node: nothing leaves it but the typed contract.

- Every message passes here first. Whatever raises inside the ClientApp (the gate never does,
  but SecAgg+, Flower or a bug might) is reported at the node's console in full and re-raised as
  :class:`NodeFailure` carrying only a code: Flower forwards an exception's text to the
  coordinator, so the text must be ours.
- At SecAgg+'s unmask stage the node withholds its shares when fewer than the plan's
  ``secagg.min_sites`` of its neighbours contributed a masked vector (audited as
  ``unmask_refused``): with the shares, the coordinator could unmask a sum of too few sites.
- A node that refuses a SecAgg+ round withdraws from it (:class:`Withdrawn`, raised by the
  ClientApp): no masked vector leaves, so for Flower it is a node dropped before its vector and
  it counts as a contributor for nobody. What leaves is its coded refusal (the
  :class:`twinfed.wire.NodeReply` it would have sent) in the error's text, which the
  coordinator's workflow reads back (:func:`twinfed.privacy.secagg.withdrawn_reply`).
- The end-of-study message (:class:`twinfed.wire.StudyFinish`) is answered here: the node logs
  its own ``study_finished`` anchored to the coordinator's and replies with its audit head.
- So is the roll call before a study: the node says who it is, or that it has no site
  configuration or state (a coded refusal), so a coordinator fails fast instead of waiting.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType

from twinfed.client.refusals import refusal_for, tell_node_console
from twinfed.errors import TwinfedError
from twinfed.events import StudyFinished, UnmaskRefused
from twinfed.wire import (FINISH_RECORD, ROLL_CALL_RECORD, UNCONFIGURED, NodeReply, Refusal,
                          RefusalCode, StudyFinish)


class NodeFailure(RuntimeError):
    """What the coordinator may learn of a node's failure: a code, nothing else."""

    def __init__(self, code: RefusalCode):
        super().__init__(f"twinfed node: {code.value}")
        self.code = code


class Withdrawn(Exception):
    """The node refuses a masked round: it sends ``reply`` (a refused NodeReply) and no vector."""

    def __init__(self, reply: NodeReply):
        super().__init__(reply.refusal.code.value if reply.refusal else "refused")
        self.reply = reply


class NodeWithdrew(NodeFailure):
    """The error a withdrawing node replies with: its code and its refused reply, nothing else."""

    def __init__(self, reply: NodeReply):
        from twinfed.privacy.secagg import withdrawal_text

        super().__init__(reply.refusal.code if reply.refusal else RefusalCode.INTERNAL_ERROR)
        self.args = (f"twinfed node: {self.code.value}; {withdrawal_text(reply)}",)
        self.reply = reply


def make_boundary_mod(resolve):
    """The boundary mod for nodes resolved by ``resolve(context) -> NodeConfig``."""

    def boundary(msg: Message, ctxt: Context, call_next) -> Message:
        try:
            if msg.metadata.message_type == MessageType.QUERY:
                if FINISH_RECORD in msg.content.config_records:
                    return _finish(resolve(ctxt), msg)
                if ROLL_CALL_RECORD in msg.content.config_records:
                    return _roll_call(resolve, msg, ctxt)
            _check_unmask(resolve, msg, ctxt)
            return call_next(msg, ctxt)
        except NodeFailure:
            raise
        except Withdrawn as w:  # refused, audited and told at the node's console by its gate
            raise NodeWithdrew(w.reply) from None
        except Exception as exc:  # noqa: BLE001 - the boundary: report locally, send a code
            site = _site(resolve, ctxt)
            tell_node_console(site, "message failed", exc)
            raise NodeFailure(refusal_for(exc).code) from None

    return boundary


def _site(resolve, ctxt) -> str:
    try:
        return resolve(ctxt).site_name
    except Exception:  # noqa: BLE001
        return "?"


def _check_unmask(resolve, msg: Message, ctxt: Context) -> None:
    from twinfed.models.plan import SecAggConfig
    from twinfed.privacy.secagg import remembered_round, unmask_contributors

    contributors = unmask_contributors(msg)
    if contributors is None:
        return
    remembered = remembered_round(ctxt)
    # A node that could not read the round's plan holds to the default minimum.
    need = int(remembered.get("min_sites", SecAggConfig().min_sites))
    if contributors >= need:
        return
    node = resolve(ctxt)
    refusal = Refusal(code=RefusalCode.TOO_FEW_CONTRIBUTORS)
    tell_node_console(node.site_name, "unmasking refused",
                      TwinfedError(f"only {contributors} of this node's SecAgg+ neighbours "
                                   f"contributed; the plan requires {need}"))
    try:
        from twinfed.governance.layout import open_audit

        open_audit(node.state_dir).append(UnmaskRefused(
            round=int(remembered.get("round", 0)),
            plan_sha256=str(remembered.get("plan_sha256", "0" * 64)), refusal=refusal,
            contributors=contributors, min_sites=need))
    except TwinfedError as exc:
        tell_node_console(node.site_name, "the refusal could not be audited", exc)
    raise NodeFailure(refusal.code)


def _finish(node, msg: Message) -> Message:
    from twinfed.governance.layout import open_audit, read_info

    finish = StudyFinish.model_validate_json(str(msg.content.config_records[FINISH_RECORD]["finish"]))
    audit = open_audit(node.state_dir)
    entry = audit.append(StudyFinished(
        plan_sha256=finish.plan_sha256, rounds=finish.rounds,
        rounds_with_update=finish.rounds_with_update, skipped_rounds=finish.skipped_rounds,
        weights_sha256=finish.weights_sha256, weights_file_sha256=finish.weights_file_sha256,
        calibration_file_sha256=finish.calibration_file_sha256, coordinator=finish.coordinator))
    reply = NodeReply(site=node.site_name, status="ok", audit_head=entry.node_head,
                      key_fingerprint=read_info(node.state_dir).key_fingerprint)
    return Message(RecordDict({FINISH_RECORD: ConfigRecord({"reply": reply.model_dump_json()})}),
                   reply_to=msg)


def _roll_call(resolve, msg: Message, ctxt: Context) -> Message:
    from twinfed.governance.layout import read_info

    try:
        node = resolve(ctxt)
    except Exception as exc:  # noqa: BLE001 - a node without site configuration says so
        tell_node_console("?", "roll call", exc)
        reply = NodeReply(site=UNCONFIGURED, status="refused",
                          refusal=Refusal(code=RefusalCode.NODE_NOT_INITIALISED))
    else:
        try:
            reply = NodeReply(site=node.site_name, status="ok",
                              key_fingerprint=read_info(node.state_dir).key_fingerprint)
        except TwinfedError as exc:
            tell_node_console(node.site_name, "roll call", exc)
            reply = NodeReply(site=node.site_name, status="refused", refusal=refusal_for(exc))
    return Message(RecordDict({ROLL_CALL_RECORD: ConfigRecord({"reply": reply.model_dump_json()})}),
                   reply_to=msg)
