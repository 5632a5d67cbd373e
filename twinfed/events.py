"""The payload of every audit event twinfed writes: one typed model per event name.

Audit logs hold counts, hashes, budgets and coded outcomes, never patient data, identifiers,
values or paths. Each model here is the allow-list of one event's ``details``
(``extra="forbid"``); :class:`twinfed.governance.audit_log.AuditLog` validates every event it
appends against :data:`EVENTS`, so a writer cannot add a field nobody reviewed. A node's own log
may hold exact counts (it stays at the hospital); the coordinator's holds what nodes released.

Field names mean one thing everywhere: ``weights_sha256`` is the digest of a list of weight
arrays (:func:`twinfed.models.digest.weights_sha256`), ``weights_file_sha256`` the SHA-256 of a
``weights.npz`` file's bytes. (Logs written before this module used ``model_sha256`` for both; they
still verify.)
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from twinfed.wire import Hex64, LogHead, NodeHead, Refusal

Count = Annotated[int, Field(ge=0)]
Round = Annotated[int, Field(ge=0)]
Epsilon = Annotated[float, Field(ge=0)]


class AuditEvent(BaseModel):
    """Base of every event payload; ``EVENT`` is the event's name in the log."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    EVENT: ClassVar[str]


# -- state directories ------------------------------------------------------------------------

class NodeInitialised(AuditEvent):
    EVENT = "node_initialised"
    format: str
    site: str
    key_fingerprint: Hex64


class CoordinatorInitialised(AuditEvent):
    EVENT = "coordinator_initialised"
    format: str
    coordinator: str
    key_fingerprint: Hex64


# -- consent and approvals (officers) ---------------------------------------------------------

PurposeCounts = dict[str, dict[Literal["granted", "withdrawn"], Count]]


class ConsentImported(AuditEvent):
    EVENT = "consent_imported"
    source_sha256: Hex64
    records_read: Count
    records_added: Count
    duplicates: Count
    purposes: PurposeCounts


class ConsentChanged(AuditEvent):
    EVENT = "consent_changed"
    purpose: str
    status: Literal["granted", "withdrawn"]
    records_added: Count
    purposes: PurposeCounts


class PlanApproved(AuditEvent):
    EVENT = "plan_approved"
    plan_sha256: Hex64
    purpose: str
    rounds: Count
    epsilon: float
    delta: float
    differential_privacy: bool = True
    secure_aggregation: bool = True


class PlanRevoked(AuditEvent):
    EVENT = "plan_revoked"
    plan_sha256: Hex64


# -- the privacy ledger, mirrored ---------------------------------------------------------------

class PrivacyBudgetSet(AuditEvent):
    """The site's budget, an (epsilon, delta) pair: set when its ledger is created (the first DP
    plan's epsilon and delta) or by the privacy officer. Events written before delta was part of
    the budget have no ``delta_budget``: they read as 1e-5 (``twinfed.ledger_file.DEFAULT_DELTA``)."""

    EVENT = "privacy_budget_set"
    epsilon_budget: Annotated[float, Field(gt=0)]
    delta_budget: Annotated[float, Field(gt=0, lt=1)] = 1e-5
    accountant: Literal["rdp", "prv"]


class PrivacySpent(AuditEvent):
    """One DP release reserved in the ledger, before the computation it pays for starts."""

    EVENT = "privacy_spent"
    round: Round  # 0: a study-level release (the noisy patient counts)
    plan_sha256: Hex64
    mechanism: Literal["dp-sgd", "gaussian-count", "gaussian-sum"]
    sample_rate: Annotated[float, Field(gt=0, le=1)]
    noise_multiplier: Annotated[float, Field(gt=0)]
    steps: Annotated[int, Field(ge=1)]
    delta: Annotated[float, Field(gt=0, lt=1)]
    epsilon_after: Epsilon  # the site's total at ``delta`` once this release is counted


class PrivacyLedgerRebuilt(AuditEvent):
    """An officer rebuilt ``privacy_ledger.json`` from this log's spending events."""

    EVENT = "privacy_ledger_rebuilt"
    segments: Count
    epsilon_budget: Annotated[float, Field(gt=0)]


class StudyCalibrated(AuditEvent):
    """A node's once-per-study privacy set-up. Exact counts stay here, at the node."""

    EVENT = "study_calibrated"
    plan_sha256: Hex64
    patients_used: Count  # exact
    patients_excluded: Count  # exact
    released_patients_used: Count  # what the reply carries: noisy
    released_patients_excluded: Count
    count_noise: Annotated[float, Field(gt=0)]
    sample_rate: Annotated[float, Field(gt=0, le=1)]
    noise_multiplier: Annotated[float, Field(gt=0)]
    delta: Annotated[float, Field(gt=0, lt=1)]
    target_epsilon: Epsilon
    planned_steps: Count


# -- a node's rounds ----------------------------------------------------------------------------

class ModelReceived(AuditEvent):
    EVENT = "model_received"
    round: Round
    plan_sha256: Hex64
    weights_sha256: Hex64
    coordinator: LogHead | None = None


class PlanRefused(AuditEvent):
    EVENT = "plan_refused"
    round: Round
    plan_sha256: Hex64
    refusal: Refusal


class BudgetExhausted(AuditEvent):
    EVENT = "budget_exhausted"
    round: Round
    plan_sha256: Hex64
    refusal: Refusal


class RoundRefused(AuditEvent):
    EVENT = "round_refused"
    round: Round
    plan_sha256: Hex64
    refusal: Refusal
    coordinator: LogHead | None = None


class RoundJoined(AuditEvent):
    """A round the node trained. Exact counts: this log stays at the node."""

    EVENT = "round_joined"
    round: Round
    plan_sha256: Hex64
    coordinator: LogHead | None = None
    patients_used: Count
    patients_excluded: Count
    steps: Count
    differential_privacy: bool
    epsilon_study: Epsilon | None = None
    epsilon_spent: Epsilon | None = None
    epsilon_budget: Epsilon | None = None
    delta: float | None = None
    noise_multiplier: float | None = None
    update_clip_fraction: Annotated[float, Field(ge=0, le=1)]


class ModelSent(AuditEvent):
    EVENT = "model_sent"
    round: Round
    plan_sha256: Hex64
    update_sha256: Hex64
    secure_aggregation: bool


class AggregateReleased(AuditEvent):
    """A node released a DP aggregate: a trial's per-arm sums or the calibration histogram of its
    held-out patients. The exact number of patients stays here, at the node; what left was the
    sum with Gaussian noise of ``noise_multiplier`` x ``sensitivity`` on every one of its
    ``components`` (already reserved in the ledger)."""

    EVENT = "aggregate_released"
    round: Round
    plan_sha256: Hex64
    kind: Literal["trial", "calibration"]
    coordinator: LogHead | None = None
    patients_used: Count  # exact
    patients_excluded: Count  # exact: consented, but without the record the release needs
    components: Count
    sensitivity: Annotated[float, Field(gt=0)]
    noise_multiplier: Annotated[float, Field(gt=0)] | None = None  # None: a non-DP baseline
    epsilon_spent: Epsilon | None = None  # the site's total once this release is counted
    aggregate_sha256: Hex64  # digest of the vector as sent (before masking)


class UnmaskRefused(AuditEvent):
    """The node withheld its unmasking shares: too few sites contributed to the sum."""

    EVENT = "unmask_refused"
    round: Round
    plan_sha256: Hex64
    refusal: Refusal
    contributors: Count
    min_sites: Count


# -- the coordinator ----------------------------------------------------------------------------

class StudyStarted(AuditEvent):
    EVENT = "study_started"
    plan_sha256: Hex64
    purpose: str
    rounds: Count
    min_nodes: Count
    differential_privacy: bool
    epsilon_per_site: float
    secure_aggregation: bool
    secagg_min_sites: Count | None = None


class RoundStarted(AuditEvent):
    EVENT = "round_started"
    round: Round
    plan_sha256: Hex64


class NodeSeen(AuditEvent):
    EVENT = "node_seen"
    site: str
    key_fingerprint: Hex64


class SecAggSetup(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    sampled: Count
    shares: Count
    threshold: Count


class RoundAggregated(AuditEvent):
    EVENT = "round_aggregated"
    round: Round
    plan_sha256: Hex64
    node_heads: dict[str, NodeHead]
    sites_replied: Count
    sites_trained: Count
    sites_refused: dict[str, Refusal]
    failures: Count
    weights_sha256: Hex64  # the global weights after this round
    update_norm: Annotated[float, Field(ge=0)] | None = None
    secagg: SecAggSetup | None = None


class RoundSkipped(AuditEvent):
    """A round whose sum was not unmasked (coordinator), or a node's record of that news."""

    EVENT = "round_skipped"
    round: Round
    plan_sha256: Hex64
    code: str
    sites_trained: Count | None = None  # coordinator: how many sites trained
    min_sites: Count | None = None
    node_heads: dict[str, NodeHead] = {}
    sites_refused: dict[str, Refusal] = {}
    coordinator: LogHead | None = None  # node: the coordinator's instruction that told it


class StudyFinished(AuditEvent):
    """The end of a study: the coordinator's entry, and each node's, anchored to it."""

    EVENT = "study_finished"
    plan_sha256: Hex64
    rounds: Count
    rounds_with_update: Count
    skipped_rounds: tuple[int, ...] = ()
    weights_sha256: Hex64
    weights_file_sha256: Hex64
    coordinator: LogHead | None = None  # node: the coordinator's study_finished entry
    # SHA-256 of model/calibration.json as written, when the study calibrated prediction intervals
    calibration_file_sha256: Hex64 | None = None


class TrialFinished(AuditEvent):
    """The end of a federated in-silico trial at the coordinator: what it combined and wrote."""

    EVENT = "trial_finished"
    plan_sha256: Hex64
    sites_released: Count
    sites_refused: dict[str, Refusal]
    node_heads: dict[str, NodeHead]
    results_file_sha256: Hex64 | None = None  # trial.json as written (None: nothing to combine)


class StudyClosed(AuditEvent):
    """The coordinator's record of the nodes that logged the end of the study, with their heads."""

    EVENT = "study_closed"
    plan_sha256: Hex64
    node_heads: dict[str, NodeHead]
    nodes_silent: Count  # nodes that did not acknowledge in time


class StudyAborted(AuditEvent):
    EVENT = "study_aborted"
    plan_sha256: Hex64
    code: str


EVENTS: dict[str, type[AuditEvent]] = {
    cls.EVENT: cls for cls in (
        NodeInitialised, CoordinatorInitialised, ConsentImported, ConsentChanged, PlanApproved,
        PlanRevoked, PrivacyBudgetSet, PrivacySpent, PrivacyLedgerRebuilt, StudyCalibrated,
        ModelReceived, PlanRefused, BudgetExhausted, RoundRefused, RoundJoined, ModelSent,
        AggregateReleased, UnmaskRefused, StudyStarted, RoundStarted, NodeSeen, RoundAggregated,
        RoundSkipped, StudyFinished, TrialFinished, StudyClosed, StudyAborted)
}
