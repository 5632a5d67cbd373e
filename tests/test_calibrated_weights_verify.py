"""A study's calibration is released for the weights the study ended with, or `audit verify` says so.

The coordinator asks nodes for a study's calibration (round ``rounds + 1`` of its plan) before it
closes the study, so a node cannot refuse other weights at that moment: its ``study_finished``,
which names the final weights, comes after. The node's log keeps all three (``model_received``
with the weights' hash, ``aggregate_released`` of kind calibration, then ``study_finished``), and
verifying the node alone compares them.
"""

from audit_builders import PLAN_SHA, Clock
from twinfed import events as ev
from twinfed.governance.layout import open_audit
from twinfed.governance.node_state import init_node
from twinfed.governance.verify import verify_path

FINAL, OTHER = "f" * 64, "0" * 64
ROUNDS = 2


def _released(plan: str = PLAN_SHA) -> ev.AggregateReleased:
    return ev.AggregateReleased(round=ROUNDS + 1, plan_sha256=plan, kind="calibration", patients_used=5,
                                patients_excluded=0, components=14, sensitivity=1.0,
                                aggregate_sha256="c" * 64)


def _node(root, calibrated_weights: str):
    """A node that trained ``ROUNDS`` rounds, released the calibration for ``calibrated_weights``
    and then closed the study on ``FINAL``."""
    init_node(root, site_name="a")
    log = open_audit(root, clock=Clock())
    for r in range(1, ROUNDS + 1):
        log.append(ev.ModelReceived(round=r, plan_sha256=PLAN_SHA, weights_sha256=OTHER))
    log.append(ev.ModelReceived(round=ROUNDS + 1, plan_sha256=PLAN_SHA, weights_sha256=calibrated_weights))
    log.append(_released())
    log.append(ev.StudyFinished(plan_sha256=PLAN_SHA, rounds=ROUNDS, rounds_with_update=ROUNDS,
                                weights_sha256=FINAL, weights_file_sha256=FINAL))
    return root


def test_a_calibration_of_the_final_weights_verifies(tmp_path):
    assert verify_path(_node(tmp_path / "s", FINAL)).issues == []


def test_a_calibration_released_for_other_weights_than_the_study_ended_with_fails_verify(tmp_path):
    issues = verify_path(_node(tmp_path / "s", OTHER)).issues
    assert [i.seq for i in issues] == [ROUNDS + 2]  # the release (seq 0 is the node's initialisation)
    assert f"(seq {ROUNDS + 1}), not the weights the study ended with" in issues[0].reason


def test_a_request_refused_after_the_end_or_another_plans_release_is_no_finding(tmp_path):
    """A later request for other weights that the node refused released nothing; a trial plan's
    release is no calibration of this study."""
    root = _node(tmp_path / "s", FINAL)
    log = open_audit(root, clock=Clock())
    log.append(ev.ModelReceived(round=ROUNDS + 1, plan_sha256=PLAN_SHA, weights_sha256=OTHER))
    log.append(ev.ModelReceived(round=ROUNDS + 1, plan_sha256="a" * 64, weights_sha256=OTHER))
    log.append(_released(plan="a" * 64))
    assert verify_path(root).issues == []
