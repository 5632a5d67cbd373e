"""The coordinator's SecAgg+ workflow: Flower's, with twinfed's rules (see twinfed.privacy.secagg).

- The set-up (shares, threshold) is derived from the nodes the strategy actually sampled in the
  round and the plan's assumptions (a neighbourhood of O(log n) nodes, see
  twinfed.privacy.neighbourhood), not from the study's minimum: the strategy calls :meth:`TwinSecAggPlusWorkflow.sampled`
  once it has sampled them, before Flower sends the set-up.
- A node that refuses the round withdraws from it (no masked vector, see
  twinfed.privacy.secagg): Flower counts it among the nodes dropped before their vectors, the
  survivors' shares remove its pairwise masks and the unmask stage's active lists (what every
  node counts before it hands out its shares) hold only the sites that trained. Its coded
  reply, read back from its error, goes to the strategy as a refusal, not a failure.
- A round where fewer sites trained than the plan's ``secagg.min_sites`` is never unmasked: the
  coordinator would otherwise learn the update of one hospital (or of too few). It is checked
  as soon as the masked vectors are in (before Flower's own threshold may halt the round), and
  again before unmasking; the round is skipped and audited; nodes hear of it with the next
  instruction.
- A node lost before its key shares were forwarded is no part of the round: nobody holds a share
  of its keys and nobody masked with it. Flower 1.42 counts it among the dropped nodes to unmask
  (``sampled - active``), asks the survivors for shares they never got and halts the round;
  here the unmask stage sees only the nodes that shared their keys.
"""

from __future__ import annotations

from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from twinfed.errors import TwinfedError
from twinfed.privacy.secagg import (MODULUS_RANGE, QUANTIZATION_RANGE, min_sampled, min_sum,
                                    required_setup, withdrawn_reply)
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


def split_withdrawals(failures) -> tuple[list[NodeReply], list[Exception]]:
    """The refused replies of the nodes that withdrew (one per site), and the real failures."""
    withdrawn: dict[str, NodeReply] = {}
    rest = []
    for exc in failures:
        error = exc.args[0] if exc.args else None
        reply = withdrawn_reply(str(getattr(error, "reason", "") or ""))
        if reply is None:
            rest.append(exc)
        else:  # Flower records an error reply twice at the masked-vector stage
            withdrawn.setdefault(reply.site, reply)
    return list(withdrawn.values()), rest


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
        self._shared: frozenset[int] = frozenset()  # this round's nodes that shared their keys

    def sampled(self, n_sampled: int) -> tuple[int, int, int]:
        """The set-up for exactly the ``n_sampled`` nodes of this round: (sampled, shares,
        threshold). Python ints: Flower sends them as they are (even shares below n are bumped
        only after sending, so :func:`required_setup` never returns those)."""
        self.num_shares, self.reconstruction_threshold = required_setup(n_sampled, self.plan)
        return n_sampled, self.num_shares, self.reconstruction_threshold

    def share_keys_stage(self, grid, context, state) -> bool:
        ok = super().share_keys_stage(grid, context, state)
        self._shared = frozenset(state.active_node_ids)
        return ok

    def collect_masked_vectors_stage(self, grid, context, state) -> bool:
        ok = super().collect_masked_vectors_stage(grid, context, state)
        withdrawn, state.failures = split_withdrawals(state.failures)
        context.strategy.record_withdrawn(withdrawn)
        if not self._enough_trained(context, state):
            return False
        if not ok:  # Flower's threshold: too few masked vectors for some node's neighbourhood
            self._halted(context, state)
        return ok

    def unmask_stage(self, grid, context, state) -> bool:
        if not self._enough_trained(context, state):
            return False
        shared = self._shared
        state.sampled_node_ids = set(state.sampled_node_ids) & shared
        state.nid_to_neighbours = {nid: set(nbrs) & shared
                                   for nid, nbrs in state.nid_to_neighbours.items() if nid in shared}
        if super().unmask_stage(grid, context, state):
            return True
        self._halted(context, state)  # too few shares: e.g. nodes withheld theirs
        return False

    def _halted(self, context, state) -> None:
        """A round the protocol halted after the masked vectors came in, with what they said."""
        context.strategy.record_skipped(_round(context), state.legacy_results, state.failures,
                                        code="secagg_halted", trained=trained_sites(state.legacy_results))

    def _enough_trained(self, context, state) -> bool:
        """The coordinator's minimum sum, over the sites whose masked vectors it holds."""
        n = trained_sites(state.legacy_results)
        if n >= min_sum(self.plan):
            return True
        context.strategy.record_skipped(_round(context), state.legacy_results, state.failures,
                                        code="too_few_trained", trained=n)
        return False

    def __call__(self, grid, context) -> None:
        super().__call__(grid, context)
        # A round the protocol halted (too many nodes lost) never reached the strategy.
        context.strategy.ensure_recorded(_round(context))


def _round(context) -> int:
    return int(context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND])
