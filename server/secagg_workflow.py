"""The coordinator's SecAgg+ workflow: Flower's, with twinfed's rules (see twinfed.privacy.secagg).

- The set-up (shares, threshold) is derived from the nodes the strategy actually sampled in the
  round and the plan's assumptions (a neighbourhood of O(log n) nodes, see
  twinfed.privacy.neighbourhood), not from the study's minimum: the strategy calls :meth:`TwinSecAggPlusWorkflow.sampled`
  once it has sampled them, before Flower sends the set-up.
- A round where fewer sites trained than the plan's ``secagg.min_sites`` is never unmasked: the
  coordinator would otherwise learn the update of one hospital (or of too few). The round is
  skipped and audited; nodes hear of it with the next instruction.
"""

from __future__ import annotations

from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from twinfed.errors import TwinfedError
from twinfed.privacy.secagg import MODULUS_RANGE, QUANTIZATION_RANGE, min_sampled, min_sum, required_setup
from twinfed.wire import NodeReply


def trained_sites(results) -> int:
    """How many replies say their site trained (malformed replies count as not)."""
    n = 0
    for _proxy, res in results:
        try:
            n += NodeReply.from_metrics(res.metrics).status == "ok"
        except (KeyError, ValueError):
            continue
    return n


class TwinSecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow with a per-round set-up and a minimum sum."""

    def __init__(self, plan, *, timeout: float | None = None):
        try:
            shares, threshold = required_setup(min_sampled(plan), plan)
        except TwinfedError:  # the minimum is too small for the plan's assumptions; a round's
            shares, threshold = 3, 2  # own sample decides (sampled() raises if it is too)
        super().__init__(num_shares=shares, reconstruction_threshold=threshold, max_weight=1.0,
                         clipping_range=plan.privacy.update_clip,
                         quantization_range=QUANTIZATION_RANGE, modulus_range=MODULUS_RANGE,
                         timeout=timeout)
        self.plan = plan

    def sampled(self, n_sampled: int) -> tuple[int, int, int]:
        """The set-up for exactly the ``n_sampled`` nodes of this round: (sampled, shares,
        threshold). Python ints: Flower sends them as they are (even shares below n are bumped
        only after sending, so :func:`required_setup` never returns those)."""
        self.num_shares, self.reconstruction_threshold = required_setup(n_sampled, self.plan)
        return n_sampled, self.num_shares, self.reconstruction_threshold

    def unmask_stage(self, grid, context, state) -> bool:
        n = trained_sites(state.legacy_results)
        if n < min_sum(self.plan):
            context.strategy.record_skipped(_round(context), state.legacy_results, state.failures,
                                            code="too_few_trained", trained=n)
            return False
        return super().unmask_stage(grid, context, state)

    def __call__(self, grid, context) -> None:
        super().__call__(grid, context)
        # A round the protocol halted (too many nodes lost) never reached the strategy.
        context.strategy.ensure_recorded(_round(context))


def _round(context) -> int:
    return int(context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND])
