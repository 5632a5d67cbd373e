"""The coordinator's strategy: FedAvg of the nodes' weight changes, with a round-by-round record.

Nodes send the change of the weights over the round, each with weight 1. Under SecAgg+ the
coordinator only ever holds the unmasked mean over the nodes whose masked vectors were summed
(``results``); a node that refuses a masked round withdraws and sends no vector (see
twinfed.privacy.secagg), and the SecAgg+ workflow hands its refused reply over with
:meth:`TwinStrategy.record_withdrawn`. Without SecAgg+ refusing nodes send a zero change.

What the coordinator holds, and so records, is only what nodes released
(:class:`twinfed.wire.NodeReply`): coded statuses, audit heads, DP-released counts and privacy
figures; and what it computes itself: the norm of the aggregated update. No loss, no exact count.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAvg

from twinfed.events import NodeSeen, RoundAggregated, RoundSkipped, RoundStarted, SecAggSetup
from twinfed.models.digest import weights_sha256
from twinfed.models.plan import TrainingPlan
from twinfed.wire import (DP, INSTRUCTION_KEY, TRIAL_KEY, LogHead, NodeHead, NodeReply, Refusal, RefusalCode,
                          RoundInstruction, TrialInstruction)

Progress = Callable[[str], None]
WITHHELD = "withheld"


@dataclass
class SiteRecord:
    """One site as the coordinator knows it: only what the site released."""

    rounds_joined: int = 0
    rounds_refused: int = 0
    refusals: list[dict] = field(default_factory=list)
    counts: dict | None = None  # twinfed.wire.DPCounts as released
    privacy: dict | None = None  # twinfed.wire.DPPrivacy as released

    def summary(self) -> dict:
        """The site's entry in ``summary.json``; ``release`` says what kind each figure is."""
        c = self.counts or {}
        return {
            "patients_used": c.get("patients_used"),
            "patients_excluded": c.get("patients_excluded"),
            "rounds_joined": self.rounds_joined,
            "rounds_refused": self.rounds_refused,
            "refusals": self.refusals,
            "privacy": self.privacy,
            "release": {"patients_used": DP if self.counts else WITHHELD,
                        "patients_excluded": DP if self.counts else WITHHELD,
                        "privacy": DP if self.privacy else WITHHELD},
        }


ANCHORS_FILE = "node_anchors.json"  # in the coordinator's state directory (RUN/coordinator)
ANCHORS_FORMAT = "twinfed-node-anchors-v1"


class NodeAnchors:
    """The head of each node's log the coordinator last anchored, kept across studies so that a
    node whose log was cut back since (with its ledger, to start its budget afresh) is caught:
    every instruction to a node carries its own last anchored head (``node_anchor``), which its
    log must still hold (``log_rolled_back`` otherwise).

    Kept in ``ANCHORS_FILE`` in the coordinator's state directory (``RUN/coordinator/``),
    rewritten after each round's replies. A run starts from the newest head per site among its
    own file and those of the runs beside it (``RUN/../*/coordinator/``: a consortium's runs share
    a parent, ``runs/`` by default). Each head is kept with the node's audit key fingerprint and
    is sent only to a node with that key: a new node state (a new key) is a new log, and another
    consortium's site of the same name never gets it. Only hashes are kept, never a seq
    (:class:`twinfed.wire.NodeHead`). ``nodes`` maps Flower node ids to (site, key fingerprint)
    as the roll call answered."""

    def __init__(self, path: Path | None, sites: dict[str, dict] | None = None) -> None:
        self.path = path
        self.sites: dict[str, dict] = dict(sites or {})  # site -> {key_fingerprint, hash, at}
        self.nodes: dict[int, tuple[str, str | None]] = {}

    @classmethod
    def open(cls, state_dir: Path) -> NodeAnchors:
        """The anchors of ``state_dir`` (a coordinator state in a run) and of the runs beside it."""
        state_dir = Path(state_dir)
        run = state_dir.parent
        files = [state_dir / ANCHORS_FILE]
        if run.parent.is_dir():
            files += sorted(p / state_dir.name / ANCHORS_FILE for p in run.parent.iterdir()
                            if p != run and p.is_dir())
        sites: dict[str, dict] = {}
        for f in files:
            for site, a in _read_anchors(f).items():
                if site not in sites or str(a.get("at", "")) > str(sites[site].get("at", "")):
                    sites[site] = a
        return cls(state_dir / ANCHORS_FILE, sites)

    def remember_roll_call(self, answered: dict) -> None:
        """``node id -> NodeReply`` from the roll call: who each node is."""
        for nid, reply in answered.items():
            self.nodes[nid] = (reply.site, reply.key_fingerprint)

    def anchor_for(self, node_id) -> NodeHead | None:
        site, fp = self.nodes.get(node_id, (None, None))
        a = self.sites.get(site) if site is not None else None
        if a is None or fp is None or a.get("key_fingerprint") != fp:
            return None
        return NodeHead(hash=a["hash"])

    def record(self, replies: list[NodeReply]) -> None:
        """Each reply's head becomes its site's anchor; the file is rewritten if any changed."""
        from datetime import datetime, timezone

        from twinfed.governance.audit_log import format_time

        now = format_time(datetime.now(timezone.utc))
        changed = False
        for reply in replies:
            if reply.audit_head is None or reply.key_fingerprint is None:
                continue
            self.sites[reply.site] = {"key_fingerprint": reply.key_fingerprint,
                                      "hash": reply.audit_head.hash, "at": now}
            changed = True
        if changed and self.path is not None:
            from twinfed.atomic import write_json_atomic

            write_json_atomic(self.path, {"format": ANCHORS_FORMAT, "sites": self.sites})

    def instruct(self, proxy_fitins: list) -> list:
        """Each node's fit instruction with its own ``node_anchor`` (a copy per node)."""
        from flwr.common import FitIns

        out = []
        for proxy, fitins in proxy_fitins:
            anchor = self.anchor_for(getattr(proxy, "node_id", None))
            if anchor is not None:
                fitins = FitIns(fitins.parameters, _with_anchor(dict(fitins.config), anchor))
            out.append((proxy, fitins))
        return out


def _with_anchor(config: dict, anchor: NodeHead) -> dict:
    for key, model in ((INSTRUCTION_KEY, RoundInstruction), (TRIAL_KEY, TrialInstruction)):
        if key in config:
            instruction = model.model_validate_json(str(config[key]))
            config[key] = instruction.model_copy(update={"node_anchor": anchor}).model_dump_json()
    return config


def _read_anchors(path: Path) -> dict[str, dict]:
    """A run's anchors file, or nothing if it is missing or unreadable (never an error: the
    anchors add a check, their loss only removes it)."""
    import json

    try:
        data = json.loads(path.read_text())
        sites = data["sites"] if data.get("format") == ANCHORS_FORMAT else {}
        return {str(s): {"key_fingerprint": str(a["key_fingerprint"]), "hash": NodeHead(hash=a["hash"]).hash,
                         "at": str(a.get("at", ""))} for s, a in sites.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


class TwinStrategy(FedAvg):
    def __init__(self, plan: TrainingPlan, initial_weights, *, min_nodes: int,
                 progress: Progress | None = None, masked: bool = False, audit=None,
                 on_sampled: Callable[[int], tuple[int, int, int]] | None = None,
                 anchors: NodeAnchors | None = None):
        self.masked = masked
        self.anchors = anchors  # each node's last anchored head, sent back to it (NodeAnchors)
        self.audit = audit  # the coordinator's AuditLog (twinfed.governance), or None
        self.on_sampled = on_sampled  # the SecAgg+ workflow's hook: set-up for the sampled nodes
        self._seen: dict[str, str] = {}  # site -> key fingerprint already pinned in the audit log
        self.plan = plan
        self.plan_json = plan.canonical_json()
        self.progress = progress or (lambda _msg: None)
        self.sites: dict[str, SiteRecord] = {}
        self.history: list[dict] = []
        self.skipped_rounds: list[int] = []
        self.final_weights = list(initial_weights)
        self._round_started = time.perf_counter()
        self._secagg: tuple[int, int, int] | None = None
        self._withdrawn: list[NodeReply] = []  # this round's nodes that withdrew from the masked sum
        super().__init__(
            fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=min_nodes,
            min_evaluate_clients=0, min_available_clients=min_nodes,
            initial_parameters=ndarrays_to_parameters(list(initial_weights)),
            on_fit_config_fn=self._fit_config, accept_failures=True,
            fit_metrics_aggregation_fn=lambda _metrics: {},
        )

    # -- a round's instruction ---------------------------------------------------------------

    def _fit_config(self, server_round: int) -> dict:
        self._round_started = time.perf_counter()
        head = None
        if self.audit is not None:  # the round's commitment: nodes log this entry's seq and hash
            entry = self.audit.append(RoundStarted(round=self._plan_round(server_round),
                                                   plan_sha256=self.plan.sha256()))
            head = LogHead(seq=entry.seq, hash=entry.hash)
        return self._instruction(head, server_round)

    def _plan_round(self, server_round: int) -> int:
        """The round number the plan's nodes see (and the audit logs) for Flower's ``server_round``."""
        return server_round

    def _instruction(self, head: LogHead | None, server_round: int) -> dict:
        """The round's fit config, under the coordinator's commitment ``head``: a training round."""
        return RoundInstruction(plan_json=self.plan_json, plan_sha256=self.plan.sha256(),
                                round=server_round, coordinator=head,
                                skipped_rounds=tuple(self.skipped_rounds)).to_config()

    def configure_fit(self, server_round, parameters, client_manager):
        self._withdrawn = []
        instructions = super().configure_fit(server_round, parameters, client_manager)
        if self.anchors is not None:
            instructions = self.anchors.instruct(instructions)
        self._secagg = self.on_sampled(len(instructions)) if self.on_sampled and instructions else None
        return instructions

    # -- what came back ---------------------------------------------------------------------

    def record_withdrawn(self, replies: list[NodeReply]) -> None:
        """The refused replies of this round's nodes that withdrew from the masked sum: refusals
        like any other, but no part of ``results`` (their vectors were never summed)."""
        self._withdrawn = list(replies)

    def _replies(self, results) -> list[tuple[NodeReply, object]]:
        """Every reply of the round: the results' (the nodes summed), then the withdrawn."""
        out = []
        for proxy, res in results:
            try:
                out.append((NodeReply.from_metrics(res.metrics), res))
            except (KeyError, ValueError):  # not a twinfed reply: counted as refused, never trusted
                out.append((NodeReply(site=f"node-{abs(hash(proxy.cid)) % 10**8}", status="refused",
                                      refusal=Refusal(code=RefusalCode.INTERNAL_ERROR)), res))
        return out + [(reply, None) for reply in self._withdrawn]

    def _record_sites(self, server_round: int, replies) -> int:
        if self.anchors is not None:
            self.anchors.record([reply for reply, _res in replies])
        trained = 0
        for reply, _res in replies:
            rec = self.sites.setdefault(reply.site, SiteRecord())
            if reply.status != "ok":
                rec.rounds_refused += 1
                rec.refusals.append({"round": server_round,
                                     **reply.refusal.model_dump(mode="json", exclude_none=True)})
                continue
            trained += 1
            rec.rounds_joined += 1
            if reply.released and reply.released.counts:
                rec.counts = reply.released.counts.model_dump(mode="json")
            if reply.released and reply.released.privacy:
                rec.privacy = reply.released.privacy.model_dump(mode="json")
        return trained

    def aggregate_fit(self, server_round, results, failures):
        replies = self._replies(results)
        trained = self._record_sites(server_round, replies)
        mean = None
        if trained:
            if self.masked:  # every result carries the same mean over the results summed
                mean = [u * (len(results) / trained) for u in parameters_to_ndarrays(results[0][1].parameters)]
            else:
                ok = [parameters_to_ndarrays(res.parameters) for reply, res in replies if reply.status == "ok"]
                mean = [sum(parts) / trained for parts in zip(*ok)]
            self.final_weights = [w + u.astype(w.dtype) for w, u in zip(self.final_weights, mean)]
        norm = float(np.sqrt(sum(float(np.sum(np.square(u, dtype=np.float64))) for u in mean))) \
            if mean is not None else None
        self._audit_round(server_round, replies, len(failures), trained, norm)
        self._history(server_round, trained, len(replies), len(failures), norm, skipped=False)
        return ndarrays_to_parameters(self.final_weights), {}

    def record_skipped(self, server_round: int, results, failures, *, code: str, trained: int) -> None:
        """A round whose sum the SecAgg+ workflow did not unmask (see server.secagg_workflow)."""
        server_round = self._plan_round(server_round)
        replies = self._replies(results)
        self._record_sites(server_round, replies)
        self.skipped_rounds.append(server_round)
        if self.audit is not None:
            self._pin_keys(replies)
            self.audit.append(RoundSkipped(round=server_round, plan_sha256=self.plan.sha256(),
                                           code=code, sites_trained=trained,
                                           min_sites=self.plan.privacy.secagg.min_sites,
                                           node_heads=self._heads(replies),
                                           sites_refused=self._refused(replies)))
        self._history(server_round, trained, len(replies), len(failures), None, skipped=True, code=code)

    def ensure_recorded(self, server_round: int) -> None:
        server_round = self._plan_round(server_round)
        if not any(h["round"] == server_round for h in self.history):
            self.record_skipped(server_round, [], [], code="secagg_halted", trained=0)

    def _pin_keys(self, replies) -> None:
        for reply, _res in replies:
            fp = reply.key_fingerprint
            if fp and self._seen.get(reply.site) != fp:
                self.audit.append(NodeSeen(site=reply.site, key_fingerprint=fp))
                self._seen[reply.site] = fp

    @staticmethod
    def _refused(replies) -> dict[str, Refusal]:
        return {reply.site: reply.refusal for reply, _res in replies if reply.status != "ok"}

    @staticmethod
    def _heads(replies) -> dict[str, LogHead]:
        return {reply.site: reply.audit_head for reply, _res in replies if reply.audit_head is not None}

    def _audit_round(self, server_round: int, replies, n_failures: int, trained: int,
                     norm: float | None) -> None:
        if self.audit is None:
            return
        self._pin_keys(replies)
        setup = SecAggSetup(sampled=self._secagg[0], shares=self._secagg[1],
                            threshold=self._secagg[2]) if self._secagg else None
        self.audit.append(RoundAggregated(
            round=server_round, plan_sha256=self.plan.sha256(), node_heads=self._heads(replies),
            sites_replied=len(replies), sites_trained=trained,
            sites_refused=self._refused(replies),
            failures=n_failures, weights_sha256=weights_sha256(self.final_weights),
            update_norm=norm, secagg=setup))

    def _history(self, server_round: int, trained: int, replied: int, failures: int,
                 norm: float | None, *, skipped: bool, code: str | None = None) -> None:
        seconds = time.perf_counter() - self._round_started
        entry = {"round": server_round, "sites_trained": trained, "sites_refused": replied - trained,
                 "failures": failures, "update_norm": norm, "skipped": skipped,
                 "seconds": round(seconds, 3)}
        if self._secagg:
            entry["secagg"] = dict(zip(("sampled", "shares", "threshold"), self._secagg))
        self.history.append(entry | ({"skip_code": code} if code else {}))
        if skipped:
            what = f"SKIPPED ({code}): the sum was not unmasked"
        else:
            what = f"update norm {norm:.4g}" if norm is not None else "no update"
        self.progress(self._round_line(server_round, trained, replied, failures, what, seconds))

    def _round_line(self, server_round: int, trained: int, replied: int, failures: int, what: str,
                    seconds: float) -> str:
        """The coordinator's one line per round (never a loss: there is none)."""
        label = "" if self.plan.privacy.enabled else " [NO DIFFERENTIAL PRIVACY]"
        return (f"round {server_round}/{self.plan.rounds}{label}: {trained} site(s) trained, "
                f"{replied - trained} refused, {failures} failed, {what}, {seconds:.1f} s")

    def __repr__(self) -> str:
        return "TwinStrategy(FedAvg)"
