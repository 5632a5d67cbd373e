"""The first problem of each kind met while a table streams past, raised in a fixed order.

A streaming loader sees an export a batch of rows at a time, but its one-line error must not
depend on where the batches fall: it is the error the whole file deserves. Each check notes
what it finds under a *kind* (a tuple: kinds compare as tuples, and the smallest kind found is
the one raised) with an *order* (by default the data row: the first row of a kind wins, as
batches come in file order). Messages are built by the checks and hold no patient identifier.
"""

from __future__ import annotations

from twinfed.errors import DataError


class FirstProblems:
    def __init__(self) -> None:
        self._found: dict[tuple, tuple[object, str]] = {}

    def note(self, kind: tuple, order: object, message: str) -> None:
        """Keep ``message`` for ``kind`` unless one with a smaller ``order`` is already kept."""
        kept = self._found.get(kind)
        if kept is None or order < kept[0]:
            self._found[kind] = (order, message)

    def __contains__(self, kind: tuple) -> bool:
        return kind in self._found

    def __bool__(self) -> bool:
        return bool(self._found)

    def raise_first(self) -> None:
        """Raise the kept problem of the smallest kind, if any."""
        if self._found:
            raise DataError(self._found[min(self._found)][1])
