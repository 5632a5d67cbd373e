"""A node's Gaussian release of a vector of clipped per-patient sums, charged to its ledger.

What an in-silico trial (its per-arm sums, ``twinfed.models.trial``) and the end of a study (the
calibration histogram of held-out patients, ``twinfed.models.calibration``) release. One patient
moves such a vector by at most its *sensitivity* ``D`` in L2 norm (the design or the histogram's
construction fixes it, a declared constant), so adding Gaussian noise of std ``sigma x D`` to
every component is the Gaussian mechanism with noise multiplier ``sigma``: for the accountant,
one step of the subsampled Gaussian at rate 1, a :class:`Segment` like any other in the ledger.

- ``sigma`` is either declared by the plan (the calibration's) or calibrated here so that the
  release costs the site at most the plan's epsilon on top of everything it released before
  (:func:`noise_for_epsilon`, Opacus's accountant through the ledger);
- the spend is *reserved* before the computation it pays for (audited first, then the ledger,
  under the node's state lock, by the caller), as a training round's is;
- the noise is drawn from the operating system's CSPRNG, never from a seeded generator;
- the vector travels inside SecAgg+ divided by :data:`SUM_SCALE`, so sums of up to about a
  million patients fit the update clip while SecAgg+'s quantisation (2^22 levels) stays a few
  tenths of one patient, far below the noise.
"""

from __future__ import annotations

import math
import random

import numpy as np

from twinfed.errors import TwinfedError
from twinfed.ledger_file import Segment
from twinfed.privacy.calibrate import noise_for_budget

SUM_SCALE = 2.0 ** 21
MECHANISM = "gaussian-sum"
_CSPRNG = random.SystemRandom()


def release_segment(*, plan_sha256: str, server_round: int, noise_multiplier: float) -> Segment:
    """A vector release as the accountant sees it: rate 1, one step."""
    return Segment(sample_rate=1.0, noise_multiplier=noise_multiplier, steps=1, plan_sha256=plan_sha256,
                   round=server_round, mechanism=MECHANISM)


def noise_for_epsilon(ledger, *, epsilon: float, delta: float | None = None) -> float:
    """The smallest noise multiplier (within 0.01 in epsilon) for which one release costs the site
    at most ``epsilon`` on top of what its ledger already holds, at the budget's delta and, when
    the release has a smaller ``delta`` of its own, at that one too (the larger noise of the two)."""
    sigma = 0.0
    for at in sorted({ledger.delta, ledger.delta if delta is None else delta}):
        sigma = max(sigma, noise_for_budget(target_epsilon=ledger.spent(at) + epsilon, delta=at,
                                            sample_rate=1.0, steps=1, spent=ledger.segments,
                                            accountant=ledger.accountant))
    return sigma


def gaussian_noise(size: int, std: float) -> np.ndarray:
    """``size`` independent draws of N(0, std^2) from the operating system's CSPRNG."""
    return np.array([_CSPRNG.gauss(0.0, std) for _ in range(int(size))], dtype=np.float64)


def noisy(vector: np.ndarray, *, sensitivity: float, noise_multiplier: float) -> np.ndarray:
    """``vector`` with Gaussian noise of std ``noise_multiplier x sensitivity`` on every entry."""
    vector = np.asarray(vector, dtype=np.float64)
    return vector + gaussian_noise(vector.size, noise_multiplier * sensitivity).reshape(vector.shape)


def to_update(vector: np.ndarray, clip: float) -> list[np.ndarray]:
    """The (noisy) sums as the update SecAgg+ masks: one float32 array scaled into the clip."""
    scaled = np.asarray(vector, dtype=np.float64).ravel() / SUM_SCALE
    if not np.all(np.abs(scaled) < clip):
        raise TwinfedError(f"a released sum exceeds {clip * SUM_SCALE:.3g}: more patients than a "
                           "release can carry; split the site")
    return [scaled.astype(np.float32)]


def from_update(arrays: list[np.ndarray]) -> np.ndarray:
    """The sums back from an (aggregated) update."""
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays]) * SUM_SCALE


def noise_std(noise_multiplier: float, sensitivity: float) -> float:
    return float(noise_multiplier) * float(sensitivity)


def histogram_sensitivity(n_states: int) -> float:
    """A calibration histogram: each patient puts mass 1 into each state's row (L2 at most 1
    per row), so ``sqrt(S)`` over the whole ``[S, B]`` histogram."""
    return math.sqrt(n_states)
