"""The coordinator's strategy: FedAvg of the nodes' weight changes, with a round-by-round record.

Nodes send the change of the weights over the round, each with weight 1. Under SecAgg+ the
coordinator only ever holds the masked mean over every node that replied; refusing nodes send a
zero change, so the mean over the nodes that trained is that mean times replied / trained.
Refusals are recorded with their one-line reason. Only aggregate, plan-declared figures are kept.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAvg

from twinfed.models.digest import weights_sha256
from twinfed.models.plan import TrainingPlan

Progress = Callable[[str], None]


@dataclass
class SiteRecord:
    patients_used: int = 0
    patients_excluded: int = 0
    rounds_joined: int = 0
    rounds_refused: int = 0
    last_train_loss: float | None = None
    refusals: list[dict] = field(default_factory=list)
    privacy: dict | None = None


class TwinStrategy(FedAvg):
    def __init__(self, plan: TrainingPlan, initial_weights, *, min_nodes: int,
                 progress: Progress | None = None, masked: bool = False, audit=None):
        self.masked = masked
        self.audit = audit  # the coordinator's AuditLog (twinfed.governance), or None
        self._seen: dict[str, str] = {}  # site -> key fingerprint already pinned in the audit log
        self.plan = plan
        self.plan_json = plan.canonical_json()
        self.progress = progress or (lambda _msg: None)
        self.sites: dict[str, SiteRecord] = {}
        self.history: list[dict] = []
        self.final_weights = list(initial_weights)
        self._round_started = time.perf_counter()
        super().__init__(
            fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=min_nodes,
            min_evaluate_clients=0, min_available_clients=min_nodes,
            initial_parameters=ndarrays_to_parameters(list(initial_weights)),
            on_fit_config_fn=self._fit_config, accept_failures=True,
            fit_metrics_aggregation_fn=lambda _metrics: {},
        )

    def _fit_config(self, server_round: int) -> dict:
        self._round_started = time.perf_counter()
        config = {"plan": self.plan_json, "round": server_round}
        if self.audit is not None:  # the round's commitment: nodes log this entry's seq and hash
            entry = self.audit.append("round_started", {"round": server_round,
                                                        "plan_sha256": self.plan.sha256()})
            config |= {"coordinator_seq": entry.seq, "coordinator_hash": entry.hash}
        return config

    def _audit_round(self, server_round: int, results, n_failures: int) -> None:
        if self.audit is None:
            return
        heads, refused = {}, {}
        for _proxy, res in results:
            m = res.metrics
            site = str(m.get("site", ""))
            fingerprint = str(m.get("key_fingerprint", ""))
            if fingerprint and self._seen.get(site) != fingerprint:
                self.audit.append("node_seen", {"site": site, "key_fingerprint": fingerprint})
                self._seen[site] = fingerprint
            if "audit_hash" in m:
                heads[site] = {"seq": int(m["audit_seq"]), "hash": str(m["audit_hash"])}
            if m.get("status") != "ok":
                refused[site] = str(m.get("reason", ""))
        self.audit.append("round_aggregated", {
            "round": server_round, "plan_sha256": self.plan.sha256(), "node_heads": heads,
            "sites_replied": len(results), "sites_refused": refused, "failures": n_failures,
            "model_sha256": weights_sha256(self.final_weights)})

    def aggregate_fit(self, server_round, results, failures):
        trained = 0
        patients = 0
        losses = []
        sums: list[np.ndarray] | None = None
        for proxy, res in results:
            m = res.metrics
            site = str(m.get("site", proxy.cid))
            rec = self.sites.setdefault(site, SiteRecord())
            if m.get("status") != "ok":
                rec.rounds_refused += 1
                rec.refusals.append({"round": server_round, "reason": str(m.get("reason", ""))})
                continue
            trained += 1
            rec.rounds_joined += 1
            rec.patients_used = int(m["patients_used"])
            rec.patients_excluded = int(m["patients_excluded"])
            rec.last_train_loss = float(m["train_loss"])
            if m.get("privacy"):
                rec.privacy = json.loads(str(m["privacy"]))
            patients += rec.patients_used
            losses.append((rec.patients_used, rec.last_train_loss))
            if not self.masked:
                update = parameters_to_ndarrays(res.parameters)
                sums = update if sums is None else [a + b for a, b in zip(sums, update)]
        if trained:
            if self.masked:  # every reply carries the same masked mean over all replies
                mean = [u * (len(results) / trained) for u in parameters_to_ndarrays(results[0][1].parameters)]
            else:
                mean = [u / trained for u in sums]
            self.final_weights = [w + u.astype(w.dtype) for w, u in zip(self.final_weights, mean)]
        self._audit_round(server_round, results, len(failures))
        loss = sum(n * v for n, v in losses) / max(1, sum(n for n, _ in losses)) if losses else None
        seconds = time.perf_counter() - self._round_started
        entry = {"round": server_round, "sites_trained": trained,
                 "sites_refused": len(results) - trained, "failures": len(failures),
                 "patients": patients, "train_loss": loss, "seconds": round(seconds, 3)}
        self.history.append(entry)
        loss_text = f"{loss:.4f}" if loss is not None else "-"
        label = "" if self.plan.privacy.enabled else " [NO DIFFERENTIAL PRIVACY]"
        self.progress(f"round {server_round}/{self.plan.rounds}{label}: {trained} site(s) trained, "
                      f"{len(results) - trained} refused, {len(failures)} failed, "
                      f"{patients} patients, loss {loss_text}, {seconds:.1f} s")
        return ndarrays_to_parameters(self.final_weights), {}

    def __repr__(self) -> str:
        return "TwinStrategy(FedAvg)"

