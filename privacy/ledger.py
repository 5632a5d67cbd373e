"""A node's privacy ledger: every DP release it has made, persisted, and the budget it enforces.

The ledger is Opacus's accountant ``history`` made durable: segments ``(sample_rate,
noise_multiplier, steps)`` under one delta. Epsilon is always recomputed from the whole list by
Opacus's accountant, so spending composes across rounds and studies on the same node and data.
The file is replaced atomically (write, fsync, rename): a crash mid-write leaves the previous
ledger intact.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from twinfed.atomic import write_json_atomic
from twinfed.errors import TwinfedError

LEDGER_FILE = "privacy_ledger.json"
Accountant = Literal["rdp", "prv"]
# Epsilon is compared with a relative slack so that float noise in the accountant cannot refuse
# a round that was calibrated to land exactly on the budget.
SLACK = 1e-6


class BudgetExhausted(TwinfedError):
    """A release would take the site past its privacy budget."""


class LedgerError(TwinfedError):
    """The ledger file is unreadable or inconsistent."""


class Segment(BaseModel):
    """``steps`` DP-SGD steps at one sample rate and noise multiplier."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sample_rate: Annotated[float, Field(gt=0, le=1)]
    noise_multiplier: Annotated[float, Field(gt=0)]
    steps: Annotated[int, Field(ge=1)]
    plan_sha256: str = ""
    round: int = 0
    recorded_at: str = ""


class LedgerState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    accountant: Accountant = "rdp"
    epsilon_budget: Annotated[float, Field(gt=0)]
    delta: Annotated[float, Field(gt=0, lt=1)]
    segments: list[Segment] = []


def epsilon_of(segments: list[Segment], delta: float, accountant: Accountant = "rdp") -> float:
    """Total epsilon of ``segments`` at ``delta``, computed by Opacus's accountant."""
    from opacus.accountants import create_accountant

    if not segments:
        return 0.0
    # Segments at the same (noise, rate) compose like one segment of their summed steps (the
    # accountants compose step by step), so merge them: one accountant term per distinct pair,
    # not per round, keeps a long study's accounting from growing with its length.
    steps: dict[tuple[float, float], int] = {}
    for s in segments:
        steps[(s.noise_multiplier, s.sample_rate)] = steps.get((s.noise_multiplier, s.sample_rate), 0) + s.steps
    acc = create_accountant(mechanism=accountant)
    acc.history = [(sigma, q, n) for (sigma, q), n in steps.items()]
    return float(acc.get_epsilon(delta=delta))


class PrivacyLedger:
    """Load with :meth:`open`; :meth:`check` before a release, :meth:`record` once it is made."""

    def __init__(self, path: Path, state: LedgerState):
        self.path = path
        self.state = state

    @classmethod
    def open(cls, state_dir: str | Path, *, epsilon_budget: float, delta: float,
             accountant: Accountant = "rdp") -> PrivacyLedger:
        """The node's ledger; a new one takes ``epsilon_budget`` and ``delta`` and keeps them."""
        path = Path(state_dir) / LEDGER_FILE
        if not path.exists():
            return cls(path, LedgerState(accountant=accountant, epsilon_budget=epsilon_budget,
                                         delta=delta))
        try:
            state = LedgerState.model_validate_json(path.read_text(encoding="utf-8"))
        except (ValidationError, ValueError, OSError) as exc:
            raise LedgerError(f"{path}: unreadable privacy ledger ({str(exc).splitlines()[0]}); "
                              "restore it from backup: without it the site's spending is unknown") from None
        return cls(path, state)

    @property
    def delta(self) -> float:
        return self.state.delta

    @property
    def budget(self) -> float:
        return self.state.epsilon_budget

    @property
    def segments(self) -> list[Segment]:
        return list(self.state.segments)

    def spent(self) -> float:
        return epsilon_of(self.state.segments, self.delta, self.state.accountant)

    def remaining(self) -> float:
        return max(0.0, self.budget - self.spent())

    def epsilon_after(self, segment: Segment) -> float:
        return epsilon_of([*self.state.segments, segment], self.delta, self.state.accountant)

    def check(self, segment: Segment) -> float:
        """The total epsilon after ``segment``; :class:`BudgetExhausted` if over the budget."""
        after = self.epsilon_after(segment)
        if after > self.budget * (1 + SLACK):
            raise BudgetExhausted(
                f"privacy budget exhausted: epsilon {self.spent():.3f} of {self.budget:g} spent at "
                f"delta {self.delta:.2g}; this round would reach {after:.3f}. Ask the privacy officer "
                "for a new budget or approve a plan with fewer rounds or more noise")
        return after

    def record(self, segment: Segment) -> None:
        """Append ``segment`` (after :meth:`check`) and persist atomically."""
        self.check(segment)
        stamped = segment.model_copy(update={"recorded_at": datetime.now(timezone.utc).isoformat()})
        new_state = self.state.model_copy(update={"segments": [*self.state.segments, stamped]})
        write_json_atomic(self.path, new_state.model_dump(mode="json"))
        self.state = new_state
