"""A trial's paths carry what the twin does not know about each patient (issue 21 item 1): one
draw of the patient's core parameters per path from their Laplace posterior, the same draw in
every arm (pairing kept), from the patient's own generator."""

import numpy as np
import pytest
import torch

from twinfed.models.calibration import identify_patients
from twinfed.models.personalise import posterior_draws
from twinfed.models.rollout import Origins, roll_forward

from test_trial_engine import ARMS, SPEC, T, _calibration, _twin, cohort  # noqa: F401 (fixture)
from twinfed.models.trial import run_site_trial

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def fitted(cohort):  # noqa: F811
    patients = np.arange(cohort.n_patients)
    rows = cohort.offsets[patients] + 36 * 60 // SPEC.step_minutes - 1
    usual = np.stack([cohort.series[r + 1:r + 1 + T, len(SPEC.states):] for r in rows])
    hybrid = _twin("hybrid")
    fit = identify_patients(hybrid, cohort, patients, cohort.steps[rows], posterior=True)
    return Origins.at(cohort, patients, rows), usual, hybrid, fit


def test_a_patients_parameter_draws_follow_their_posterior_from_their_own_generator(fitted):
    origins, _, _, fit = fitted
    many = posterior_draws(fit.offset, fit.posterior_cov, origins.keys, 4000, seed=5)
    assert many.shape == (4, 4000, fit.offset.shape[1])
    for i in range(4):
        np.testing.assert_allclose(many[i].double().mean(0).numpy(), fit.offset[i].numpy(),
                                   atol=4 * float(fit.posterior_cov[i].diagonal().sqrt().max()) / np.sqrt(4000))
        np.testing.assert_allclose(np.cov(many[i].double().numpy().T), fit.posterior_cov[i].numpy(),
                                   rtol=0.15, atol=0.1 * float(fit.posterior_cov[i].diagonal().max()))
    alone = posterior_draws(fit.offset[2:3], fit.posterior_cov[2:3], origins.keys[2:3], 4000, seed=5)
    assert torch.equal(alone[0], many[2])  # whoever else is drawn
    assert not torch.equal(posterior_draws(fit.offset, fit.posterior_cov, origins.keys, 4000, seed=6), many)


def test_paths_differ_with_the_parameter_draw_and_every_arm_shares_it(fitted):
    origins, usual, hybrid, fit = fitted
    draws = posterior_draws(fit.offset, fit.posterior_cov, origins.keys, 3, seed=5)
    point = roll_forward(hybrid, origins, usual, usual=usual, offset=fit.offset, draws=3)
    rolled = roll_forward(hybrid, origins, np.stack([usual, usual]), usual=usual, offset=draws, draws=3)
    assert rolled.shape == (2, 4, 3, T, 1)
    assert (point == point[:, :1]).all() and not np.allclose(rolled[0, :, 0], rolled[0, :, 1])
    assert np.array_equal(rolled[0], rolled[1])  # the same parameter draw in every arm
    same = roll_forward(hybrid, origins, usual, usual=usual, draws=3,
                        offset=fit.offset[:, None, :].expand(-1, 3, -1).contiguous())
    np.testing.assert_allclose(same, point, rtol=0, atol=1e-3)  # draws at the fit: the point's paths
    with pytest.raises(ValueError, match="draw"):
        roll_forward(hybrid, origins, usual, offset=draws, draws=2)


def test_a_drawn_trial_rolls_each_patient_through_their_posterior_and_keeps_them_their_own(cohort, fitted):  # noqa: F811
    hybrid = fitted[2]
    whole = run_site_trial(hybrid, cohort, ARMS, calibration=_calibration())
    part = run_site_trial(hybrid, cohort, ARMS, calibration=_calibration(), patients=np.array([1, 3]))
    assert np.array_equal(part.values, whole.values[[1, 3]])
    assert np.array_equal(whole.values[:, 0], whole.values[:, 1])  # identical arms: zero contrast
    fixed = run_site_trial(hybrid, cohort, ARMS, calibration=_calibration(), parameter_draws=False)
    assert not np.allclose(fixed.values, whole.values)
