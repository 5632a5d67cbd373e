"""The coordinator's strategy: FedAvg over the nodes that trained, with a round-by-round record.

Refused replies (``status="refused"``) carry no weights and are left out of the average; they
are recorded with their one-line reason. Only aggregate, plan-declared figures are kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from flwr.common import FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAvg

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


class TwinStrategy(FedAvg):
    def __init__(self, plan: TrainingPlan, initial_weights, *, min_nodes: int,
                 progress: Progress | None = None):
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
        return {"plan": self.plan_json, "round": server_round}

    def aggregate_fit(self, server_round, results, failures):
        trained: list = []
        patients = 0
        losses = []
        for proxy, res in results:
            m = res.metrics
            site = str(m.get("site", proxy.cid))
            rec = self.sites.setdefault(site, SiteRecord())
            if m.get("status") == "ok":
                trained.append((proxy, res))
                rec.rounds_joined += 1
                rec.patients_used = int(m["patients_used"])
                rec.patients_excluded = int(m["patients_excluded"])
                rec.last_train_loss = float(m["train_loss"])
                patients += res.num_examples
                losses.append((res.num_examples, float(m["train_loss"])))
            else:
                rec.rounds_refused += 1
                rec.refusals.append({"round": server_round, "reason": str(m.get("reason", ""))})
        aggregated, _ = super().aggregate_fit(server_round, trained, failures) if trained else (None, {})
        if aggregated is not None:
            self.final_weights = parameters_to_ndarrays(aggregated)
        loss = sum(n * v for n, v in losses) / max(1, sum(n for n, _ in losses)) if losses else None
        seconds = time.perf_counter() - self._round_started
        entry = {"round": server_round, "sites_trained": len(trained),
                 "sites_refused": len(results) - len(trained), "failures": len(failures),
                 "patients": patients, "train_loss": loss, "seconds": round(seconds, 3)}
        self.history.append(entry)
        loss_text = f"{loss:.4f}" if loss is not None else "-"
        self.progress(f"round {server_round}/{self.plan.rounds}: {len(trained)} site(s) trained, "
                      f"{len(results) - len(trained)} refused, {len(failures)} failed, "
                      f"{patients} patients, loss {loss_text}, {seconds:.1f} s")
        return aggregated, {}

    def __repr__(self) -> str:
        return "TwinStrategy(FedAvg)"


def parameters_of(weights) -> Parameters:
    return ndarrays_to_parameters(list(weights))


__all__ = ["TwinStrategy", "SiteRecord", "FitRes"]
