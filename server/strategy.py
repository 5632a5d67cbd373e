"""The coordinator's strategy: FedAvg of the nodes' weight changes, with a round-by-round record.

Nodes send the change of the weights over the round, each with weight 1. Under SecAgg+ the
coordinator only ever holds the masked mean over every node that replied; refusing nodes send a
zero change, so the mean over the nodes that trained is that mean times replied / trained.

What the coordinator holds, and so records, is only what nodes released
(:class:`twinfed.wire.NodeReply`): coded statuses, audit heads, DP-released counts and privacy
figures; and what it computes itself: the norm of the aggregated update. No loss, no exact count.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAvg

from twinfed.events import NodeSeen, RoundAggregated, RoundSkipped, RoundStarted, SecAggSetup
from twinfed.models.digest import weights_sha256
from twinfed.models.plan import TrainingPlan
from twinfed.wire import DP, LogHead, NodeReply, Refusal, RefusalCode, RoundInstruction

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


class TwinStrategy(FedAvg):
    def __init__(self, plan: TrainingPlan, initial_weights, *, min_nodes: int,
                 progress: Progress | None = None, masked: bool = False, audit=None,
                 on_sampled: Callable[[int], tuple[int, int, int]] | None = None):
        self.masked = masked
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
            entry = self.audit.append(RoundStarted(round=server_round, plan_sha256=self.plan.sha256()))
            head = LogHead(seq=entry.seq, hash=entry.hash)
        return RoundInstruction(plan_json=self.plan_json, plan_sha256=self.plan.sha256(),
                                round=server_round, coordinator=head,
                                skipped_rounds=tuple(self.skipped_rounds)).to_config()

    def configure_fit(self, server_round, parameters, client_manager):
        instructions = super().configure_fit(server_round, parameters, client_manager)
        self._secagg = self.on_sampled(len(instructions)) if self.on_sampled and instructions else None
        return instructions

    # -- what came back ---------------------------------------------------------------------

    def _replies(self, results) -> list[tuple[NodeReply, object]]:
        out = []
        for proxy, res in results:
            try:
                out.append((NodeReply.from_metrics(res.metrics), res))
            except (KeyError, ValueError):  # not a twinfed reply: counted as refused, never trusted
                out.append((NodeReply(site=f"node-{abs(hash(proxy.cid)) % 10**8}", status="refused",
                                      refusal=Refusal(code=RefusalCode.INTERNAL_ERROR)), res))
        return out

    def _record_sites(self, server_round: int, replies) -> int:
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
            if self.masked:  # every reply carries the same masked mean over all replies
                mean = [u * (len(results) / trained) for u in parameters_to_ndarrays(results[0][1].parameters)]
            else:
                ok = [parameters_to_ndarrays(res.parameters) for reply, res in replies if reply.status == "ok"]
                mean = [sum(parts) / trained for parts in zip(*ok)]
            self.final_weights = [w + u.astype(w.dtype) for w, u in zip(self.final_weights, mean)]
        norm = float(np.sqrt(sum(float(np.sum(np.square(u, dtype=np.float64))) for u in mean))) \
            if mean is not None else None
        self._audit_round(server_round, replies, len(failures), trained, norm)
        self._history(server_round, trained, len(results), len(failures), norm, skipped=False)
        return ndarrays_to_parameters(self.final_weights), {}

    def record_skipped(self, server_round: int, results, failures, *, code: str, trained: int) -> None:
        """A round whose sum the SecAgg+ workflow did not unmask (see server.secagg_workflow)."""
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
        self._history(server_round, trained, len(results), len(failures), None, skipped=True, code=code)

    def ensure_recorded(self, server_round: int) -> None:
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
