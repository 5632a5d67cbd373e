"""The allow-list of what crosses a node's boundary and what audit logs may hold, field by field.

Adding a field to a reply or an audit event is a privacy decision: it must be added here, with
its kind, by someone who read why. These tests fail on any field nobody reviewed.
"""

import pytest
from pydantic import ValidationError

from twinfed.events import EVENTS
from twinfed.wire import (DECLARED, DP, PROTOCOL, RELEASE, NodeReply, Refusal, RefusalCode,
                          RoundInstruction, field_paths)

# Every field of every audit event's details. A node's own log may hold exact counts (it stays at
# the hospital: round_joined, study_calibrated); the coordinator's events never do.
AUDIT_FIELDS = {
    "node_initialised": ["format", "key_fingerprint", "site"],
    "coordinator_initialised": ["coordinator", "format", "key_fingerprint"],
    "consent_imported": ["duplicates", "purposes", "records_added", "records_read", "source_sha256"],
    "consent_changed": ["purpose", "purposes", "records_added", "status"],
    "plan_approved": ["delta", "differential_privacy", "epsilon", "plan_sha256", "purpose", "rounds",
                      "secure_aggregation"],
    "plan_revoked": ["plan_sha256"],
    "privacy_budget_set": ["accountant", "delta_budget", "epsilon_budget"],
    "privacy_spent": ["delta", "epsilon_after", "mechanism", "noise_multiplier", "plan_sha256", "round",
                      "sample_rate", "steps"],
    "privacy_ledger_rebuilt": ["epsilon_budget", "segments"],
    "study_calibrated": ["count_noise", "delta", "noise_multiplier", "patients_excluded", "patients_used",
                         "plan_sha256", "planned_steps", "released_patients_excluded",
                         "released_patients_used", "sample_rate", "target_epsilon"],
    "model_received": ["coordinator.hash", "coordinator.seq", "plan_sha256", "round", "weights_sha256"],
    "plan_refused": ["plan_sha256", "refusal.code", "refusal.column", "refusal.file", "refusal.row", "round"],
    "budget_exhausted": ["plan_sha256", "refusal.code", "refusal.column", "refusal.file", "refusal.row",
                         "round"],
    "round_refused": ["coordinator.hash", "coordinator.seq", "plan_sha256", "refusal.code", "refusal.column",
                      "refusal.file", "refusal.row", "round"],
    "round_joined": ["coordinator.hash", "coordinator.seq", "delta", "differential_privacy", "epsilon_budget",
                     "epsilon_spent", "epsilon_study", "noise_multiplier", "patients_excluded",
                     "patients_used", "plan_sha256", "round", "steps", "update_clip_fraction"],
    "model_sent": ["plan_sha256", "round", "secure_aggregation", "update_sha256"],
    "aggregate_released": ["aggregate_sha256", "components", "coordinator.hash", "coordinator.seq",
                           "epsilon_spent", "kind", "noise_multiplier", "patients_excluded",
                           "patients_used", "plan_sha256", "round", "sensitivity"],
    "unmask_refused": ["contributors", "min_sites", "plan_sha256", "refusal.code", "refusal.column",
                       "refusal.file", "refusal.row", "round"],
    "study_started": ["differential_privacy", "epsilon_per_site", "min_nodes", "plan_sha256", "purpose",
                      "rounds", "secagg_min_sites", "secure_aggregation"],
    "round_started": ["plan_sha256", "round"],
    "node_seen": ["key_fingerprint", "site"],
    "round_aggregated": ["failures", "node_heads.hash", "plan_sha256", "round",
                         "secagg.sampled", "secagg.shares", "secagg.threshold", "sites_refused.code",
                         "sites_refused.column", "sites_refused.file", "sites_refused.row",
                         "sites_replied", "sites_trained", "update_norm", "weights_sha256"],
    "round_skipped": ["code", "coordinator.hash", "coordinator.seq", "min_sites", "node_heads.hash",
                      "plan_sha256", "round", "sites_refused.code", "sites_refused.column",
                      "sites_refused.file", "sites_refused.row", "sites_trained"],
    "study_finished": ["calibration_file_sha256", "coordinator.hash", "coordinator.seq", "plan_sha256",
                       "rounds", "rounds_with_update", "skipped_rounds", "weights_file_sha256",
                       "weights_sha256"],
    "trial_finished": ["node_heads.hash", "plan_sha256", "results_file_sha256",
                       "sites_refused.code", "sites_refused.column", "sites_refused.file",
                       "sites_refused.row", "sites_released"],
    "study_closed": ["node_heads.hash", "nodes_silent", "plan_sha256"],
    "study_aborted": ["code", "plan_sha256"],
}
NODE_ONLY = {"round_joined", "study_calibrated", "aggregate_released"}  # may hold exact counts
FORBIDDEN = ("loss", "reason", "value", "path", "patient_id", "message")


def test_every_reply_field_is_classified_and_nothing_else_can_be_sent():
    assert set(field_paths(NodeReply)) == set(RELEASE)
    assert set(RELEASE.values()) <= {PROTOCOL, DECLARED, DP}
    for path in RELEASE:
        assert not any(word in path for word in FORBIDDEN), path
    # Counts leave a node only DP-released.
    assert {p for p in RELEASE if "patients" in p} == {"released.counts.patients_used",
                                                       "released.counts.patients_excluded"}
    assert all(RELEASE[p] == DP for p in RELEASE if "patients" in p)


def test_every_audit_event_payload_is_on_the_allow_list():
    assert {name: sorted(field_paths(cls)) for name, cls in EVENTS.items()} == AUDIT_FIELDS
    for name, fields in AUDIT_FIELDS.items():
        assert not any(word in f for f in fields for word in FORBIDDEN), name
        if name not in NODE_ONLY:
            assert not any(f in ("patients_used", "patients_excluded") for f in fields), name


@pytest.mark.parametrize("extra", [{"train_loss": 0.4}, {"patients_used": 41}, {"reason": "row 3: 900"}])
def test_a_reply_with_any_other_field_is_rejected(extra):
    base = {"site": "a", "status": "refused", "refusal": {"code": "budget_exhausted"}}
    NodeReply.model_validate(base)
    with pytest.raises(ValidationError):
        NodeReply.model_validate(base | extra)


@pytest.mark.parametrize("where", [{"file": "/srv/exports/site-a/timeseries.csv"}, {"file": "notes.txt"},
                                   {"column": "glucose 900"}, {"row": 0}])
def test_a_refusal_names_only_contract_files_plain_columns_and_real_rows(where):
    with pytest.raises(ValidationError):
        Refusal(code=RefusalCode.DATA_INVALID, **where)


def test_an_instruction_whose_plan_does_not_hash_to_its_sha_is_rejected():
    with pytest.raises(ValidationError, match="does not hash"):
        RoundInstruction(plan_json="{}", plan_sha256="0" * 64, round=1)


def test_a_refused_reply_carries_a_refusal_and_releases_nothing():
    with pytest.raises(ValidationError):
        NodeReply(site="a", status="refused")
    with pytest.raises(ValidationError):
        NodeReply(site="a", status="ok", refusal=Refusal(code=RefusalCode.INTERNAL_ERROR))
    with pytest.raises(ValidationError):
        NodeReply(site="../coordinator", status="refused", refusal=Refusal(code=RefusalCode.INTERNAL_ERROR))
