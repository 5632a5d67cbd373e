"""Split conformal prediction from a histogram of normalised forecast errors: the maths only.

A calibration patient's forecast error at step k of state s, divided by that patient's own
error scale (``twinfed.models.calibration``), is a normalised score. Each patient puts a total
mass of 1 per state into a histogram over fixed ``edges`` (bins ``[0, e0), [e0, e1), ...,
[e_last, inf)``), spread evenly over their scored (window, step) pairs: a patient with a long
record weighs no more than one with a short record, and adding or removing one patient moves
each state's histogram by at most 1 in L1 and L2 norm (the sensitivity the federated release's
Gaussian noise is scaled to). Everything here accepts a noisy histogram (negative bins, a
non-monotone tail) and repairs it the same way, so a quantile and a draw read the same curve.

Guarantees: :func:`quantiles` is +inf, never a number too small, when the histogram cannot
support the level (too few patients for the finite-sample correction, or more than the target
tail beyond the last edge). No torch: the coordinator imports this module.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def n_bins(edges: Sequence[float]) -> int:
    return len(edges) + 1


def percent(level: float) -> str:
    """A level's key in files and JSON: 0.8 -> "80", 0.975 -> "97.5"."""
    return f"{round(100 * level, 6):g}"


def patient_histogram(scores: np.ndarray, patients: np.ndarray, n_patients: int, edges) -> np.ndarray:
    """scores [N, K, S] normalised scores of N windows; patients [N] index in [0, n_patients);
    -> [S, B] summed patient-weighted histogram (each patient with a window: mass 1 per state).

    Non-finite scores (a patient without a scale) are left out; a patient's mass is spread over
    their finite (window, step) pairs of that state. The sum of :func:`patient_histograms`."""
    return patient_histograms(scores, patients, n_patients, edges).sum(axis=0)


def patient_histograms(scores: np.ndarray, patients: np.ndarray, n_patients: int, edges) -> np.ndarray:
    """Each patient's part of :func:`patient_histogram`: ``[n_patients, S, B]`` (zeros for a
    patient without a finite score). A patient's part reads only their own scores, in their
    order: the same whoever else is in ``scores``."""
    scores = np.asarray(scores, dtype=np.float64)
    patients = np.asarray(patients, dtype=np.int64)
    if scores.ndim != 3 or patients.shape != (scores.shape[0],):
        raise ValueError("scores must be [N, K, S] and patients [N]")
    edges = np.asarray(edges, dtype=np.float64)
    n, k, s = scores.shape
    b = n_bins(edges)
    out = np.zeros((n_patients, s, b))
    owner = np.repeat(patients, k)
    for j in range(s):
        x = scores[:, :, j].reshape(-1)
        ok = np.isfinite(x)
        counts = np.bincount(owner[ok], minlength=n_patients).astype(np.float64)
        weight = 1.0 / counts[owner[ok]]
        cell = owner[ok] * b + np.searchsorted(edges, x[ok], side="right")
        out[:, j] = np.bincount(cell, weights=weight, minlength=n_patients * b).reshape(n_patients, b)
    return out


def tail_cdf(histogram_row: np.ndarray, edges) -> tuple[np.ndarray, np.ndarray, float]:
    """One state's upper-tail curve: ``points`` (0 then the edges), ``tail`` (the fraction of
    mass at or above each point, 1 at 0, non-increasing, in [0, 1]) and the total mass ``N``
    (clipped at >= 1, so a near-empty noisy histogram cannot divide by ~0).

    Noise can make a bin negative and a tail rise again further out; a running maximum from the
    top keeps every tail at least the mass beyond it, the conservative repair (it can only
    widen an interval)."""
    row = np.asarray(histogram_row, dtype=np.float64)
    edges = np.asarray(edges, dtype=np.float64)
    if row.shape != (n_bins(edges),):
        raise ValueError(f"a histogram row has {n_bins(edges)} bins for {len(edges)} edges, not {row.shape}")
    total = max(float(row.sum()), 1.0)
    tails = np.cumsum(row[::-1])[::-1]  # tails[j]: mass in bins j..end, i.e. at or above edges[j-1]
    tails = np.clip(np.maximum.accumulate(tails[::-1])[::-1], 0.0, total)
    points = np.concatenate([[0.0], edges])
    tail = np.concatenate([[1.0], tails[1:] / total])  # every score is at or above 0
    return points, tail, total


def _inverse_tail(points: np.ndarray, tail: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Where the tail curve first falls to each target (+inf where it stays above it): linear
    in the score inside the first bin (from 0, whose log is -inf), linear in the log of the
    score between edges, where the scores' density falls roughly geometrically."""
    targets = np.asarray(targets, dtype=np.float64)
    # First point whose tail is at or below the target (tail is non-increasing).
    i = np.searchsorted(-tail, -targets, side="left")
    out = np.full(targets.shape, np.inf)
    at_zero = i == 0
    out[at_zero] = 0.0
    inside = (i > 0) & (i < len(points))
    j = i[inside]
    f0, f1, t = tail[j - 1], tail[j], targets[inside]
    frac = (f0 - t) / (f0 - f1)  # f0 > t >= f1, so f0 > f1
    x0, x1 = points[j - 1], points[j]
    first = j == 1
    below = np.where(first, x1, x0)  # any positive number where the first bin makes it unused
    out[inside] = np.where(first, x0 + frac * (x1 - x0), below * (x1 / below) ** frac)
    return out


# A target tail this close to 0 is 0 up to rounding (e.g. 19 patients at 95%: L (1 + 1/N) = 1).
TINY = 1e-9


def target_tail(level: float, total: float) -> float:
    """The tail fraction a level's quantile sits at: ``(1 - L) - L / N``, i.e. the empirical
    quantile at level ``L (1 + 1/N)``, split conformal's finite-sample correction for ``N``
    calibration patients. 0 (or below): too few patients for the level."""
    alpha = (1.0 - level) - level / total
    return 0.0 if alpha <= TINY else alpha


def quantiles(histogram: np.ndarray, edges, levels) -> np.ndarray:
    """[S, B] -> [S, len(levels)] the score quantile of each state at each level; +inf where
    the histogram cannot support the level (see :func:`quantile_note`)."""
    histogram = np.atleast_2d(np.asarray(histogram, dtype=np.float64))
    out = np.full((histogram.shape[0], len(levels)), np.inf)
    for s, row in enumerate(histogram):
        points, tail, total = tail_cdf(row, edges)
        for j, level in enumerate(levels):
            alpha = target_tail(level, total)
            if alpha > 0:
                out[s, j] = _inverse_tail(points, tail, np.array([alpha]))[0]
    return out


def quantile_note(histogram_row: np.ndarray, edges, level: float) -> str | None:
    """Why a state's quantile at ``level`` is infinite, in one phrase; None if it is finite."""
    points, tail, total = tail_cdf(histogram_row, edges)
    alpha = target_tail(level, total)
    if alpha <= 0:
        need = level / (1.0 - level)
        return (f"too few calibration patients ({total:.1f}) for a {percent(level)}% interval: "
                f"it needs more than {need:.0f}; the interval spans the spec's range")
    if tail[-1] > alpha:
        return (f"more than {100 * alpha:.1f}% of the scores lie above the last edge "
                f"({points[-1]:g}): the {percent(level)}% interval spans the spec's range; "
                "extend the calibration edges")
    return None


def sample_scores(histogram_row: np.ndarray, edges, rng: np.random.Generator, size) -> np.ndarray:
    """Draws of the normalised score |e| from one state's (noisy) histogram: inverse-CDF of the same
    monotone tail curve, linear in log-edge inside a bin; the open top bin [e_last, inf) drawn as
    e_last * (1 + Exponential(1)).

    One uniform per draw, from one ``rng.random(size)`` call, and each draw a function of its own
    uniform: a roll-forward hands in each patient's own uniforms (``twinfed.models.rollout``), so
    a patient's draws never depend on another's."""
    points, tail, _ = tail_cdf(histogram_row, edges)
    u = 1.0 - rng.random(size)  # in (0, 1]: a tail fraction
    out = _inverse_tail(points, tail, u)
    top = ~np.isfinite(out)  # u < tail[-1]: the draw lies above the last edge
    # The histogram says nothing about the shape above its last edge but how much mass lies
    # there. An exponential excess with the last edge as its scale is a tail heavier than the
    # bins below suggest (so propagated uncertainty errs wide), yet with a finite mean (2 e_last)
    # so averages over draws stay finite; with the default edges it is a rare draw. Given that it
    # is in the top bin, u / tail[-1] is uniform on (0, 1], so -log of it is Exponential(1): the
    # same uniform carries the excess.
    out[top] = points[-1] * (1.0 - np.log(u[top] / tail[-1]))
    return out


class CoverageCounter:
    """Coverage of intervals, accumulated over batches of windows: per patient, the number of
    windows, and per patient and step how many of them held the truth. Holds ``[n_patients,
    K, ...]`` counts, not the windows, so an evaluation of a large site streams."""

    def __init__(self, n_patients: int, shape: tuple[int, ...]):
        self.windows = np.zeros(n_patients)
        self.inside = np.zeros((n_patients, *shape))

    def add(self, inside: np.ndarray, patients: np.ndarray) -> None:
        """``inside`` [N, K, ...] (bool), ``patients`` [N] (indices below ``n_patients``)."""
        np.add.at(self.inside, patients, np.asarray(inside, dtype=np.float64))
        np.add.at(self.windows, patients, 1.0)

    def result(self) -> dict:
        """``patients``: each patient weighs 1 (the mean over patients of the fraction of their own
        (window, step) pairs covered), ``windows``: each window weighs 1; overall ([...]) and
        ``*_by_step`` ([K, ...]), with ``n_patients`` and ``n_windows``; None where nothing was
        counted."""
        seen = self.windows > 0
        if not seen.any():
            return {"patients": None, "windows": None, "patients_by_step": None,
                    "windows_by_step": None, "n_patients": 0, "n_windows": 0}
        n = self.windows[seen]
        inside = self.inside[seen]
        per_patient = inside / n.reshape(-1, *([1] * (inside.ndim - 1)))  # [P, K, ...]
        by_window = inside.sum(axis=0) / n.sum()  # [K, ...]
        return {"patients": per_patient.mean(axis=(0, 1)), "windows": by_window.mean(axis=0),
                "patients_by_step": per_patient.mean(axis=0), "windows_by_step": by_window,
                "n_patients": int(seen.sum()), "n_windows": int(n.sum())}


def coverage(inside: np.ndarray, patients: np.ndarray) -> dict:
    """The coverage of intervals over windows: ``inside`` [N, K] or [N, K, ...] (bool: the
    truth fell inside the interval), ``patients`` [N] (any integer labels). Patient-weighted
    (each patient's windows weigh 1 in total, as in the calibration) and plain per window,
    overall and by step; see :meth:`CoverageCounter.result`."""
    inside = np.asarray(inside, dtype=bool)
    labels, index = np.unique(np.asarray(patients), return_inverse=True)
    counter = CoverageCounter(len(labels), inside.shape[1:])
    counter.add(inside, index)
    return counter.result()
