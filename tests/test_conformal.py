"""Split conformal maths from a patient-weighted histogram: quantiles, repairs, draws, coverage."""

import math

import numpy as np
import pytest

from twinfed.models.conformal import (coverage, patient_histogram, quantile_note, quantiles,
                                      sample_scores, tail_cdf)

EDGES = (0.5, 1.0, 2.0, 4.0, 8.0)


def _corrected_tail(level: float, n: float) -> float:
    """Split conformal's finite-sample correction, written as the level it asks of the
    empirical distribution: L (1 + 1/N), whose upper tail is what the quantile sits at."""
    return 1.0 - level * (1.0 + 1.0 / n)


def test_the_quantile_is_the_edge_above_which_the_corrected_tail_mass_lies():
    n, level = 200.0, 0.95
    above_2 = _corrected_tail(level, n) * n  # mass at or above the edge 2.0
    hist = np.array([[100.0, 60.0, n - 160.0 - above_2, above_2 - 4.0, 4.0, 0.0]])
    assert hist.sum() == pytest.approx(n)
    assert quantiles(hist, EDGES, (level,))[0, 0] == pytest.approx(2.0)


def test_between_edges_the_quantile_is_interpolated_in_log_score():
    n = 100.0
    # tail fractions: 1 at 0, 0.5 at 0.5, 0.3 at 1, 0.1 at 2, 0 beyond 4
    hist = np.array([[50.0, 20.0, 20.0, 10.0, 0.0, 0.0]])
    target = _corrected_tail(0.8, n)
    frac = (0.3 - target) / (0.3 - 0.1)
    expected = math.exp(math.log(1.0) + frac * (math.log(2.0) - math.log(1.0)))
    assert quantiles(hist, EDGES, (0.8,))[0, 0] == pytest.approx(expected)
    # below the first edge: linear in the score itself, from 0
    target = _corrected_tail(0.3, n)
    assert quantiles(hist, EDGES, (0.3,))[0, 0] == pytest.approx(0.5 * (1.0 - target) / (1.0 - 0.5))


def test_a_noisy_tail_is_made_non_increasing_from_the_top_and_clipped():
    # raw tails from each bin: 100, 50, 20, 23, 13, -2: the -3 bin makes the tail rise at 2.0,
    # and the negative top bin makes it negative
    hist = np.array([50.0, 30.0, -3.0, 10.0, 15.0, -2.0])
    points, tail, total = tail_cdf(hist, EDGES)
    assert total == pytest.approx(100.0)
    assert list(points) == [0.0, *EDGES]
    assert tail == pytest.approx([1.0, 0.5, 0.23, 0.23, 0.13, 0.0])
    # the quantile reads the repaired curve: 0.23 at 1.0 and 2.0, so a target of 0.2 falls
    # between 2.0 and 4.0, never below the rise the noise made
    target = _corrected_tail(0.79, total)
    frac = (0.23 - target) / (0.23 - 0.13)
    assert quantiles(hist[None], EDGES, (0.79,))[0, 0] == pytest.approx(2.0 * 2.0 ** frac)


def test_a_near_empty_noisy_histogram_divides_by_at_least_one():
    _, tail, total = tail_cdf(np.array([0.2, -0.5, 0.1, 0.0, 0.0, 0.0]), EDGES)
    assert total == 1.0 and (tail >= 0).all() and (np.diff(tail) <= 0).all()


@pytest.mark.parametrize("n", [5.0, 19.0])
def test_too_few_patients_give_an_infinite_quantile_and_say_so(n):
    hist = np.array([[n * 0.9, n * 0.1, 0.0, 0.0, 0.0, 0.0]])
    assert quantiles(hist, EDGES, (0.95,))[0, 0] == math.inf
    assert "too few calibration patients" in quantile_note(hist[0], EDGES, 0.95)
    assert quantile_note(hist[0], EDGES, 0.5) is None


def test_more_mass_beyond_the_last_edge_than_the_target_gives_infinity_and_asks_for_longer_edges():
    hist = np.array([[80.0, 5.0, 5.0, 0.0, 0.0, 10.0]])
    q80, q95 = quantiles(hist, EDGES, (0.8, 0.95))[0]
    assert math.isfinite(q80) and q95 == math.inf
    assert "extend the calibration edges" in quantile_note(hist[0], EDGES, 0.95)


def test_a_patient_with_100_windows_weighs_as_much_as_a_patient_with_one():
    k = 3
    scores = np.concatenate([np.full((100, k, 2), 0.1), np.full((1, k, 2), 5.0)])
    patients = np.array([0] * 100 + [1])
    hist = patient_histogram(scores, patients, 3, EDGES)
    assert hist.shape == (2, len(EDGES) + 1)
    assert hist[:, 0] == pytest.approx([1.0, 1.0]) and hist[:, -2] == pytest.approx([1.0, 1.0])
    assert hist.sum(axis=1) == pytest.approx([2.0, 2.0])  # patient 2 had no window: no mass


def test_a_patients_mass_is_spread_over_their_finite_scores_of_each_state():
    scores = np.array([[[0.1, np.nan], [3.0, 0.7]], [[0.2, np.nan], [0.3, np.nan]]])  # [2, K=2, S=2]
    hist = patient_histogram(scores, np.array([0, 0]), 1, EDGES)
    assert hist[0] == pytest.approx([0.75, 0.0, 0.0, 0.25, 0.0, 0.0])
    assert hist[1] == pytest.approx([0.0, 1.0, 0.0, 0.0, 0.0, 0.0])  # its one finite score


def test_draws_reproduce_the_histograms_probabilities_and_its_shape_inside_a_bin():
    hist = np.array([20.0, 30.0, 25.0, 15.0, 7.0, 3.0])
    size = 200_000
    draws = sample_scores(hist, EDGES, np.random.default_rng(7), size)
    freq = np.bincount(np.searchsorted(EDGES, draws, side="right"), minlength=6) / size
    p = hist / hist.sum()
    assert np.abs(freq - p).max() < 4 * np.sqrt(p * (1 - p) / size).max()  # 4 sigma of a binomial
    in_bin = draws[(draws >= 1.0) & (draws < 2.0)]
    assert np.median(in_bin) == pytest.approx(math.sqrt(2.0), rel=0.01)  # linear in log score
    top = draws[draws >= 8.0]
    assert top.mean() == pytest.approx(16.0, rel=0.05)  # 8 (1 + Exponential(1))


def test_draws_and_quantiles_read_the_same_repaired_curve():
    hist = np.array([50.0, 30.0, -3.0, 10.0, 15.0, -2.0])
    q = quantiles(hist[None], EDGES, (0.79,))[0, 0]
    draws = sample_scores(hist, EDGES, np.random.default_rng(3), 100_000)
    _, _, total = tail_cdf(hist, EDGES)
    assert (draws >= q).mean() == pytest.approx(_corrected_tail(0.79, total), abs=0.005)


def test_coverage_is_reported_per_patient_and_per_window():
    # patient 7: three windows, always inside; patient 9: one window, inside at the first step only
    inside = np.array([[True, True]] * 3 + [[True, False]])
    result = coverage(inside, np.array([7, 7, 7, 9]))
    assert result["patients"] == pytest.approx(0.75)  # (1 + 0.5) / 2
    assert result["windows"] == pytest.approx(7 / 8)
    assert result["patients_by_step"] == pytest.approx([1.0, 0.5])
    assert result["windows_by_step"] == pytest.approx([1.0, 0.75])
    assert (result["n_patients"], result["n_windows"]) == (2, 4)


def test_coverage_of_nothing_is_none():
    assert coverage(np.zeros((0, 3), bool), np.zeros(0, int))["patients"] is None
