"""The in-silico trial engine without Flower: the per-patient release vector and the means and
intervals summarised from it (checked against numpy on hand-made values), the roll-forward
against the twin's own forecast, who takes part and their usual care, and whole trials on a
tiny virtual cohort through untrained twins (whose directions hold by construction)."""

import math
from statistics import NormalDist

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from twinfed.models.arms import parse_design
from twinfed.models.calibration import IntervalCalibration, identify_patients
from twinfed.models.cohort import generate_cohort
from twinfed.models.conformal import n_bins, sample_scores
from twinfed.models.plan import CalibrationConfig, ModelConfig, TrainingPlan
from twinfed.models.rollout import Origins, Uncertainty, roll_forward
from twinfed.models.site_data import SiteData, load_site
from twinfed.models.spec import load_spec
from twinfed.models.surrogate import build_surrogate, get_weights
from twinfed.models.trial import contributions, layout, run_site_trial, sensitivity, summarise, trial_windows
from twinfed.models.twin import Twin
from twinfed.models.windows import Batch

SPEC = load_spec("glucose")
Z = NormalDist().inv_cdf(0.975)  # computed here, not read from the module under test
DAY = 1440 // SPEC.step_minutes
K = SPEC.horizon_steps


# Identification runs many small tensor operations: ~10x slower on two contended threads.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _design(arms: str, *, outcomes='["mean_glucose", "time_in_range"]', start_hours=36,
            duration_days=1, draws=4, reference="usual-care"):
    return parse_design(f"""
[trial]
name = "t"
purpose = "in-silico-trial"
reference = "{reference}"
start_hours = {start_hours}
duration_days = {duration_days}
outcomes = {outcomes}
draws = {draws}
seed = 7
{arms}
""", SPEC, source="arms.toml")


def _arms(*pairs: tuple[str, str]) -> str:
    return "".join(f'\n[[trial.arms]]\nname = "{n}"\nscenario = "{s}"\n' for n, s in pairs)


def _twin(kind: str) -> Twin:
    """An untrained twin: the engine's guarantees hold for any weights."""
    plan = TrainingPlan(spec=SPEC, rounds=1, model=ModelConfig(kind=kind))
    return Twin.from_weights(plan, get_weights(build_surrogate(SPEC, plan.model, seed=0)))


def _calibration() -> IntervalCalibration:
    """A hand-made histogram of 40 patients' normalised errors, falling off with the score and
    nothing in the open top bin (whatever the default edges)."""
    bins = n_bins(CalibrationConfig().edges)
    masses = np.append(0.7 ** np.arange(bins - 1), 0.0)
    masses = (40 * masses / masses.sum())[None]
    return IntervalCalibration.from_histogram(masses, SPEC, CalibrationConfig(), differential_privacy=False,
                                              noise_multiplier=None, sites=1, source="test")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("trial-engine") / "cohort"
    generate_cohort("glucose", sites=1, patients=4, days=3, seed=5, out=out)
    return load_site(out / "site-a", SPEC)


# -- the release vector and its summary ---------------------------------------------------------

THREE_ARMS = _design(_arms(("usual-care", "recorded"), ("more", "insulin_u*1.1"), ("less", "insulin_u*0.9")))
GLUCOSE, TIR = 0, 1  # outcome order in THREE_ARMS
BOUNDS = {GLUCOSE: (40.0, 400.0), TIR: (0.0, 100.0)}  # the built-ins' resolved bounds


def _paired_values(n=12, seed=0) -> np.ndarray:
    """``[n, 3, 2]`` inside the bounds: arms "more"/"less" are usual care plus a patient-level
    shift and a little noise, so the arms correlate strongly across patients."""
    rng = np.random.default_rng(seed)
    base = np.stack([rng.uniform(120, 280, n), rng.uniform(30, 70, n)], axis=-1)
    more = base + np.array([-15.0, 6.0]) + rng.normal(0, [4.0, 2.0], (n, 2))
    less = base + np.array([12.0, -5.0]) + rng.normal(0, [4.0, 2.0], (n, 2))
    return np.stack([base, more, less], axis=1)


def _mean_ci(x: np.ndarray) -> tuple[float, list[float]]:
    m, half = float(np.mean(x)), Z * float(np.std(x, ddof=1)) / math.sqrt(x.size)
    return m, [m - half, m + half]


def test_the_layout_is_each_arms_outcomes_then_each_contrast_then_a_count():
    names = layout(THREE_ARMS)
    assert len(names) == 3 * 2 * 2 + 2 * 2 * 2 + 1 == sensitivity(THREE_ARMS) ** 2
    assert names[0] == ("arm", "usual-care", "mean_glucose", "sum")
    assert names[12] == ("contrast", "more", "mean_glucose", "sum")
    assert not any(n[:2] == ("contrast", "usual-care") for n in names)
    assert names[-1] == ("count", "", "", "sum")


def test_an_exact_sum_gives_each_arms_mean_and_normal_interval_over_patients():
    values = _paired_values()
    report = summarise(contributions(values, THREE_ARMS).sum(0), THREE_ARMS, SPEC)
    assert report["n_patients"] == 12 and report["trial"] == "t"
    for a, arm in enumerate(["usual-care", "more", "less"]):
        for o, name in enumerate(["mean_glucose", "time_in_range"]):
            got = report["arms"][arm]["outcomes"][name]
            m, ci = _mean_ci(values[:, a, o])
            assert got["mean"] == pytest.approx(m, rel=1e-9)
            assert got["ci95"] == pytest.approx(ci, rel=1e-9)
            assert got["sd"] == pytest.approx(np.std(values[:, a, o], ddof=1), rel=1e-9)
    assert "differential-privacy" not in report["interval"]


def test_a_contrast_is_the_mean_paired_difference_with_an_interval_narrower_than_unpaired():
    values = _paired_values()
    report = summarise(contributions(values, THREE_ARMS).sum(0), THREE_ARMS, SPEC)
    assert set(report["contrasts"]) == {"more", "less"}
    for a, arm in [(1, "more"), (2, "less")]:
        for o, name in enumerate(["mean_glucose", "time_in_range"]):
            got = report["contrasts"][arm][name]
            d = values[:, a, o] - values[:, 0, o]
            m, ci = _mean_ci(d)
            assert got["mean"] == pytest.approx(m, rel=1e-9, abs=1e-9)
            assert got["ci95"] == pytest.approx(ci, rel=1e-9, abs=1e-9)
            # Pairing removes the patients' spread, which both arms share.
            unpaired = 2 * Z * math.sqrt((np.var(values[:, a, o], ddof=1) + np.var(values[:, 0, o], ddof=1))
                                         / d.size)
            assert got["ci95"][1] - got["ci95"][0] < unpaired / 3
    # The shifts built into the values show through: more insulin, lower glucose.
    more, less = (report["contrasts"][a]["mean_glucose"]["ci95"] for a in ("more", "less"))
    assert more[1] < 0 < less[0]


def test_values_outside_an_outcomes_bounds_and_differences_beyond_the_contrast_bound_are_clipped():
    values = _paired_values()
    values[0, 0, GLUCOSE] = 950.0  # above 400 mg/dL: counts as 400
    values[1, 0, GLUCOSE] = 5.0  # below 40: counts as 40
    values[2, 1, TIR] = 180.0  # a percent above 100: counts as 100
    values[3, 2, GLUCOSE] = values[3, 0, GLUCOSE] + 260.0  # a difference above 100: counts as 100
    report = summarise(contributions(values, THREE_ARMS).sum(0), THREE_ARMS, SPEC)
    for a, arm in enumerate(["usual-care", "more", "less"]):
        for o, name in enumerate(["mean_glucose", "time_in_range"]):
            m, ci = _mean_ci(np.clip(values[:, a, o], *BOUNDS[o]))
            assert report["arms"][arm]["outcomes"][name]["mean"] == pytest.approx(m, rel=1e-9)
            assert report["arms"][arm]["outcomes"][name]["ci95"] == pytest.approx(ci, rel=1e-9)
    for a, arm in [(1, "more"), (2, "less")]:
        for o, name in enumerate(["mean_glucose", "time_in_range"]):
            # the raw difference is clipped, not the difference of clipped values
            m, ci = _mean_ci(np.clip(values[:, a, o] - values[:, 0, o], -100.0, 100.0))
            assert report["contrasts"][arm][name]["mean"] == pytest.approx(m, rel=1e-9, abs=1e-9)
            assert report["contrasts"][arm][name]["ci95"] == pytest.approx(ci, rel=1e-9, abs=1e-9)
    unclipped = np.mean(values[:, 2, GLUCOSE] - values[:, 0, GLUCOSE])
    assert abs(report["contrasts"]["less"]["mean_glucose"]["mean"] - unclipped) > 10  # the clip mattered


def test_noise_on_the_sums_widens_each_interval_by_the_delta_method_term():
    values = _paired_values()
    total = contributions(values, THREE_ARMS).sum(0)
    v, n = 0.8, values.shape[0]
    noisy = summarise(total, THREE_ARMS, SPEC, noise_var=v)
    assert noisy["interval"].endswith("including the differential-privacy noise")

    def half(u: np.ndarray, scale: float) -> float:
        # u: the clipped, scaled values; Var(S/N) ~ Var(S)/n^2 + (S/n)^2 Var(N)/n^2
        m = u.mean()
        return Z * scale * math.sqrt(np.var(u, ddof=1) / n + v / n ** 2 + m * m * v / n ** 2)

    for a, arm in enumerate(["usual-care", "more", "less"]):
        for o, name in enumerate(["mean_glucose", "time_in_range"]):
            lo, hi = BOUNDS[o]
            u = (values[:, a, o] - lo) / (hi - lo)
            got = noisy["arms"][arm]["outcomes"][name]
            assert got["mean"] == pytest.approx(values[:, a, o].mean(), rel=1e-9)
            assert (got["ci95"][1] - got["ci95"][0]) / 2 == pytest.approx(half(u, hi - lo), rel=1e-9)
    for a, arm in [(1, "more"), (2, "less")]:
        for o, name in enumerate(["mean_glucose", "time_in_range"]):
            u = (values[:, a, o] - values[:, 0, o]) / 100.0
            got = noisy["contrasts"][arm][name]
            assert (got["ci95"][1] - got["ci95"][0]) / 2 == pytest.approx(half(u, 100.0), rel=1e-9)


def test_noise_on_the_squares_alone_leaves_every_interval_as_exact():
    values = _paired_values()
    total = contributions(values, THREE_ARMS).sum(0)
    squares = np.array([n[3] == "square" for n in layout(THREE_ARMS)], dtype=np.float64)
    exact = summarise(total, THREE_ARMS, SPEC)
    noisy = summarise(total, THREE_ARMS, SPEC, noise_var=2.0 * squares)
    assert noisy["arms"] == exact["arms"] and noisy["contrasts"] == exact["contrasts"]


# Any float an outcome could be, however far outside its bounds, for 1-6 patients.
_values = st.integers(1, 6).flatmap(lambda p: hnp.arrays(
    np.float64, (p, 3, 2), elements=st.one_of(
        st.floats(-1e308, 1e308, allow_nan=False, allow_infinity=False),
        st.floats(-500, 500), st.sampled_from([0.0, 40.0, 100.0, 400.0, -100.0, 1e-300]))))


@settings(max_examples=200, deadline=None)
@given(values=_values)
def test_no_patients_contribution_exceeds_the_sensitivity_in_l2(values):
    rows = contributions(values, THREE_ARMS)
    assert rows.shape == (values.shape[0], len(layout(THREE_ARMS)))
    assert np.isfinite(rows).all()
    assert (np.linalg.norm(rows, axis=1) <= sensitivity(THREE_ARMS) * (1 + 1e-12)).all()
    assert (np.abs(rows) <= 1.0).all() and (rows[:, -1] == 1.0).all()


# -- the roll-forward ----------------------------------------------------------------------------

T = 2 * K + 6  # two whole horizons and part of a third


@pytest.fixture(scope="module")
def origin(cohort):
    """Every cohort patient at hour 36, their recorded controls after it, and a hybrid twin's
    identification there."""
    patients = np.arange(cohort.n_patients)
    rows = cohort.offsets[patients] + 36 * 60 // SPEC.step_minutes - 1
    usual = np.stack([cohort.series[r + 1:r + 1 + T, len(SPEC.states):] for r in rows])
    hybrid = _twin("hybrid")
    offset = identify_patients(hybrid, cohort, patients, cohort.steps[rows]).offset
    return Origins.at(cohort, patients, rows), usual, hybrid, offset


def _planned(usual: np.ndarray) -> np.ndarray:
    planned = usual.copy()
    planned[..., 0] *= 0.4
    planned[:, 3, 1] += 45.0  # a snack in the first horizon
    return planned


def _uncertainty(n: int, calls: list | None = None) -> Uncertainty:
    hist = np.asarray(_calibration().states["glucose_mgdl"].histogram)
    edges = CalibrationConfig().edges

    def sample(j, rng, size):
        out = sample_scores(hist, edges, rng, size)
        if calls is not None:
            calls.append(out.copy())
        return out

    return Uncertainty(np.full((n, K, 1), 3.0), sample)


@pytest.mark.parametrize("kind", ["hybrid", "mlp-residual"])
def test_without_uncertainty_the_first_horizon_is_the_twins_forecast_of_the_origin_window(origin, kind):
    origins, usual, hybrid, offset = origin
    twin = hybrid if kind == "hybrid" else _twin(kind)
    offset = offset if kind == "hybrid" else None
    if offset is not None:
        assert offset.abs().sum() > 0  # a real identification, not a zero offset
    planned = _planned(usual)
    rolled = roll_forward(twin, origins, planned, usual=usual, offset=offset, draws=3)
    assert rolled.shape == (len(origins), 3, T, 1)
    batch = Batch(history=origins.history, future_controls=planned[:, :K],
                  future_states=np.zeros((len(origins), K, 1), np.float32), covariates=origins.covariates,
                  context=origins.context, context_mask=origins.context_mask)
    forecast = twin.forecast(batch, offset=offset)
    np.testing.assert_allclose(rolled[:, 0, :K], forecast, rtol=1e-5, atol=1e-3)
    assert (rolled == rolled[:, :1]).all()  # no uncertainty: every draw is the expected path


def test_draws_differ_only_with_uncertainty_and_a_seed_repeats_them(origin):
    origins, usual, hybrid, offset = origin
    unc = _uncertainty(len(origins))
    plain = roll_forward(hybrid, origins, usual, offset=offset, draws=4, seed=3)
    drawn = roll_forward(hybrid, origins, usual, offset=offset, uncertainty=unc, draws=4, seed=3)
    again = roll_forward(hybrid, origins, usual, offset=offset, uncertainty=unc, draws=4, seed=3)
    other = roll_forward(hybrid, origins, usual, offset=offset, uncertainty=unc, draws=4, seed=4)
    assert (plain == plain[:, :1]).all()
    assert not np.allclose(drawn[:, 0], drawn[:, 1])
    assert np.array_equal(drawn, again) and not np.allclose(drawn, other)


@pytest.mark.parametrize("kind", ["hybrid", "mlp-residual"])
def test_the_same_seed_draws_the_same_errors_whatever_the_controls(origin, kind):
    origins, usual, hybrid, offset = origin
    twin = hybrid if kind == "hybrid" else _twin(kind)
    offset = offset if kind == "hybrid" else None
    planned = _planned(usual)
    usual_calls, planned_calls = [], []
    kw = dict(usual=usual, offset=offset, draws=4, seed=11)
    expected = {"usual": roll_forward(twin, origins, usual, **kw),
                "planned": roll_forward(twin, origins, planned, **kw)}
    n = len(origins)
    drawn = {"usual": roll_forward(twin, origins, usual, uncertainty=_uncertainty(n, usual_calls), **kw),
             "planned": roll_forward(twin, origins, planned, uncertainty=_uncertainty(n, planned_calls), **kw)}
    assert len(usual_calls) == 3 and all(np.array_equal(a, b) for a, b in zip(usual_calls, planned_calls))
    # The first horizon's forecast reads no earlier error: what was added is the drawn error,
    # the same under both treatments (common random numbers).
    # (An untrained twin's paths can run into the spec's range, where the clip hides the error.)
    first = [path[:, :, :K] for path in (*expected.values(), *drawn.values())]
    g = SPEC.states[0]
    inside = np.logical_and.reduce([(x > g.min) & (x < g.max) for x in first])
    assert inside.mean() > 0.5
    err_usual = (drawn["usual"][:, :, :K] - expected["usual"][:, :, :K])[inside]
    err_planned = (drawn["planned"][:, :, :K] - expected["planned"][:, :, :K])[inside]
    assert np.abs(err_usual).max() > 0.5
    np.testing.assert_allclose(err_usual, err_planned, atol=1e-3)


def test_several_treatments_in_one_pass_are_each_as_if_rolled_alone_with_the_same_draws(origin):
    origins, usual, hybrid, offset = origin
    both = np.stack([usual, _planned(usual)])
    unc = _uncertainty(len(origins))
    together = roll_forward(hybrid, origins, both, usual=usual, offset=offset, uncertainty=unc, draws=3, seed=5)
    assert together.shape == (2, len(origins), 3, T, 1)
    for a in range(2):
        alone = roll_forward(hybrid, origins, both[a], usual=usual, offset=offset, uncertainty=unc, draws=3, seed=5)
        np.testing.assert_allclose(together[a], alone, rtol=1e-5, atol=1e-3)


# -- who takes part, and their usual care ----------------------------------------------------------

def _site(steps_per_patient: list[np.ndarray], seed=0) -> SiteData:
    """A hand-built site: each patient's recorded steps, with distinct controls at every step."""
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum([s.size for s in steps_per_patient])]).astype(np.int64)
    n = int(offsets[-1])
    series = np.stack([rng.uniform(80, 200, n), rng.uniform(0, 2, n), rng.uniform(0, 50, n)], axis=1)
    return SiteData(spec=SPEC, patient_ids=[f"p{i}" for i in range(len(steps_per_patient))],
                    series=series.astype(np.float32), steps=np.concatenate(steps_per_patient).astype(np.int32),
                    offsets=offsets, covariates=np.full((len(steps_per_patient), 2), 50.0, np.float32))


def test_patients_without_history_before_the_start_or_a_day_after_it_are_excluded_and_counted():
    design = _design(_arms(("usual-care", "recorded"), ("b", "insulin_u*0.5")), start_hours=2, duration_days=2)
    start = 2 * 60 // SPEC.step_minutes
    assert start == SPEC.history_steps  # the start leaves exactly one history before it
    full = np.arange(start + 2 * DAY)
    site = _site([
        full,  # takes part
        np.arange(start + DAY - 1),  # the record ends a step short of a day after the start
        np.delete(full, 10),  # a step missing from the history before the start
        full + 500,  # a record starting later: the start counts from the patient's first row
        np.delete(full, start + DAY + 5),  # a gap after the first day: one day, repeated
    ])
    win = trial_windows(site, design)
    assert win.patients.tolist() == [0, 3, 4] and win.n_excluded == 2
    assert win.origins.tolist() == [site.offsets[p] + start - 1 for p in (0, 3, 4)]
    assert win.usual.shape == (3, 2 * DAY, 2) and win.before.shape == (3, DAY, 2)
    only_two = trial_windows(site, design, patients=np.array([1, 3]))
    assert only_two.patients.tolist() == [3] and only_two.n_excluded == 1


def test_a_record_shorter_than_the_trial_is_repeated_by_whole_days_from_the_start():
    design = _design(_arms(("usual-care", "recorded"), ("b", "insulin_u*0.5")), start_hours=2, duration_days=3)
    start = SPEC.history_steps
    site = _site([np.arange(start + 2 * DAY - 7), np.arange(start + 3 * DAY)], seed=1)
    win = trial_windows(site, design)
    assert win.patients.tolist() == [0, 1]
    recorded = site.series[:, len(SPEC.states):]
    short, whole = win.usual
    # 2 days less 7 steps after the start: its first whole day, three times over
    assert np.array_equal(short[:DAY], recorded[start:start + DAY])
    assert np.array_equal(short[:DAY], short[DAY:2 * DAY]) and np.array_equal(short[:DAY], short[2 * DAY:])
    assert not np.array_equal(short[DAY:2 * DAY], recorded[start + DAY:start + 2 * DAY])
    lo = site.offsets[1]
    assert np.array_equal(whole, recorded[lo + start:lo + start + 3 * DAY])  # long enough: as recorded


# -- whole trials on a tiny cohort --------------------------------------------------------------------

ARMS = _design(_arms(("usual-care", "recorded"), ("again", "recorded"), ("no-insulin", "insulin_u*0"),
                     ("snack", "carbs_g+60@60")), outcomes='["mean_glucose", "time_in_range", "time_below_70"]')


@pytest.fixture(scope="module")
def trials(cohort, origin):
    hybrid = origin[2]
    return {"plain": run_site_trial(hybrid, cohort, ARMS),
            "drawn": run_site_trial(hybrid, cohort, ARMS, calibration=_calibration())}


@pytest.mark.parametrize("which", ["plain", "drawn"])
def test_two_identical_arms_differ_by_exactly_zero_with_a_zero_width_interval(trials, which):
    outcomes = trials[which]
    assert outcomes.n_patients == 4 and outcomes.n_excluded == 0
    assert outcomes.uncertainty == (which == "drawn")
    report = summarise(contributions(outcomes.values, ARMS).sum(0), ARMS, SPEC)
    for name in ("mean_glucose", "time_in_range", "time_below_70"):
        assert report["contrasts"]["again"][name] == {"mean": 0.0, "ci95": [0.0, 0.0], "sd": 0.0}
    assert np.array_equal(outcomes.values[:, 0], outcomes.values[:, 1])


def test_drawn_errors_move_the_patients_outcomes(trials):
    assert not np.allclose(trials["plain"].values[:, 0], trials["drawn"].values[:, 0])


def test_removing_insulin_or_adding_a_meal_raises_every_patients_mean_glucose(trials):
    glucose = trials["plain"].values[:, :, 0]
    assert (glucose[:, 2] > glucose[:, 0]).all()
    assert (glucose[:, 3] > glucose[:, 0]).all()


def test_a_trial_whose_start_leaves_no_record_after_it_excludes_everyone(cohort, origin):
    late = _design(_arms(("usual-care", "recorded"), ("b", "insulin_u*0.5")), start_hours=60, duration_days=1)
    outcomes = run_site_trial(origin[2], cohort, late)
    assert outcomes.n_patients == 0 and outcomes.n_excluded == 4
    assert outcomes.values.shape == (0, 2, 2)


def test_a_hybrids_correction_reads_the_reference_arms_path_so_arms_differ_only_through_the_core(origin):
    """The bounded correction is no treatment effect: in a trial it reads the reference arm's
    rolled-forward readings (and the usual treatment), so every arm of a patient gets the same
    correction at every horizon and the arms differ only through the core."""
    origins, usual, hybrid, offset = origin
    planned = _planned(usual)
    seen = []
    corrections = hybrid.surrogate.corrections

    def spy(u):
        seen.append(u["states"].clone())
        return corrections(u)

    hybrid.surrogate.corrections = spy
    try:
        rolled = roll_forward(hybrid, origins, np.stack([usual, planned]), usual=usual, offset=offset,
                              reference=0)
    finally:
        del hybrid.surrogate.corrections
    assert not np.allclose(rolled[0], rolled[1])  # the arms differ (through the core)
    s, h = rolled.shape[-1], SPEC.history_steps
    for j, states in enumerate(seen):  # the horizon starting at step j * K
        ref = np.concatenate([origins.history[:, :, :s], rolled[0, :, 0, :j * K]], axis=1)[:, -h:]
        assert states.shape[0] == len(origins)  # one correction per patient, read by every arm
        np.testing.assert_array_equal(states.numpy(), ref)
