"""A release is per patient: what one patient contributes to a trial's or a calibration's release
depends on that patient's record and the release's seed only, never on who else is at the site,
in what order, or how the work is chunked.

The privacy of a release rests on it (DESIGN.md section 4): the Gaussian noise is scaled to what
adding or removing ONE patient can change. If the windows a patient is identified on, or the
errors drawn into their roll-forward, came from one generator shared by the site, removing one
patient would redraw everyone else's, and the release would move by far more than the stated
sensitivity. Here every such draw comes from a generator keyed by the seed and the patient.

Where it is exact: every per-patient figure below is compared bit for bit. Sums over patients are
compared to the sum of the parts up to float64 rounding of the sum itself (1e-9: the parts are
in [-1, 1] and a site here holds a handful of patients).

Speed: a hybrid twin's identification costs seconds whatever the number of patients (50 Adam
steps of many small tensor operations), so the properties are searched (hypothesis) with the
residual MLP twin, whose identification is only the choice of windows, and checked on the hybrid
twin on a few fixed sites.
"""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from builders import one_site_cohort, trial_design
from twinfed.models.calibration import (IntervalCalibration, calibration_histogram, calibration_parts,
                                        identify_patients)
from twinfed.models.conformal import n_bins
from twinfed.models.plan import CalibrationConfig, ModelConfig, TrainingPlan
from twinfed.models.rollout import Origins, Uncertainty, roll_forward
from twinfed.models.spec import load_spec
from twinfed.models.surrogate import build_surrogate, get_weights
from twinfed.models.trial import contributions, run_site_trial, sensitivity, trial_windows
from twinfed.models.twin import Twin
from twinfed.privacy.release import histogram_sensitivity

SPEC = load_spec("glucose")
K = SPEC.horizon_steps
N = 7  # the cohort's patients; sites below are subsets of them
SUM_TOL = 1e-9
# Hypothesis: few examples, each a few trials or calibrations on a handful of patients.
FEW = settings(max_examples=12, deadline=None, phases=(Phase.explicit, Phase.reuse, Phase.generate),
               suppress_health_check=[HealthCheck.function_scoped_fixture])

DESIGN = trial_design("per-patient", {"usual-care": "recorded", "less-insulin": "insulin_u*0.7"}, SPEC,
                      start_hours=36, duration_days=1, outcomes=["mean_glucose", "time_in_range"], draws=3, seed=7)
# Identified on the first 24 h, scored on the rest of the 3 days.
CONFIG = CalibrationConfig(identify_hours=24.0)


# Identification runs many small tensor operations: ~10x slower on two contended threads.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _twin(kind: str) -> Twin:
    plan = TrainingPlan(spec=SPEC, rounds=1, model=ModelConfig(kind=kind))
    return Twin.from_weights(plan, get_weights(build_surrogate(SPEC, plan.model, seed=0)))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return one_site_cohort(tmp_path_factory.mktemp("per-patient") / "cohort", patients=N, days=3, seed=11)


@pytest.fixture(scope="module")
def hybrid():
    """A hybrid twin 8 wide (as small as a study's), its weights away from their initialisation:
    one whose batched matrix products round a row by where it lies in memory, so a patient's
    forecast changes in the last bits when another patient joins their batch."""
    plan = TrainingPlan(spec=SPEC, rounds=1, model=ModelConfig(kind="hybrid", hidden=8, layers=1))
    rng = np.random.default_rng(0)
    weights = [w + rng.normal(0, 0.3, w.shape).astype(w.dtype)
               for w in get_weights(build_surrogate(SPEC, plan.model, seed=0))]
    return Twin.from_weights(plan, weights)


@pytest.fixture(scope="module")
def mlp():
    return _twin("mlp-residual")


@pytest.fixture(scope="module")
def calibration():
    """40 patients' errors, falling off with the score: the trial draws errors from it."""
    bins = n_bins(CalibrationConfig().edges)
    masses = np.append(0.7 ** np.arange(bins - 1), 0.0)
    return IntervalCalibration.from_histogram((40 * masses / masses.sum())[None], SPEC, CalibrationConfig(),
                                              differential_privacy=False, noise_multiplier=None, sites=1,
                                              source="test")


def _trial(twin, site, patients, calibration, **kw) -> dict[int, np.ndarray]:
    """Each taking part patient's (site index) trial values ``[A, O]``."""
    patients = np.asarray(patients, dtype=np.int64)
    out = run_site_trial(twin, site, DESIGN, calibration=calibration, patients=patients, **kw)
    eligible = trial_windows(site, DESIGN, patients=patients).patients
    assert out.n_excluded == patients.size - eligible.size and out.n_patients == eligible.size
    return dict(zip(eligible.tolist(), out.values))


def _release(values: dict[int, np.ndarray]) -> np.ndarray:
    if not values:
        return np.zeros(contributions(np.zeros((0, 2, 2)), DESIGN).shape[1])
    return contributions(np.stack(list(values.values())), DESIGN).sum(axis=0)


def _assert_same_patients(a: dict[int, np.ndarray], b: dict[int, np.ndarray], who) -> None:
    for p in who:
        assert np.array_equal(a[p], b[p]), f"patient {p} moved by {np.abs(a[p] - b[p]).max()}"


def test_every_cohort_patient_takes_part(site):
    assert trial_windows(site, DESIGN).patients.tolist() == list(range(N))


# -- the trial ------------------------------------------------------------------------------------

def _check_trial_removal(twin, site, calibration, members, gone) -> None:
    rest = [p for p in members if p != gone]
    full = _trial(twin, site, members, calibration)
    without = _trial(twin, site, rest, calibration)
    _assert_same_patients(full, without, rest)
    # So the release moves by exactly the removed patient's contribution, within the sensitivity.
    own = contributions(full[gone][None], DESIGN)[0]
    change = _release(full) - _release(without)
    np.testing.assert_allclose(change, own, rtol=0, atol=SUM_TOL)
    assert np.linalg.norm(change) <= sensitivity(DESIGN) + SUM_TOL


@FEW
@given(data=st.data())
def test_removing_one_patient_leaves_every_other_patients_trial_values_bit_identical(site, mlp, calibration,
                                                                                     data):
    members = sorted(data.draw(st.sets(st.integers(0, N - 1), min_size=2, max_size=N), label="site"))
    gone = data.draw(st.sampled_from(members), label="removed")
    _check_trial_removal(mlp, site, calibration, members, gone)


def test_removing_one_patient_from_a_hybrid_twins_trial_leaves_the_others_bit_identical(site, hybrid,
                                                                                        calibration):
    _check_trial_removal(hybrid, site, calibration, list(range(N)), 2)


def test_a_patients_trial_values_are_what_they_would_be_alone(site, mlp, calibration):
    together = _trial(mlp, site, range(N), calibration)
    for p in range(N):
        _assert_same_patients(together, _trial(mlp, site, [p], calibration), [p])


@pytest.mark.parametrize("kind", ["mlp-residual", "hybrid"])
def test_trial_values_do_not_depend_on_the_patients_order_or_the_roll_forward_chunks(site, calibration, kind,
                                                                                     hybrid, mlp):
    twin = hybrid if kind == "hybrid" else mlp
    base = _trial(twin, site, range(N), calibration)
    shuffled = _trial(twin, site, np.random.default_rng(1).permutation(N), calibration, chunk_patients=3)
    _assert_same_patients(base, shuffled, range(N))
    if kind != "hybrid":  # the hybrid's identification is the slow part; the chunks are the roll's
        chunked = _trial(twin, site, range(N), calibration, chunk_patients=1)
        _assert_same_patients(base, chunked, range(N))


def test_the_seed_shapes_the_draws_and_can_be_a_128_bit_secret(site, mlp, calibration):
    a = _trial(mlp, site, range(3), calibration, seed=2**127 + 12345)
    b = _trial(mlp, site, range(3), calibration, seed=2**127 + 12345)
    c = _trial(mlp, site, range(3), calibration, seed=2**127 + 12346)
    _assert_same_patients(a, b, range(3))
    assert all(not np.array_equal(a[p], c[p]) for p in range(3))
    for bad in (2**128, -1):
        with pytest.raises(ValueError):
            run_site_trial(mlp, site, DESIGN, calibration=calibration, patients=np.arange(2), seed=bad)


@pytest.mark.parametrize("kind", ["mlp-residual", "hybrid"])
def test_a_patients_drawn_errors_do_not_depend_on_who_is_rolled_forward_with_them(site, calibration, kind,
                                                                                  hybrid, mlp):
    """The roll-forward alone: patient 2's paths with three others, and alone."""
    from twinfed.models import conformal

    twin = hybrid if kind == "hybrid" else mlp
    h = 36 * 60 // SPEC.step_minutes
    rows = site.offsets[:N] + h - 1
    usual = np.stack([site.series[r + 1:r + 1 + 3 * K, len(SPEC.states):] for r in rows])
    hist = np.asarray(calibration.states["glucose_mgdl"].histogram)

    def roll(patients):
        unc = Uncertainty(np.full((len(patients), K, 1), 3.0),
                          lambda j, rng, size: conformal.sample_scores(hist, calibration.edges, rng, size))
        return roll_forward(twin, Origins.at(site, patients, rows[patients]), usual[patients],
                            uncertainty=unc, draws=4, seed=5)

    together = roll(np.array([0, 1, 2, 3]))
    alone = roll(np.array([2]))
    assert not np.allclose(together[2, 0], together[2, 1])  # errors were drawn
    assert np.array_equal(together[2], alone[0])


def test_a_patients_roll_forward_rounds_the_same_in_any_batch(site, hybrid):
    """41 patients (the cohort's, repeated) under two treatments, and the same less the first:
    every other path bit-identical (in one batch, the encoder's and the correction's matrix
    products rounded each row by its place in memory: paths moved by 2e-4 mg/dL)."""
    rows = site.offsets[:N] + 36 * 60 // SPEC.step_minutes - 1
    usual = np.stack([site.series[r + 1:r + 1 + 6 * K, len(SPEC.states):] for r in rows])
    many = np.arange(41) % N

    def roll(patients):
        plans = np.stack([usual[patients], usual[patients] * 0.7])
        return roll_forward(hybrid, Origins.at(site, patients, rows[patients]), plans, usual=usual[patients],
                            draws=8)

    assert np.array_equal(roll(many)[:, 1:], roll(many[1:]))


# -- identification ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["mlp-residual", "hybrid"])
def test_a_patients_identification_does_not_depend_on_the_other_patients(site, kind, hybrid, mlp):
    twin = hybrid if kind == "hybrid" else mlp
    until = site.steps[site.offsets[:N]] + 30 * 60 // SPEC.step_minutes  # more windows than a fit reads
    together = identify_patients(twin, site, np.arange(N), until)
    assert (together.n_windows == 48).all()
    for order in ([3], [6, 3, 0]) if kind != "hybrid" else ([6, 3, 0],):  # fewer patients, another order
        alone = identify_patients(twin, site, np.array(order), until[order])
        i = order.index(3)
        assert np.array_equal(alone.starts[alone.owner == i], together.starts[together.owner == 3])
        assert torch.equal(alone.offset[i], together.offset[3])


# -- the calibration histogram ---------------------------------------------------------------------

def _histogram(twin, site, patients, seed=0) -> np.ndarray:
    histogram, _ = calibration_histogram(twin, site, np.asarray(patients, dtype=np.int64), CONFIG, seed=seed)
    return histogram


def _parts(twin, site, patients, seed=0) -> dict[int, np.ndarray]:
    patients = np.asarray(patients, dtype=np.int64)
    return dict(zip(patients.tolist(), calibration_parts(twin, site, patients, CONFIG, seed=seed)))


@pytest.fixture(scope="module")
def parts(site, mlp):
    """Each patient's calibration histogram alone (residual MLP twin): ``[N, S, B]``."""
    return np.stack([_histogram(mlp, site, [p]) for p in range(N)])


def test_each_calibration_patient_puts_one_unit_of_mass_per_state(parts):
    np.testing.assert_allclose(parts.sum(axis=-1), 1.0, rtol=0, atol=1e-12)


def _check_calibration_removal(twin, site, members, gone) -> None:
    rest = [p for p in members if p != gone]
    full, without = _parts(twin, site, members), _parts(twin, site, rest)
    _assert_same_patients(full, without, rest)
    change = sum(full.values()) - sum(without.values())  # calibration_histogram's sum (tested below)
    np.testing.assert_allclose(change, full[gone], rtol=0, atol=SUM_TOL)
    assert np.linalg.norm(change) <= histogram_sensitivity(len(SPEC.states)) + SUM_TOL


@FEW
@given(data=st.data())
def test_removing_one_calibration_patient_moves_the_histogram_by_their_own_part_only(site, mlp, parts, data):
    members = sorted(data.draw(st.sets(st.integers(0, N - 1), min_size=2, max_size=N), label="site"))
    gone = data.draw(st.sampled_from(members), label="removed")
    _check_calibration_removal(mlp, site, members, gone)
    # Each part is what that patient alone gives, and the histogram released is their sum.
    _assert_same_patients(_parts(mlp, site, members), dict(enumerate(parts)), members)
    full, without = (_histogram(mlp, site, m) for m in (members, [p for p in members if p != gone]))
    np.testing.assert_allclose(full, parts[members].sum(axis=0), rtol=0, atol=SUM_TOL)
    np.testing.assert_allclose(full - without, parts[gone], rtol=0, atol=SUM_TOL)


def test_removing_one_patient_from_a_hybrid_twins_calibration_leaves_the_others_parts_bit_identical(site, hybrid):
    _check_calibration_removal(hybrid, site, list(range(N)), 4)


def test_the_calibration_does_not_depend_on_the_patients_order(site, mlp, parts):
    order = np.random.default_rng(2).permutation(N)
    _assert_same_patients(_parts(mlp, site, order), dict(enumerate(parts)), range(N))
    np.testing.assert_allclose(_histogram(mlp, site, order), parts.sum(axis=0), rtol=0, atol=SUM_TOL)


# -- a node's release -------------------------------------------------------------------------------

def _node_sum(kind, plan, site, patients, weights):
    """``kind``'s computation at a node on ``patients`` of ``site`` (a plan without DP: nothing
    charged, nothing noised): the sum as sent (unscaled), patients used, patients excluded."""
    from twinfed.privacy.release import from_update

    release = kind(None, plan, None, weights)
    release.site, release.patients = site, patients
    return from_update(release.compute()), release.used, release.excluded


def test_a_nodes_release_draws_with_a_fresh_secret_seed_not_the_designs_public_one(site, mlp, calibration):
    """The node's computation (a release kind's ``compute``, without DP: the exact sum) on the
    same patients twice: the draws differ from release to release and from the public seed's
    (which anyone could replay)."""
    from twinfed.client.kinds.calibration import Calibration
    from twinfed.client.kinds.trial import Trial
    from twinfed.models.digest import weights_sha256
    from twinfed.models.plan import TrainingPlan
    from twinfed.models.trial_plan import TrialPlan, TrialTwin

    training = TrainingPlan(spec=SPEC, rounds=1, model=ModelConfig(kind="mlp-residual"), calibration=CONFIG)
    weights = get_weights(mlp.surrogate)
    trial = TrialPlan(design=DESIGN, twin=TrialTwin(training_plan_json=training.model_dump_json(),
                                                    weights_sha256=weights_sha256(weights),
                                                    calibration=calibration))
    patients = np.arange(N)
    public = _release(_trial(mlp, site, patients, calibration))
    releases = [_node_sum(Trial, trial, site, patients, weights) for _ in range(2)]
    assert [r[1:] for r in releases] == [(N, 0), (N, 0)]
    assert not np.allclose(releases[0][0], releases[1][0]) and not np.allclose(releases[0][0], public)
    histograms = [_node_sum(Calibration, training, site, patients, weights)[0] for _ in range(2)]
    assert not np.allclose(histograms[0], histograms[1])
    assert not np.allclose(histograms[0], _histogram(mlp, site, patients).ravel())


def test_a_node_release_excludes_a_patient_whose_arm_leaves_the_specs_range_instead_of_failing(site, mlp):
    """A node's trial is charged before it is computed, so one patient's data must not fail it
    (a refusal after a charge tells the coordinator about that patient): a patient whose arm
    controls leave the spec's ranges is excluded, and every other patient's values are those of
    a trial without them. On one machine (``twinfed trial --data``) the design error is reported."""
    from twinfed.errors import TrialError

    win = trial_windows(site, DESIGN)
    peaks = win.usual[..., SPEC.control_columns.index("insulin_u")].max(axis=1)
    assert peaks.min() < peaks.max(), "the cohort's patients need different insulin peaks"
    top = float(SPEC.controls[SPEC.control_columns.index("insulin_u")].max)
    factor = round(top / float(np.median(peaks)) * 0.999, 6)  # the median patient stays just inside
    arms = {"usual-care": "recorded", "much-more-insulin": f"insulin_u*{factor:.6f}"}
    design = trial_design("over-the-range", arms, SPEC, start_hours=36, duration_days=1, outcomes=["mean_glucose"],
                          seed=7)
    over = win.patients[peaks.astype(np.float64) * factor > top]
    assert 0 < over.size < win.patients.size
    with pytest.raises(TrialError, match="leaves the spec's range"):
        run_site_trial(mlp, site, design)
    node = run_site_trial(mlp, site, design, exclude_out_of_range=True)
    assert set(node.patients.tolist()) == set(win.patients.tolist()) - set(over.tolist())
    assert node.n_excluded == win.n_excluded + over.size
    within = np.setdiff1d(win.patients, over)
    alone = run_site_trial(mlp, site, design, patients=within)
    assert np.array_equal(node.values, alone.values)
