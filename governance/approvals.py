"""Training-plan approval: the plans a node's privacy officer allowed it to train.

Guarantees:
- a plan is identified by the SHA-256 of its canonical JSON (:meth:`TrainingPlan.sha256`); the
  registry stores that exact text, so ``plan show`` displays what was approved, byte for byte,
  and a stored plan whose text no longer hashes to its key is an error, not an approval;
- ``approvals.json`` is replaced atomically and durably on every change, each change one
  read-modify-write under the state's lock (:func:`twinfed.locking.state_lock`), its audit entry
  included, so approvals and revocations made at once by several processes all land;
- every approval and revocation is audited. An approval is audited *before* it takes effect and
  a revocation takes effect *before* it is audited, so a crash between the two steps never
  leaves a plan trainable without a trace;
- :func:`require_approved` is the node's gate: a plan passes only if ``approvals.json`` holds it
  unrevoked *and* the node's signed audit log verifies and holds a standing ``plan_approved``
  event for it (:func:`standing_approvals`), so an approval copied into the file by hand is
  refused. Anything else raises :class:`PlanNotApproved`, whose message names the plan by its
  hash prefix and the command to run, never a path (the caller audits the refusal, and its
  reason may reach the coordinator).
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from twinfed.atomic import write_json_atomic
from twinfed.errors import AuditError, PlanError, PlanNotApproved
from twinfed.events import PlanApproved, PlanRevoked
from twinfed.governance.audit_log import AuditEntry, format_time
from twinfed.governance.layout import open_audit, read_info, state_paths, verified_entries
from twinfed.locking import state_lock
from twinfed.models.plan import TrainingPlan, parse_any_plan

if TYPE_CHECKING:  # imported only when a trial plan is met: governance starts without numpy
    from twinfed.models.trial_plan import TrialPlan

Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class PlanApproval(BaseModel):
    """One plan the officer approved (and perhaps later revoked)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sha256: Sha256
    plan_json: str  # the canonical JSON the hash is of
    purpose: str
    rounds: int
    approved_at: str
    approved_by: str
    revoked_at: str | None = None
    revoked_by: str | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def plan(self) -> TrainingPlan | TrialPlan:
        """The approved plan: a training plan, or an in-silico trial's plan."""
        return parse_any_plan(self.plan_json)


class ApprovalsFile(BaseModel):
    """``approvals.json``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["twinfed-approvals-v1"] = "twinfed-approvals-v1"
    plans: dict[str, PlanApproval] = {}


def load_plan_file(path: str | Path) -> TrainingPlan | TrialPlan:
    """A plan (a training plan, or an in-silico trial's plan) from its JSON file, or from a model
    directory holding ``plan.json`` or ``model/plan.json``."""
    path = Path(path)
    if path.is_dir():
        for cand in (path / "plan.json", path / "model" / "plan.json"):
            if cand.is_file():
                path = cand
                break
        else:
            raise PlanError(f"{path}: no plan.json in this directory or its model/ subdirectory")
    try:
        raw = path.read_bytes()
        return parse_any_plan(raw)
    except FileNotFoundError:
        raise PlanError(f"{path}: no such plan file") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err.get("loc", ())) or "(top level)"
        kind = "trial plan" if b'"in-silico-trial"' in raw else "training plan"
        raise PlanError(f"{path}: not a valid {kind}: {loc}: {err['msg']}") from None
    except (ValueError, OSError) as exc:  # not JSON, unreadable
        raise PlanError(f"{path}: not a plan file ({str(exc).splitlines()[0]})") from None


def list_approvals(state_dir: str | Path) -> list[PlanApproval]:
    """Every plan ever approved here, oldest first, revoked ones included."""
    return sorted(_load(state_dir).plans.values(), key=lambda a: a.approved_at)


def is_approved(state_dir: str | Path, sha256: str) -> bool:
    """Whether ``approvals.json`` holds the plan unrevoked (the gate also checks the audit log)."""
    a = _load(state_dir).plans.get(sha256)
    return a is not None and a.active


def standing_approvals(entries: list[AuditEntry]) -> set[str]:
    """The plan hashes whose latest ``plan_approved`` / ``plan_revoked`` event is an approval."""
    standing: set[str] = set()
    for e in entries:
        if e.event == "plan_approved":
            standing.add(str(e.details.get("plan_sha256")))
        elif e.event == "plan_revoked":
            standing.discard(str(e.details.get("plan_sha256")))
    return standing


def require_approved(state_dir: str | Path, sha256: str, *,
                     entries: list[AuditEntry] | None = None) -> TrainingPlan | TrialPlan:
    """The approved plan with this hash, or :class:`PlanNotApproved` saying why not.

    ``entries`` are the node's audit entries, already verified against its pinned key (as
    :func:`governance.audit_log.verify_log_entries` returns them); without them the log is
    verified here.
    """
    plan = f"plan {sha256[:16]}..."
    a = _load(state_dir).plans.get(sha256)
    if a is None:
        raise PlanNotApproved(f"{plan} is not approved at this node; the privacy officer must run "
                              "'twinfed plan approve'")
    if not a.active:
        raise PlanNotApproved(f"{plan} was revoked at this node on {a.revoked_at} by {a.revoked_by}")
    if entries is None:
        entries = _verified_entries(state_dir, plan)
    if sha256 not in standing_approvals(entries):
        raise PlanNotApproved(f"{plan} is in approvals.json but the node's audit log has no standing "
                              "plan_approved event for it (an approval not made through twinfed); the "
                              "privacy officer must run 'twinfed audit verify' and 'twinfed plan approve'")
    return a.plan()


def _verified_entries(state_dir: str | Path, plan: str) -> list[AuditEntry]:
    try:
        return verified_entries(state_dir)
    except AuditError:
        raise PlanNotApproved(f"{plan} cannot be checked: this node's audit log does not verify; "
                              "the privacy officer must run 'twinfed audit verify' on the node's "
                              "state") from None


def find_approval(state_dir: str | Path, sha_or_prefix: str) -> PlanApproval:
    """The recorded plan whose hash is, or starts with (8+ hex digits), ``sha_or_prefix``."""
    sha = sha_or_prefix.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{8,64}", sha):
        raise PlanError(f"{sha_or_prefix!r} is not a plan hash (8 to 64 hex digits)")
    plans = _load(state_dir).plans
    hits = [a for k, a in plans.items() if k.startswith(sha)]
    if not hits:
        raise PlanNotApproved(f"no plan {sha} was ever approved at {state_dir}; 'twinfed plan list "
                              f"--state {state_dir}' shows the plans it knows")
    if len(hits) > 1:
        raise PlanError(f"{sha} matches {len(hits)} plans; give more digits")
    return hits[0]


def approve_plan(state_dir: str | Path, plan: TrainingPlan | TrialPlan, *, actor: str,
                 at: datetime | None = None) -> PlanApproval:
    """Approve ``plan`` (again, if it was revoked); audited first, then effective."""
    read_info(state_dir)
    when = at or datetime.now(timezone.utc)
    sha = plan.sha256()
    approval = PlanApproval(sha256=sha, plan_json=plan.canonical_json(), purpose=plan.purpose,
                            rounds=plan.rounds, approved_at=format_time(when), approved_by=actor)
    with state_lock(state_dir):
        open_audit(state_dir, actor=actor).append(PlanApproved(
            plan_sha256=sha, purpose=plan.purpose, rounds=plan.rounds, epsilon=plan.privacy.epsilon,
            delta=plan.privacy.delta, differential_privacy=plan.privacy.enabled,
            secure_aggregation=plan.privacy.secure_aggregation), at=when)
        current = _load(state_dir)
        _save(state_dir, current.model_copy(update={"plans": {**current.plans, sha: approval}}))
    return approval


def revoke_plan(state_dir: str | Path, sha_or_prefix: str, *, actor: str,
                at: datetime | None = None) -> PlanApproval:
    """Revoke an approved plan; effective first, then audited."""
    read_info(state_dir)
    when = at or datetime.now(timezone.utc)
    with state_lock(state_dir):
        log = open_audit(state_dir, actor=actor)  # a log that cannot be appended to: nothing changes
        a = find_approval(state_dir, sha_or_prefix)
        if not a.active:
            raise PlanNotApproved(f"plan {a.sha256[:16]}... is already revoked (on {a.revoked_at})")
        revoked = a.model_copy(update={"revoked_at": format_time(when), "revoked_by": actor})
        current = _load(state_dir)
        _save(state_dir, current.model_copy(update={"plans": {**current.plans, a.sha256: revoked}}))
        log.append(PlanRevoked(plan_sha256=a.sha256), at=when)
    return revoked


def _load(state_dir: str | Path) -> ApprovalsFile:
    # Messages name the file, not its path: the gate's refusals may reach the coordinator.
    path = state_paths(state_dir).approvals
    if not path.is_file():
        return ApprovalsFile()
    try:
        data = ApprovalsFile.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        raise PlanError(f"{path.name}: not a valid approvals file ({exc.errors()[0]['msg']}); restore it "
                        "or approve the plans again") from None
    for sha, a in data.plans.items():
        if sha != a.sha256 or _sha(a.plan_json) != sha:
            raise PlanError(f"{path.name}: the stored plan under {sha[:16]}... does not hash to its key; "
                            "the file was edited. Restore it or approve the plans again")
    return data


def _save(state_dir: str | Path, data: ApprovalsFile) -> None:
    write_json_atomic(state_paths(state_dir).approvals, data.model_dump(mode="json"))


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
