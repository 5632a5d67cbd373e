"""The privacy ledger's file format, and its mirror in the node's signed audit log (torch-free).

``privacy_ledger.json`` is Opacus's accountant history made durable: the site's budget, the
accountant, and one segment ``(sample_rate, noise_multiplier, steps)`` per DP release. Every
segment is also a ``privacy_spent`` event in the node's audit log, written first, and the budget
a ``privacy_budget_set`` event, so the ledger can be rebuilt from the log and the two
cross-checked: a node refuses to train, and ``twinfed audit verify`` fails, when they disagree
(a ledger emptied, raised, deleted or edited by hand).

The budget is an (epsilon, delta) pair, set together: ``epsilon_budget`` and ``delta_budget``.
Epsilon is never stored as the truth: it is recomputed from the segments (``twinfed.privacy``),
always at the budget's delta, so every report of the site's spend is one figure. A release may ask
for a smaller delta, never a larger one.

A ledger file or a ``privacy_budget_set`` event written before delta was part of the budget has
no ``delta_budget``: it reads as :data:`DEFAULT_DELTA` (1e-5, every plan's default delta), from
the file alone and from the log alone, so the two still agree. (The deltas a site used before
are not one figure: each study used min(its plan's delta, 1/N).) An officer who meant another
delta sets it: ``twinfed ledger set-budget --epsilon E --delta D``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from twinfed.errors import TwinfedError

LEDGER_FILE = "privacy_ledger.json"
# The budget's delta when none was recorded (files and logs from before it was part of the budget).
DEFAULT_DELTA = 1e-5
Delta = Annotated[float, Field(gt=0, lt=1)]
Accountant = Literal["rdp", "prv"]
# gaussian-sum: a Gaussian release of a vector of clipped per-patient sums (an in-silico trial's
# aggregates, a calibration histogram), its noise multiplier relative to the vector's L2 sensitivity.
Mechanism = Literal["dp-sgd", "gaussian-count", "gaussian-sum"]


class LedgerError(TwinfedError):
    """The ledger file is unreadable, or it disagrees with the node's signed audit log."""


class Segment(BaseModel):
    """``steps`` releases of one mechanism at one sample rate and noise multiplier.

    A Gaussian release (a count of sensitivity 1, or a vector of per-patient sums of L2 sensitivity
    ``D``) with noise ``sigma`` x the sensitivity is the subsampled Gaussian at rate 1 for one
    step, so the accountant composes every kind alike."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sample_rate: Annotated[float, Field(gt=0, le=1)]
    noise_multiplier: Annotated[float, Field(gt=0)]
    steps: Annotated[int, Field(ge=1)]
    plan_sha256: str = ""
    round: int = 0
    mechanism: Mechanism = "dp-sgd"
    recorded_at: str = ""

    def key(self) -> tuple:
        """What the ledger and the log must agree on."""
        return (self.sample_rate, self.noise_multiplier, self.steps, self.plan_sha256, self.round,
                self.mechanism)


class LedgerState(BaseModel):
    """``privacy_ledger.json``, version 2 (version 1 also kept one delta for the site)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[2] = 2
    accountant: Accountant = "rdp"
    epsilon_budget: Annotated[float, Field(gt=0)]
    delta_budget: Delta = DEFAULT_DELTA  # absent from files written before: DEFAULT_DELTA
    segments: tuple[Segment, ...] = ()


class LedgerStateV1(BaseModel):
    """The previous format, read only to migrate it (see ``twinfed.privacy.ledger``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = 1
    accountant: Accountant = "rdp"
    epsilon_budget: Annotated[float, Field(gt=0)]
    delta: float
    segments: tuple[Segment, ...] = ()


def capped_delta(delta: float, n_released: int) -> float:
    """A release's delta at a site whose released (noisy) patient count is ``n_released``: the
    plan's, at most 1/N (a study's and a trial's alike)."""
    return min(float(delta), 1.0 / max(1, int(n_released)))


def ledger_path(state_dir: str | Path) -> Path:
    return Path(state_dir) / LEDGER_FILE


def read_ledger(state_dir: str | Path) -> LedgerState | LedgerStateV1 | None:
    """The ledger file, or None if there is none; :class:`LedgerError` if it is unreadable."""
    path = ledger_path(state_dir)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise LedgerError(f"{LEDGER_FILE}: cannot read the privacy ledger ({exc.strerror})") from None
    for model in (LedgerState, LedgerStateV1):
        try:
            return model.model_validate_json(raw)
        except ValidationError:
            continue
    raise LedgerError(f"{LEDGER_FILE}: not a valid privacy ledger; restore it from backup or "
                      "rebuild it from the audit log ('twinfed ledger rebuild')")


class LoggedLedger(BaseModel):
    """What the node's audit log says the ledger must hold."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epsilon_budget: float | None = None  # None: the log never set a budget
    delta_budget: float | None = None
    accountant: Accountant | None = None
    segments: tuple[Segment, ...] = ()


def ledger_from_log(entries: Iterable) -> LoggedLedger:
    """The budget and every spend recorded in a node's (verified) audit entries, in order."""
    budget = delta = accountant = None
    segments: list[Segment] = []
    for e in entries:
        d = e.details
        if e.event == "privacy_budget_set":
            budget, accountant = float(d["epsilon_budget"]), d["accountant"]
            delta = float(d.get("delta_budget", DEFAULT_DELTA))
        elif e.event == "privacy_spent":
            segments.append(Segment(sample_rate=d["sample_rate"], noise_multiplier=d["noise_multiplier"],
                                    steps=d["steps"], plan_sha256=d["plan_sha256"], round=d["round"],
                                    mechanism=d["mechanism"]))
    return LoggedLedger(epsilon_budget=budget, delta_budget=delta, accountant=accountant,
                        segments=tuple(segments))


def disagreement(state: LedgerState | LedgerStateV1 | None, logged: LoggedLedger) -> str | None:
    """Why the ledger file and the log disagree (one line), or None when they agree."""
    if state is None:
        if logged.epsilon_budget is None and not logged.segments:
            return None
        return (f"{LEDGER_FILE} is missing but the signed audit log records a budget and "
                f"{len(logged.segments)} spending(s)")
    if isinstance(state, LedgerStateV1):
        return None if logged.epsilon_budget is None and not logged.segments else \
            f"{LEDGER_FILE} is in the old format but the audit log already records spending"
    if logged.epsilon_budget is None:
        return f"{LEDGER_FILE} exists but the signed audit log never set a budget for it"
    if state.epsilon_budget != logged.epsilon_budget or state.accountant != logged.accountant or \
            state.delta_budget != logged.delta_budget:
        return (f"{LEDGER_FILE} holds budget {state.epsilon_budget:g} at delta {state.delta_budget:g} "
                f"({state.accountant}) but the audit log set {logged.epsilon_budget:g} at delta "
                f"{logged.delta_budget:g} ({logged.accountant})")
    mine, theirs = [s.key() for s in state.segments], [s.key() for s in logged.segments]
    if mine != theirs:
        first = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
        return (f"{LEDGER_FILE} holds {len(mine)} spending(s), the audit log {len(theirs)}; they "
                f"first differ at spending {first + 1}")
    return None
