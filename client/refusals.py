"""From anything that stops a round at a node to the coded refusal that may leave it.

The node's console gets the full one-line message (hospital IT's own screen may show a value or
a path); the coordinator and both audit logs get only :class:`twinfed.wire.Refusal`: a code, and
for a data error the contract file, the row and a column the spec names.
"""

from __future__ import annotations

import re
import sys

from twinfed.errors import (AuditError, ConsentError, DataError, NodeStateError, PlanError,
                            PlanNotApproved, SpecError, TwinfedError)
from twinfed.ledger_file import LedgerError
from twinfed.wire import CONTRACT_FILES, Refusal, RefusalCode

# How data errors name a place: "timeseries.csv row 12, column glucose_mgdl: ..."
_WHERE = re.compile(r"^(?P<file>[\w.-]+)(?: row (?P<row>\d+))?(?:, column (?P<column>\w+))?[:;,]")


class RoundRefused(TwinfedError):
    """The node's gate declines a round for a reason it names by code."""

    def __init__(self, code: RefusalCode, message: str):
        super().__init__(message)
        self.code = code


def refusal_for(exc: BaseException, *, columns: set[str] = frozenset()) -> Refusal:
    """The coded refusal for ``exc``. ``columns``: the spec's column names, the only ones a
    refusal may name (a header cell of the export could hold anything)."""
    from twinfed.privacy.ledger import BudgetExhausted, DeltaExceedsBudget

    from twinfed.governance.audit_log import LogRolledBack

    if isinstance(exc, RoundRefused):
        return Refusal(code=exc.code)
    if isinstance(exc, DataError):
        return _data_refusal(exc, columns)
    table: list[tuple[type[BaseException], RefusalCode]] = [
        (DeltaExceedsBudget, RefusalCode.DELTA_EXCEEDS_BUDGET),
        (BudgetExhausted, RefusalCode.BUDGET_EXHAUSTED),
        (LedgerError, RefusalCode.LEDGER_MISMATCH),
        (PlanNotApproved, RefusalCode.PLAN_NOT_APPROVED),
        (PlanError, RefusalCode.PLAN_MALFORMED),
        (SpecError, RefusalCode.PLAN_MALFORMED),
        (ConsentError, RefusalCode.NO_ELIGIBLE_PATIENTS),
        (LogRolledBack, RefusalCode.LOG_ROLLED_BACK),  # an AuditError: before it
        (AuditError, RefusalCode.AUDIT_UNAVAILABLE),
    ]
    for kind, code in table:
        if isinstance(exc, kind):
            return Refusal(code=code)
    if isinstance(exc, NodeStateError):
        busy = "state lock" in str(exc)
        return Refusal(code=RefusalCode.STATE_BUSY if busy else RefusalCode.NODE_NOT_INITIALISED)
    return Refusal(code=RefusalCode.INTERNAL_ERROR)


def _data_refusal(exc: DataError, columns: set[str]) -> Refusal:
    file, row, column = exc.file, exc.row, exc.column
    if file is None:
        m = _WHERE.match(str(exc))
        if m:
            file, row, column = m["file"], m["row"] and int(m["row"]), m["column"]
    return Refusal(code=RefusalCode.DATA_INVALID,
                   file=file if file in CONTRACT_FILES else None,
                   row=row if file in CONTRACT_FILES and row else None,
                   column=column if column in columns or column in ("patient_id", "time_min") else None)


def tell_node_console(site: str, what: str, exc: BaseException) -> None:
    """The full reason, for hospital IT at the node's own console; it never leaves the node."""
    text = str(exc) if isinstance(exc, TwinfedError) else f"{type(exc).__name__}: {exc}"
    print(f"twinfed node {site}: {what}: {text}", file=sys.stderr, flush=True)
