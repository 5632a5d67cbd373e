"""The coordinator's Grid with prompt replies: Flower's, polling the SuperLink every 0.1 s.

Flower 1.42's deployed Grid (``HttpGrid.send_and_receive``) pushes a round's messages and then
pulls the replies every 3 s, while the simulation engine's ``InMemoryGrid`` pulls every 0.1 s. A
SecAgg+ round sends four messages to every node, so the deployed coordinator waits for up to
4 x 3 s per round doing nothing. :class:`PromptGrid` wraps whatever Grid the ServerApp is given
and polls as the simulation engine does; everything else is the wrapped Grid's own. One pull is
one small request to the SuperLink, ten a second at most while a stage is waiting.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

PULL_INTERVAL_S = 0.1  # InMemoryGrid's default in flwr 1.42


class PromptGrid(Grid):
    """``grid`` with :meth:`send_and_receive` pulling replies every ``pull_interval`` seconds."""

    def __init__(self, grid: Grid, *, pull_interval: float = PULL_INTERVAL_S):
        self.inner = grid
        self.pull_interval = pull_interval

    # Grid's abstract methods: the wrapped Grid's.
    def set_run(self, run) -> None:
        self.inner.set_run(run)

    @property
    def run(self):
        return self.inner.run

    def create_message(self, content, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def get_nodes(self):
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Flower's contract: push, then pull until every reply is in or ``timeout`` passed."""
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            left = self.pull_interval if deadline is None else deadline - time.monotonic()
            if not pending or left <= 0:
                break
            time.sleep(min(self.pull_interval, left))
        return replies

    def __getattr__(self, name: str):  # anything a Grid subclass adds (e.g. close)
        return getattr(self.inner, name)


def prompt(grid: Grid) -> Grid:
    """``grid`` polling promptly; a Grid that already does (or is already wrapped) unchanged."""
    return grid if isinstance(grid, PromptGrid) else PromptGrid(grid)
