"""What crosses the node boundary: the typed messages between coordinator and hospital nodes.

Torch-free pydantic models shared by writers and readers (``extra="forbid"``: a field nobody
declared here cannot be sent or accepted).

Coordinator -> node: :class:`RoundInstruction` (the plan as its canonical JSON, checked against
its hash, the round, the coordinator's round commitment) and, once the study is over,
:class:`StudyFinish` (the head of the coordinator's ``study_finished`` entry).

Node -> coordinator: besides the masked update (SecAgg+), exactly one :class:`NodeReply`. A node
that refuses sends no update: in a masked round it withdraws before the masked-vector stage (its
refused reply travels in its coded error, ``twinfed.privacy.secagg``), so it never counts towards
a minimum sum; in an unmasked round it sends a zero update beside the refusal. It admits only

- protocol fields: the site's name, a coded status and :class:`Refusal` (a code and, for a data
  error, file/row/column: never a value, an identifier or a path), the node's audit head and the
  fingerprint of its audit key;
- figures that are *exact-declared* (constants of the approved plan) or *dp-released*
  (outputs of a differentially private release charged to the node's ledger, or computed only
  from such outputs and declared constants: post-processing).

No training loss, no exact count, no data value ever has a field here. :data:`RELEASE` classifies
every field; a test holds the models against it, and ``twinfed plan show`` prints it.
"""

from __future__ import annotations

import hashlib
from enum import Enum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
# A site's name: a plain name, never a path (it names the site's state directory in a run).
SiteName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
UNCONFIGURED = "unconfigured"  # how a node without site configuration answers a roll call
# The files of the data contract: the only file names a refusal may carry.
CONTRACT_FILES = ("timeseries.csv", "timeseries.parquet", "patients.csv", "patients.parquet",
                  "consent.csv")
ColumnName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=64)]
REPLY_KEY = "twinfed-reply"  # the one metrics key a node's reply travels under
INSTRUCTION_KEY = "twinfed-instruction"  # the one config key a round instruction travels under
TRIAL_KEY = "twinfed-trial"  # the config key of an in-silico trial's instruction
FINISH_RECORD = "twinfed-finish"  # the config record of the end-of-study message
ROLL_CALL_RECORD = "twinfed-roll-call"  # the config record of the before-the-study message


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RefusalCode(str, Enum):
    """Why a node declined a round or a step of it. The node's console says more; the wire and
    the audit logs say only this (plus file/row/column for ``data_invalid``)."""

    PLAN_MALFORMED = "plan_malformed"  # the instruction's plan does not parse or hash
    PLAN_NOT_APPROVED = "plan_not_approved"  # not approved here, revoked, or not in the signed log
    PLAN_UNSUPPORTED = "plan_unsupported"  # e.g. asks to release a figure nodes never release
    DP_REQUIRED = "dp_required"  # a real node refuses plans without differential privacy
    NOT_MASKED = "not_masked"  # the plan requires SecAgg+ and this round is not masked
    SECAGG_SETUP_WEAK = "secagg_setup_weak"  # fewer nodes, shares or a lower threshold than the plan
    TOO_FEW_CONTRIBUTORS = "too_few_contributors"  # unmasking a sum of fewer sites than the plan
    BUDGET_EXHAUSTED = "budget_exhausted"
    DELTA_EXCEEDS_BUDGET = "delta_exceeds_budget"  # the release asks a larger delta than the site's budget
    LEDGER_MISMATCH = "ledger_mismatch"  # the privacy ledger and the signed log disagree
    NO_ELIGIBLE_PATIENTS = "no_eligible_patients"  # no consented patient with a full window
    MODEL_MISMATCH = "model_mismatch"  # the weights sent are not the twin the approved plan names
    ALREADY_RELEASED = "already_released"  # a once-per-study release (the calibration) was released
    DATA_INVALID = "data_invalid"  # the site's export breaks the data contract
    NODE_NOT_INITIALISED = "node_not_initialised"
    AUDIT_UNAVAILABLE = "audit_unavailable"  # the node's audit log cannot be read or appended
    STATE_BUSY = "state_busy"  # another process held the node's state lock too long
    LOG_ROLLED_BACK = "log_rolled_back"  # the node's log lacks an entry it was known to hold
    INTERNAL_ERROR = "internal_error"  # anything else; the node's own console has the detail


class Refusal(_Frozen):
    code: RefusalCode
    file: Literal[CONTRACT_FILES] | None = None  # type: ignore[valid-type]
    row: Annotated[int, Field(ge=1)] | None = None
    column: ColumnName | None = None

    def __str__(self) -> str:
        where = ""
        if self.file:
            where = self.file + (f" row {self.row}" if self.row else "") + \
                (f", column {self.column}" if self.column else "") + ": "
        return f"{where}{self.code.value}"


class LogHead(_Frozen):
    """An audit log's position: its newest entry's seq and hash."""

    seq: Annotated[int, Field(ge=0)]
    hash: Hex64


class NodeHead(_Frozen):
    """A node's audit-log position as the coordinator may know it: the hash of the entry the
    node's reply anchors, and nothing else. Its seq would tell the coordinator how many entries
    the node wrote between two replies: a consent withdrawal, the node's other studies. The hash
    is enough to find the entry again (``twinfed audit verify``) and to check, at the node's next
    round, that its log still holds it (:attr:`RoundInstruction.node_anchor`)."""

    hash: Hex64


class DPCounts(_Frozen):
    """The site's patient counts with Gaussian noise (std ``noise_std``), released once per study
    and charged to the node's ledger: the consented patients loaded, and the others."""

    patients_used: Annotated[int, Field(ge=0)]
    patients_excluded: Annotated[int, Field(ge=0)]
    noise_std: Annotated[float, Field(gt=0)]


class DPSegment(_Frozen):
    sample_rate: Annotated[float, Field(gt=0, le=1)]
    noise_multiplier: Annotated[float, Field(gt=0)]
    steps: Annotated[int, Field(ge=1)]


class DPPrivacy(_Frozen):
    """The study's privacy figures at this site. Every one is computed from the site's DP
    releases (the noisy patient count fixes the sample rate, delta and noise) and the plan's
    declared constants, never from the exact number of patients."""

    epsilon: Annotated[float, Field(ge=0)]  # this study's spend at this site so far
    delta: Annotated[float, Field(gt=0, lt=1)]
    accountant: Literal["rdp", "prv"]
    noise_multiplier: Annotated[float, Field(gt=0)]
    sample_rate: Annotated[float, Field(gt=0, le=1)]
    clipping_norm: Annotated[float, Field(gt=0)]
    segments: tuple[DPSegment, ...]
    site_epsilon_spent: Annotated[float, Field(ge=0)]  # every study at this site, this one included
    site_epsilon_budget: Annotated[float, Field(gt=0)]
    # The budget's delta, at which site_epsilon_spent and site_epsilon_budget are stated (``delta``
    # is the study's own, min(plan delta, 1/N)). None: a node from before it was sent.
    site_delta: Annotated[float, Field(gt=0, lt=1)] | None = None


class DPAggregate(_Frozen):
    """The privacy figures of a node's Gaussian release of a vector of clipped per-patient sums
    (an in-silico trial's aggregates, or the calibration histogram of its held-out patients).
    The vector itself travels as the (masked) update; these say how much noise is in it, so the
    coordinator's intervals can include it. The noise is calibrated from the plan and the node's
    ledger (itself made of DP releases and declared constants): post-processing."""

    kind: Literal["trial", "calibration"]
    sensitivity: Annotated[float, Field(gt=0)]  # declared: the plan's design fixes it
    noise_multiplier: Annotated[float, Field(gt=0)]
    noise_std: Annotated[float, Field(gt=0)]  # on every component, in the vector's units
    epsilon: Annotated[float, Field(ge=0)]  # what this release cost the site
    delta: Annotated[float, Field(gt=0, lt=1)]
    accountant: Literal["rdp", "prv"]
    site_epsilon_spent: Annotated[float, Field(ge=0)]
    site_epsilon_budget: Annotated[float, Field(gt=0)]
    site_delta: Annotated[float, Field(gt=0, lt=1)] | None = None  # the budget's, as in DPPrivacy


class Released(_Frozen):
    steps: Annotated[int, Field(ge=0)]  # the plan's local steps: declared
    counts: DPCounts | None = None
    privacy: DPPrivacy | None = None
    aggregate: DPAggregate | None = None


class NodeReply(_Frozen):
    """Everything a node says to the coordinator, besides its (masked) update."""

    format: Literal["twinfed-reply-v1"] = "twinfed-reply-v1"
    site: SiteName
    status: Literal["ok", "refused"]
    refusal: Refusal | None = None
    audit_head: NodeHead | None = None  # None only when the node has no audit log to write to
    key_fingerprint: Hex64 | None = None
    released: Released | None = None

    @model_validator(mode="after")
    def _status_matches(self) -> NodeReply:
        if (self.status == "refused") != (self.refusal is not None):
            raise ValueError("a refused reply carries a refusal and only a refused one does")
        if self.status == "refused" and self.released is not None:
            raise ValueError("a refused reply releases nothing")
        return self

    def to_metrics(self) -> dict[str, str]:
        return {REPLY_KEY: self.model_dump_json()}

    @classmethod
    def from_metrics(cls, metrics: dict) -> NodeReply:
        return cls.model_validate_json(str(metrics[REPLY_KEY]))


class RoundInstruction(_Frozen):
    """What the coordinator asks of a node in one round."""

    plan_json: str  # the plan's canonical JSON; nodes check it against plan_sha256
    plan_sha256: Hex64
    round: Annotated[int, Field(ge=1)]
    coordinator: LogHead | None = None  # the coordinator's round_started entry (its commitment)
    skipped_rounds: tuple[int, ...] = ()  # earlier rounds the coordinator did not unmask
    # "calibrate": after the last round, release the calibration histogram of the held-out
    # patients for the weights sent (the plan's ``calibration``), instead of training.
    stage: Literal["train", "calibrate"] = "train"
    # The head of THIS node's log the coordinator last anchored (sent to each node its own): a
    # node whose log no longer holds that entry was rolled back and refuses (``log_rolled_back``).
    node_anchor: NodeHead | None = None

    @model_validator(mode="after")
    def _plan_hashes(self) -> RoundInstruction:
        if hashlib.sha256(self.plan_json.encode()).hexdigest() != self.plan_sha256:
            raise ValueError("plan_json does not hash to plan_sha256")
        return self

    def to_config(self) -> dict[str, str]:
        return {INSTRUCTION_KEY: self.model_dump_json()}

    @classmethod
    def from_config(cls, config: dict) -> RoundInstruction:
        return cls.model_validate_json(str(config[INSTRUCTION_KEY]))


class TrialInstruction(_Frozen):
    """What the coordinator asks of a node in a federated in-silico trial: run the approved trial
    plan (``twinfed.models.trial_plan``) on the twin whose weights travel with it, and release its
    aggregates."""

    plan_json: str
    plan_sha256: Hex64
    round: Literal[1] = 1
    coordinator: LogHead | None = None
    node_anchor: NodeHead | None = None  # as in RoundInstruction

    @model_validator(mode="after")
    def _plan_hashes(self) -> TrialInstruction:
        if hashlib.sha256(self.plan_json.encode()).hexdigest() != self.plan_sha256:
            raise ValueError("plan_json does not hash to plan_sha256")
        return self

    def to_config(self) -> dict[str, str]:
        return {TRIAL_KEY: self.model_dump_json()}

    @classmethod
    def from_config(cls, config: dict) -> TrialInstruction:
        return cls.model_validate_json(str(config[TRIAL_KEY]))


class StudyFinish(_Frozen):
    """The coordinator's last word to every node: the study is over, anchored in both logs."""

    plan_sha256: Hex64
    coordinator: LogHead  # the coordinator's study_finished entry
    rounds: Annotated[int, Field(ge=1)]
    rounds_with_update: Annotated[int, Field(ge=0)]
    skipped_rounds: tuple[int, ...] = ()
    weights_sha256: Hex64  # digest of the final weights' arrays (twinfed.models.digest)
    weights_file_sha256: Hex64  # SHA-256 of model/weights.npz as written
    calibration_file_sha256: Hex64 | None = None  # model/calibration.json as written, if any


# Every field a node's reply can carry, and what kind of figure it is.
PROTOCOL, DECLARED, DP = "protocol", "exact-declared", "dp-released"
RELEASE: dict[str, str] = {
    "format": PROTOCOL, "site": PROTOCOL, "status": PROTOCOL,
    "refusal.code": PROTOCOL, "refusal.file": PROTOCOL, "refusal.row": PROTOCOL,
    "refusal.column": PROTOCOL,
    "audit_head.hash": PROTOCOL, "key_fingerprint": PROTOCOL,
    "released.steps": DECLARED,
    "released.counts.patients_used": DP, "released.counts.patients_excluded": DP,
    "released.counts.noise_std": DECLARED,
    "released.privacy.epsilon": DP, "released.privacy.delta": DP,
    "released.privacy.accountant": DECLARED, "released.privacy.noise_multiplier": DP,
    "released.privacy.sample_rate": DP, "released.privacy.clipping_norm": DECLARED,
    "released.privacy.segments.sample_rate": DP,
    "released.privacy.segments.noise_multiplier": DP,
    "released.privacy.segments.steps": DECLARED,
    "released.privacy.site_epsilon_spent": DP, "released.privacy.site_epsilon_budget": DECLARED,
    "released.privacy.site_delta": DECLARED,  # the budget's delta: the first DP plan's or the officer's
    "released.aggregate.kind": PROTOCOL, "released.aggregate.sensitivity": DECLARED,
    "released.aggregate.noise_multiplier": DP, "released.aggregate.noise_std": DP,
    "released.aggregate.epsilon": DP, "released.aggregate.delta": DECLARED,
    "released.aggregate.accountant": DECLARED, "released.aggregate.site_epsilon_spent": DP,
    "released.aggregate.site_epsilon_budget": DECLARED, "released.aggregate.site_delta": DECLARED,
}


def field_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every leaf field of ``model`` as a dotted path (nested models and tuples of them)."""
    out: list[str] = []
    for name, info in model.model_fields.items():
        nested = _nested_model(info.annotation)
        path = f"{prefix}{name}"
        out += field_paths(nested, path + ".") if nested else [path]
    return out


def _nested_model(annotation) -> type[BaseModel] | None:
    from typing import get_args

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _nested_model(arg)
        if found is not None:
            return found
    return None


def reply_field_table() -> list[tuple[str, str]]:
    """``(field, kind)`` for every field of :class:`NodeReply`, in declaration order."""
    return [(p, RELEASE[p]) for p in field_paths(NodeReply)]
