"""The coordinator's Grid pulls replies as promptly as the simulation engine's, and keeps
Flower's contract for send_and_receive (every reply, or what came before the timeout)."""

from __future__ import annotations

import threading
import time

from types import SimpleNamespace

from flwr.serverapp import Grid

from twinfed.server.prompt_grid import PULL_INTERVAL_S, PromptGrid, prompt


class SlowLink(Grid):
    """A Grid over a SuperLink stand-in whose replies appear ``delay`` seconds after the push (None: never)."""

    def __init__(self, delay: float | None):
        self.delay = delay
        self.pulls = 0
        self.pushed_at = 0.0
        self.sent: dict = {}

    def set_run(self, run):  # pragma: no cover - not used
        pass

    @property
    def run(self):  # pragma: no cover - not used
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return SimpleNamespace(dst_node_id=dst_node_id)

    def get_node_ids(self):
        return [1, 2, 3]

    def push_messages(self, messages):
        self.pushed_at = time.monotonic()
        ids = []
        for i, m in enumerate(messages):
            ids.append(f"m{i}")
            self.sent[f"m{i}"] = m
        return ids

    def send_and_receive(self, messages, *, timeout=None):
        raise AssertionError("the wrapper must not fall back to the wrapped Grid's polling")

    def pull_messages(self, message_ids):
        self.pulls += 1
        if self.delay is None or time.monotonic() - self.pushed_at < self.delay:
            return []
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=mid)) for mid in message_ids]


def _messages(grid, n=3):
    return [grid.create_message(None, "query", node, "g") for node in range(1, n + 1)]


def test_every_reply_is_returned_soon_after_it_arrives():
    link = SlowLink(delay=0.3)
    grid = PromptGrid(link)
    t0 = time.monotonic()
    replies = list(grid.send_and_receive(_messages(grid)))
    waited = time.monotonic() - t0
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    # Flower's deployed Grid would first look again after 3 s.
    assert waited < 0.3 + 1.0
    assert link.pulls >= 2


def test_a_timeout_returns_what_came_and_never_blocks_longer():
    link = SlowLink(delay=None)
    grid = PromptGrid(link)
    t0 = time.monotonic()
    assert list(grid.send_and_receive(_messages(grid), timeout=0.25)) == []
    assert 0.25 <= time.monotonic() - t0 < 0.25 + 1.0


def test_everything_else_is_the_wrapped_grids_own():
    link = SlowLink(delay=0)
    grid = prompt(link)
    assert prompt(grid) is grid  # never wrapped twice
    assert list(grid.get_node_ids()) == [1, 2, 3]
    assert [n.node_id for n in grid.get_nodes()] == [1, 2, 3]
    assert grid.delay == 0  # attributes a Grid subclass adds
    assert PULL_INTERVAL_S <= 0.1


def test_replies_from_another_thread_are_picked_up():
    link = SlowLink(delay=None)
    grid = PromptGrid(link)
    threading.Timer(0.2, lambda: setattr(link, "delay", 0.0)).start()
    assert len(list(grid.send_and_receive(_messages(grid, 2), timeout=5))) == 2
