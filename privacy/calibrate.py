"""From a budget to a noise multiplier, before training (calibrate once, then train).

Like Opacus's ``get_noise_multiplier``, but composed with what the node has already spent: the
noise is the smallest (to within ``tolerance`` in epsilon) for which the ledger's segments plus
the whole planned study stay within the target. The maths is Opacus's accountant.
"""

from __future__ import annotations

from twinfed.ledger_file import Accountant, Segment
from twinfed.privacy.ledger import BudgetExhausted, epsilon_of

MAX_SIGMA = 1e4


def sample_rate(n_released: int, expected_batch: int) -> float:
    """Poisson rate over patients: the plan's expected batch over the site's *released* (noisy)
    patient count, never the exact one, so the rate reveals nothing the release did not."""
    return min(1.0, expected_batch / max(1, n_released))


def noise_for_budget(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                     spent: list[Segment] | None = None, accountant: Accountant = "rdp",
                     tolerance: float = 0.01) -> float:
    """Noise multiplier so that ``spent`` + ``steps`` at ``sample_rate`` reach at most
    ``target_epsilon`` (total), and no more than ``tolerance`` below it."""
    history = list(spent or [])

    def eps(sigma: float) -> float:
        return epsilon_of([*history, Segment(sample_rate=sample_rate, noise_multiplier=sigma,
                                             steps=steps)], delta, accountant)

    lo, hi = 0.0, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > MAX_SIGMA:
            raise BudgetExhausted(
                f"no amount of noise fits {steps} steps into epsilon {target_epsilon:g} on top of what "
                "this site has spent; ask for a new budget or approve a shorter plan")
    while True:
        mid = (lo + hi) / 2
        e = eps(mid)
        if e > target_epsilon:
            lo = mid
        else:
            hi = mid
            if target_epsilon - e <= tolerance or hi - lo < 1e-6:
                return hi
