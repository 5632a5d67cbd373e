"""The coordinator's side of a release: one round in which every node sends a DP aggregate (a
trial's per-arm sums, a study's calibration histogram) instead of a weight change.

The same machinery as a training round, so the same protections hold: the round is announced in
the coordinator's log (``round_started``, the commitment every node records), it goes through the
SecAgg+ workflow with its per-round set-up and minimum sum (a sum of fewer sites than the plan's
``secagg.min_sites`` is never unmasked), every reply is a :class:`twinfed.wire.NodeReply`, and
the coordinator logs what it aggregated (``round_aggregated``: the nodes' heads, the refusals).
It learns the *sum* of the sites' noisy vectors and, from the replies, the variance of the noise
in it: what its intervals need, nothing more.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays

from twinfed.server.strategy import TwinStrategy
from twinfed.wire import LogHead

Instruction = Callable[[LogHead | None], dict]  # the coordinator's commitment -> the fit config


@dataclass(frozen=True)
class ReleaseResult:
    total: np.ndarray | None  # the summed vector (None: nothing was unmasked)
    noise_var: float  # the variance of the noise on each of its components
    sites_released: int
    history: dict  # the round's record, as summary.json keeps it
    sites: dict  # site -> what the coordinator knows of it (SiteRecord.summary())
    aggregates: dict  # site -> its release's privacy figures


class ReleaseStrategy(TwinStrategy):
    """A one-round strategy that sums the nodes' release vectors instead of averaging updates.
    ``release_round`` is the round number the plan's nodes see (a calibration's is the study's
    ``rounds + 1``; a trial's 1); ``label`` names the release in the coordinator's progress."""

    def __init__(self, plan, weights, *, instruction: Instruction, release_round: int, label: str,
                 **kw):
        super().__init__(plan, weights, **kw)
        self.instruction = instruction
        self.release_round = release_round
        self.label = label
        self.total: np.ndarray | None = None
        self.noise_var = 0.0
        self.sites_released = 0
        self.aggregates: dict[str, dict] = {}  # site -> its release's privacy figures (DPAggregate)
        self.last_replies: list = []  # the round's (NodeReply, FitRes) pairs

    def _plan_round(self, server_round: int) -> int:
        return self.release_round

    def _instruction(self, head: LogHead | None, server_round: int) -> dict:
        return self.instruction(head)

    def aggregate_fit(self, server_round, results, failures):
        from twinfed.privacy.release import from_update

        replies = self._replies(results)
        self.last_replies = replies
        trained = self._record_sites(self.release_round, replies)
        if trained:
            if self.masked:  # the workflow hands every result the mean over the results summed
                mean = from_update(parameters_to_ndarrays(results[0][1].parameters))
                self.total = mean * len(results)
            else:
                ok = [from_update(parameters_to_ndarrays(res.parameters)) for reply, res in replies
                      if reply.status == "ok"]
                self.total = np.sum(ok, axis=0)
            released = [r for r, _res in replies if r.status == "ok" and r.released and r.released.aggregate]
            self.noise_var = float(sum(r.released.aggregate.noise_std ** 2 for r in released))
            self.aggregates = {r.site: r.released.aggregate.model_dump(mode="json") for r in released}
        self.sites_released = trained
        self._audit_round(self.release_round, replies, len(failures), trained, None)
        self._history(self.release_round, trained, len(replies), len(failures), None, skipped=False)
        return ndarrays_to_parameters(self.final_weights), {}

    def record_skipped(self, server_round: int, results, failures, *, code: str, trained: int) -> None:
        self.last_replies = self._replies(results)
        super().record_skipped(server_round, results, failures, code=code, trained=trained)

    def node_heads(self) -> dict:
        """The audit heads of the nodes that replied in the round."""
        return self._heads(self.last_replies)

    def refusals(self) -> dict:
        """Each refusing node's coded refusal."""
        return self._refused(self.last_replies)

    def _round_line(self, server_round, trained, replied, failures, what, seconds) -> str:
        label = "" if self.plan.privacy.enabled else " [NO DIFFERENTIAL PRIVACY]"
        what = "summed" if what == "no update" else what
        return (f"{self.label}{label}: {trained} site(s) released, {replied - trained} refused, "
                f"{failures} failed, {what}, {seconds:.1f} s")


def run_release(session, context, weights, *, instruction: Instruction, release_round: int,
                label: str) -> tuple[ReleaseResult, ReleaseStrategy]:
    """One release round on the nodes of ``session`` (a
    :class:`twinfed.server.session.CoordinatorSession`); the nodes receive ``weights`` as the model."""
    strategy = session.run_rounds(context, ReleaseStrategy, weights, rounds=1, instruction=instruction,
                                  release_round=release_round, label=label)
    history = strategy.history[-1] if strategy.history else {}
    total = None if history.get("skipped") else strategy.total
    sites = {name: rec.summary() for name, rec in sorted(strategy.sites.items())}
    return ReleaseResult(total, strategy.noise_var, strategy.sites_released, history, sites,
                         strategy.aggregates), strategy
