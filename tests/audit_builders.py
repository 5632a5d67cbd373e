"""Small governance fixtures: a clock, a node with an n-entry log, a run directory, raw line edits."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

from twinfed.governance.audit_log import GENESIS, AuditEntry, encode_entry, line_hash
from twinfed.governance.keys import Signer
from twinfed.governance.layout import open_audit, read_info, state_paths
from twinfed.governance.node_state import init_coordinator, init_node
from twinfed import events as ev
from twinfed.wire import LogHead, NodeHead, Refusal, RefusalCode

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=timezone.utc)
PLAN_SHA = "5e" * 32
WEIGHTS_SHA = "7a" * 32


class Clock:
    """A clock that advances one second per reading: exact times, no patching."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


def node_with_log(root: Path, n: int, *, name: str = "a") -> Path:
    """A node state whose audit log has ``n`` entries (the first is node_initialised); its log path."""
    init_node(root, site_name=name, at=T0)
    log = open_audit(root, clock=Clock())
    for i in range(1, n):
        log.append("test_round", {"round": i, "plan_sha256": PLAN_SHA, "epsilon_spent": 0.25 * i,
                                  "epsilon_budget": 3.0, "patients_used": 5, "patients_excluded": 1})
    return state_paths(root).audit


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def write_lines(path: Path, new: list[bytes]) -> None:
    path.write_bytes(b"".join(ln + b"\n" for ln in new))


def resign(entries: list[AuditEntry], signer: Signer, start_prev: str = GENESIS) -> list[bytes]:
    """The same events re-chained and re-signed with ``signer`` (what a forger with a key does)."""
    out, prev = [], start_prev
    for seq, e in enumerate(entries):
        line = encode_entry(signer, seq=seq, prev=prev, actor=e.actor, event=e.event, details=e.details,
                            time=e.time)
        out.append(line.rstrip(b"\n"))
        prev = line_hash(line)
    return out


def make_run(root: Path, sites: tuple[str, ...] = ("a", "b"), rounds: int = 2, *,
             refuse: dict[str, int] | None = None) -> Path:
    """A run directory as client/server write it: ``refuse`` maps a site to the round it refuses
    (budget exhausted). The study starts and finishes in the coordinator's log."""
    refuse = refuse or {}
    clock = Clock()
    init_coordinator(root / "coordinator", at=T0)
    coord = open_audit(root / "coordinator", clock=clock)
    nodes = {}
    for s in sites:
        init_node(root / "nodes" / s, site_name=s, at=T0)
        nodes[s] = open_audit(root / "nodes" / s, clock=clock)
    coord.append(ev.StudyStarted(plan_sha256=PLAN_SHA, purpose="twin-training", rounds=rounds,
                                 min_nodes=len(sites), differential_privacy=True, epsilon_per_site=3.0,
                                 secure_aggregation=False))
    for s in sites:
        coord.append(ev.NodeSeen(site=s, key_fingerprint=read_info(root / "nodes" / s).key_fingerprint))
    for r in range(1, rounds + 1):
        started = coord.append(ev.RoundStarted(round=r, plan_sha256=PLAN_SHA))
        anchor = LogHead(seq=started.seq, hash=started.hash)
        heads, refused = {}, {}
        for s in sites:
            if refuse.get(s) == r:
                refusal = Refusal(code=RefusalCode.BUDGET_EXHAUSTED)
                nodes[s].append(ev.BudgetExhausted(round=r, plan_sha256=PLAN_SHA, refusal=refusal))
                e = nodes[s].append(ev.RoundRefused(round=r, plan_sha256=PLAN_SHA, refusal=refusal,
                                                    coordinator=anchor))
                refused[s] = refusal
            else:
                e = nodes[s].append(ev.RoundJoined(
                    round=r, plan_sha256=PLAN_SHA, coordinator=anchor, epsilon_spent=round(0.75 * r, 3),
                    epsilon_budget=3.0, patients_used=4, patients_excluded=1, steps=2,
                    differential_privacy=True, update_clip_fraction=0.0))
            heads[s] = NodeHead(hash=e.hash)  # what a node's reply carries
        coord.append(ev.RoundAggregated(round=r, plan_sha256=PLAN_SHA, node_heads=heads,
                                        sites_replied=len(sites), sites_trained=len(sites) - len(refused),
                                        sites_refused=refused, failures=0, weights_sha256=WEIGHTS_SHA))
    coord.append(ev.StudyFinished(plan_sha256=PLAN_SHA, rounds=rounds, rounds_with_update=rounds,
                                  weights_sha256=WEIGHTS_SHA, weights_file_sha256=WEIGHTS_SHA))
    return root
