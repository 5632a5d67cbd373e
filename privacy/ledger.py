"""A node's privacy ledger: every DP release it has made, persisted, and the budget it enforces.

The ledger is Opacus's accountant ``history`` made durable (format: :mod:`twinfed.ledger_file`):
segments ``(sample_rate, noise_multiplier, steps)`` and the site's budget, an (epsilon, delta)
pair. Epsilon is always recomputed from the whole list by Opacus's accountant, so spending
composes across rounds and studies on the same node and data, and it is always evaluated at the
budget's delta: :meth:`PrivacyLedger.spent`, :meth:`~PrivacyLedger.check` and
:meth:`~PrivacyLedger.reserve` use it, and ``epsilon_after`` in each ``privacy_spent`` event is at
it, so every report of the site's spend is the figure ``twinfed ledger show`` prints. A release
(a training round, the count release, a calibration, a trial) may ask for a smaller delta than the
budget's, never a larger one (:class:`DeltaExceedsBudget`, refused by code).

Guarantees, for callers that hold the node's state lock (:func:`twinfed.locking.state_lock`)
from the check to the reservation, as the node's gate does:
- a release is *reserved* before the computation it pays for starts: first a signed
  ``privacy_spent`` event in the node's audit log, then the ledger file (written atomically). A
  crash in between leaves the two disagreeing, and the node refuses to train until an officer
  rebuilds the ledger from the log: spending is over-counted, never lost;
- :meth:`PrivacyLedger.open` refuses a ledger that disagrees with the log (emptied, raised,
  deleted, edited), so no hand edit resets a budget.
"""

from __future__ import annotations

import warnings
from datetime import datetime, timezone
from pathlib import Path

from twinfed.atomic import write_json_atomic
from twinfed.errors import TwinfedError
from twinfed.events import PrivacyBudgetSet, PrivacySpent
from twinfed.ledger_file import (DEFAULT_DELTA, Accountant, LedgerError, LedgerState, LedgerStateV1,
                                 Segment, disagreement, ledger_from_log, ledger_path, read_ledger)

# Epsilon is compared with a relative slack so that float noise in the accountant cannot refuse
# a round that was calibrated to land exactly on the budget.
SLACK = 1e-6

__all__ = ["BudgetExhausted", "DeltaExceedsBudget", "LedgerError", "PrivacyLedger", "Segment", "epsilon_of", "rebuild_ledger",
           "set_budget"]


class BudgetExhausted(TwinfedError):
    """A release would take the site past its privacy budget."""


class DeltaExceedsBudget(TwinfedError):
    """A release (its plan) asks for a larger delta than the site's budget allows."""


def _valid_delta(delta: float) -> float:
    delta = float(delta)
    if not 0 < delta < 1:
        raise LedgerError(f"delta must be between 0 and 1, not {delta:g}")
    return delta


def epsilon_of(segments, delta: float, accountant: Accountant = "rdp") -> float:
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
    with warnings.catch_warnings():
        # "Optimal order is the largest alpha": the bound is then looser than it could be, so
        # epsilon is over-counted, never under-counted (e.g. a lone count release at high noise).
        warnings.filterwarnings("ignore", message=".*Optimal order is the largest alpha.*")
        return float(acc.get_epsilon(delta=delta))


class PrivacyLedger:
    """The ledger of one node. Open it with :meth:`open` under the node's state lock."""

    def __init__(self, state_dir: Path, state: LedgerState):
        self.state_dir = Path(state_dir)
        self.state = state

    @property
    def path(self) -> Path:
        return ledger_path(self.state_dir)

    @classmethod
    def open(cls, state_dir: str | Path, audit, entries, *, epsilon_budget: float,
             delta_budget: float = DEFAULT_DELTA, accountant: Accountant = "rdp") -> PrivacyLedger:
        """The node's ledger, checked against ``entries`` (the node's verified audit entries).

        A node without a ledger or any spending in its log gets one with the budget
        (``epsilon_budget``, ``delta_budget``): the first DP plan's epsilon and delta, audited
        first; a version-1 ledger is adopted into the log once (its delta becomes the budget's).
        :class:`LedgerError` when the file and the log disagree."""
        state_dir = Path(state_dir)
        state = read_ledger(state_dir)
        logged = ledger_from_log(entries)
        why = disagreement(state, logged)
        if why is not None:
            raise LedgerError(f"{why}; the node will not train until the privacy officer restores "
                              "the ledger or rebuilds it from the log ('twinfed ledger rebuild')")
        if state is None:
            delta_budget = _valid_delta(delta_budget)
            audit.append(PrivacyBudgetSet(epsilon_budget=epsilon_budget, delta_budget=delta_budget,
                                          accountant=accountant))
            ledger = cls(state_dir, LedgerState(accountant=accountant, epsilon_budget=epsilon_budget,
                                                delta_budget=delta_budget))
            ledger._write()
            return ledger
        if isinstance(state, LedgerStateV1):
            return cls._adopt(state_dir, state, audit)
        return cls(state_dir, state)

    @classmethod
    def _adopt(cls, state_dir: Path, old: LedgerStateV1, audit) -> PrivacyLedger:
        """Mirror a version-1 ledger (written before spending was audited) into the log."""
        audit.append(PrivacyBudgetSet(epsilon_budget=old.epsilon_budget, delta_budget=old.delta,
                                      accountant=old.accountant))
        done: list[Segment] = []
        for s in old.segments:
            done.append(s.model_copy(update={"mechanism": "dp-sgd"}))
            audit.append(PrivacySpent(round=max(0, s.round), plan_sha256=s.plan_sha256 or "0" * 64,
                                      mechanism="dp-sgd", sample_rate=s.sample_rate,
                                      noise_multiplier=s.noise_multiplier, steps=s.steps,
                                      delta=old.delta,
                                      epsilon_after=epsilon_of(done, old.delta, old.accountant)))
        segments = tuple(s.model_copy(update={"mechanism": "dp-sgd",
                                              "plan_sha256": s.plan_sha256 or "0" * 64,
                                              "round": max(0, s.round)}) for s in old.segments)
        ledger = cls(state_dir, LedgerState(accountant=old.accountant, epsilon_budget=old.epsilon_budget,
                                            delta_budget=old.delta, segments=segments))
        ledger._write()
        return ledger

    @property
    def budget(self) -> float:
        return self.state.epsilon_budget

    @property
    def delta(self) -> float:
        """The budget's delta: every figure of the site's spend is at it."""
        return self.state.delta_budget

    @property
    def accountant(self) -> Accountant:
        return self.state.accountant

    @property
    def segments(self) -> list[Segment]:
        return list(self.state.segments)

    def spent(self, delta: float | None = None) -> float:
        """The site's epsilon so far, at the budget's delta (or at ``delta``, to inspect)."""
        return epsilon_of(self.state.segments, self.delta if delta is None else delta, self.accountant)

    def remaining(self, delta: float | None = None) -> float:
        return max(0.0, self.budget - self.spent(delta))

    def epsilon_after(self, segments: list[Segment], delta: float | None = None) -> float:
        return epsilon_of([*self.state.segments, *segments], self.delta if delta is None else delta,
                          self.accountant)

    def require_delta(self, delta: float) -> None:
        """:class:`DeltaExceedsBudget` if a release asks for a larger delta than the budget's."""
        if float(delta) > self.delta * (1 + 1e-9):
            raise DeltaExceedsBudget(
                f"the release asks for delta {delta:.2g} but the site's budget is epsilon "
                f"{self.budget:g} at delta {self.delta:.2g}; approve a plan with delta at most "
                f"{self.delta:.2g}, or ask the privacy officer to set the budget "
                "('twinfed ledger set-budget --epsilon E --delta D')")

    def check(self, segment: Segment, delta: float | None = None) -> float:
        """The site's total epsilon after ``segment``, at the budget's delta.
        :class:`DeltaExceedsBudget` if the release's own ``delta`` is larger than the budget's,
        :class:`BudgetExhausted` if the total would be over budget."""
        if delta is not None:
            self.require_delta(delta)
        after = self.epsilon_after([segment])
        if after > self.budget * (1 + SLACK):
            raise BudgetExhausted(
                f"privacy budget exhausted: epsilon {self.spent():.3f} of {self.budget:g} spent "
                f"at delta {self.delta:.2g}; this release would reach {after:.3f}. Ask the privacy officer "
                "for a new budget or approve a plan with fewer rounds or more noise")
        return after

    def reserve(self, segment: Segment, delta: float | None, audit) -> float:
        """Check, then record ``segment``: audited first, then the ledger file. Returns the
        site's total epsilon after it, at the budget's delta (the ``delta`` recorded)."""
        after = self.check(segment, delta)
        audit.append(PrivacySpent(round=segment.round, plan_sha256=segment.plan_sha256,
                                  mechanism=segment.mechanism, sample_rate=segment.sample_rate,
                                  noise_multiplier=segment.noise_multiplier, steps=segment.steps,
                                  delta=self.delta, epsilon_after=after))
        stamped = segment.model_copy(update={"recorded_at": datetime.now(timezone.utc).isoformat()})
        self.state = self.state.model_copy(update={"segments": (*self.state.segments, stamped)})
        self._write()
        return after

    def _write(self) -> None:
        write_json_atomic(self.path, self.state.model_dump(mode="json"), mode=0o600)


def rebuild_from_log(state_dir: str | Path, entries) -> LedgerState:
    """The ledger the signed log implies (for ``twinfed ledger rebuild``); the caller writes it
    under the state lock and audits the rebuild."""
    logged = ledger_from_log(entries)
    if logged.epsilon_budget is None:
        raise LedgerError("the audit log never set a privacy budget: there is nothing to rebuild "
                          "(a node creates its ledger when it first trains a DP plan)")
    return LedgerState(accountant=logged.accountant or "rdp", epsilon_budget=logged.epsilon_budget,
                       delta_budget=logged.delta_budget or DEFAULT_DELTA, segments=logged.segments)


def rebuild_ledger(state_dir: str | Path, *, actor: str) -> LedgerState:
    """Rewrite ``privacy_ledger.json`` from the node's signed log (an officer's repair after a
    crash between the two, or a lost or edited file); audited."""
    from twinfed.events import PrivacyLedgerRebuilt
    from twinfed.governance.layout import open_audit, verified_entries
    from twinfed.locking import state_lock

    with state_lock(state_dir):
        state = rebuild_from_log(state_dir, verified_entries(state_dir))
        open_audit(state_dir, actor=actor).append(PrivacyLedgerRebuilt(
            segments=len(state.segments), epsilon_budget=state.epsilon_budget))
        write_json_atomic(ledger_path(state_dir), state.model_dump(mode="json"), mode=0o600)
    return state


def set_budget(state_dir: str | Path, epsilon_budget: float, *, actor: str,
               delta: float | None = None) -> LedgerState:
    """The privacy officer sets the site's budget, epsilon and delta together (e.g. raises it for
    a new study); ``delta`` None keeps the budget's delta (:data:`DEFAULT_DELTA` for a site with
    no ledger yet). Epsilon may not fall below what the site has already spent at the new delta.
    Audited first, then effective."""
    from twinfed.governance.layout import open_audit, verified_entries
    from twinfed.locking import state_lock

    with state_lock(state_dir):
        entries = verified_entries(state_dir)
        state, logged = read_ledger(state_dir), ledger_from_log(entries)
        if isinstance(state, LedgerStateV1):
            raise LedgerError("the ledger is in the old format; it is adopted into the audit log when "
                              "the node next trains. Set the budget after that")
        why = disagreement(state, logged)
        if why is not None:
            raise LedgerError(f"{why}; rebuild the ledger from the log ('twinfed ledger rebuild') first")
        segments = tuple(state.segments) if state is not None else ()
        accountant = state.accountant if state is not None else "rdp"
        if delta is None:
            delta = state.delta_budget if state is not None else DEFAULT_DELTA
        delta = _valid_delta(delta)
        spent = epsilon_of(segments, delta, accountant)
        if epsilon_budget < spent:
            raise BudgetExhausted(f"the site has already spent epsilon {spent:.3f} at delta {delta:.2g}; "
                                  f"a budget of {epsilon_budget:g} would be below it")
        open_audit(state_dir, actor=actor).append(PrivacyBudgetSet(epsilon_budget=epsilon_budget,
                                                                   delta_budget=delta,
                                                                   accountant=accountant))
        new = LedgerState(accountant=accountant, epsilon_budget=epsilon_budget, delta_budget=delta,
                          segments=segments)
        write_json_atomic(ledger_path(state_dir), new.model_dump(mode="json"), mode=0o600)
    return new
