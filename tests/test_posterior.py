"""The Laplace posterior of a patient's core-parameter offset (issue 21 item 1): what the twin does
not know about the patient, sharpening as their record grows."""

import numpy as np
import pytest
import torch

from twinfed.models.hybrid import HybridSurrogate
from twinfed.models.personalise import (
    IDENTIFIABLE_REL_SD, SIGMA2_FLOOR, identify, laplace_posterior, parameter_spread,
)
from twinfed.models.plan import ModelConfig

from test_personalise import DAYS, SPEC, _site


class _Param:
    def __init__(self, name):
        self.name = name


class _LinearModel:
    """A stand-in exposing what the Laplace step uses: ``outputs(u, z, correction)``, here linear
    in ``z`` (each window's outputs ``A_w z``) plus the correction."""

    def __init__(self, a: torch.Tensor):
        self.a = a  # [W, M, n]

    def outputs(self, u, z, correction):
        a = self.a.repeat(len(z) // max(len(self.a), 1), 1, 1)  # the Jacobian's shifted copies
        return torch.einsum("wmn,wn->wm", a, z) + correction

    def member_outputs(self, u, z, correction):
        return self.outputs(u, z, correction).unsqueeze(-2)


class _LinearEnsemble:
    """Two structures, each linear in its own block of ``z`` (``A_s z_s``): an ensemble's
    ``member_outputs`` ``[W, 2, M]``."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        self.a, self.b = a, b  # [W, M, n_a], [W, M, n_b]

    def member_outputs(self, u, z, correction):
        na, copies = self.a.shape[-1], len(z) // len(self.a)  # the Jacobian's shifted copies
        return torch.stack([torch.einsum("wmn,wn->wm", self.a.repeat(copies, 1, 1), z[:, :na]),
                            torch.einsum("wmn,wn->wm", self.b.repeat(copies, 1, 1), z[:, na:])],
                           dim=-2) + correction.unsqueeze(-2)


def _sandwich(A_w, r_w, sigma2, precision, clusters):
    """numpy's cluster-robust covariance: H^-1 (sum_c s_c s_c^T) C/(C-1) H^-1, s_c = sum of the
    cluster's windows' J^T r / sigma^2, centred."""
    inv = np.linalg.inv(precision)
    ids = np.unique(clusters, return_inverse=True)[1]
    s = np.zeros((ids.max() + 1, precision.shape[0]))
    for w in range(len(A_w)):
        s[ids[w]] += A_w[w].T @ r_w[w] / sigma2
    s = s - s.mean(0)
    c = s.shape[0]
    return inv @ (s.T @ s * c / (c - 1)) @ inv


def test_on_outputs_linear_in_the_offset_the_posterior_is_the_sandwich_around_the_exact_gaussian_precision():
    rng = np.random.default_rng(3)
    n, m = 3, 5
    counts = np.array([4, 10])  # two patients, their windows grouped
    owner = np.repeat(np.arange(2), counts)
    a = torch.from_numpy(rng.normal(size=(counts.sum(), m, n))).float()
    truth = rng.normal(size=(2, n))
    y = torch.einsum("wmn,wn->wm", a, torch.from_numpy(truth[owner]).float()) \
        + torch.from_numpy(rng.normal(0, 0.3, size=(counts.sum(), m))).float()
    offset = torch.from_numpy(rng.normal(size=(2, n))).float()  # any point: the outputs are linear
    z = torch.zeros(counts.sum(), n)
    corr = torch.zeros(counts.sum(), m)
    weight = 0.02
    # patient 0: 3 clusters, too few for 3 parameters' sandwich; patient 1: 8 > 2n, two shared
    clusters = np.array([0, 0, 1, 2, 0, 1, 1, 2, 3, 4, 5, 6, 7, 7])
    cov = laplace_posterior(_LinearModel(a), {}, z, corr, y, offset, owner, counts, prior_weight=weight,
                            clusters=clusters)
    assert cov.shape == (2, n, n)
    for p in range(2):
        rows = owner == p
        A_w = a[rows].double().numpy()
        A = A_w.reshape(-1, n)  # all the patient's outputs, stacked
        r_w = np.einsum("wmn,n->wm", A_w, offset[p].double().numpy()) - y[rows].double().numpy()
        sigma2 = max(float(np.mean(r_w ** 2)), SIGMA2_FLOOR)
        # y | theta ~ N(A theta, sigma2 I); theta ~ N(0, sigma2 n / (weight M) I): the fit's prior,
        # weight * mean(theta^2) against one window's mean squared error.
        precision = A.T @ A / sigma2 + np.eye(n) * weight * m / (n * sigma2)
        # patient 0 has 3 clusters for 3 parameters: the precision's inverse, times the design effect
        deff = min(max(m * np.mean(r_w.mean(-1) ** 2) / np.mean(r_w ** 2), 1.0), m)
        exact = np.linalg.inv(precision) * deff if p == 0 else _sandwich(A_w, r_w, sigma2, precision, clusters[rows])
        np.testing.assert_allclose(cov[p].numpy(), exact, rtol=1e-3, atol=1e-7)  # float32 differences


def test_with_errors_shared_within_windows_the_posterior_covers_the_truth_where_the_plain_precision_does_not():
    """Each window's outputs share one error (as a sensor's drift does) and respond alike to the
    offset (as a forecast's steps do): 100 patients of a linear model, whose offset's fit is least
    squares. The plain precision's 95% interval is far too narrow; the sandwich's (many clusters)
    and the design effect's (too few clusters for a sandwich) hold the truth about 95% of the time
    (0.88-1 allows for chance)."""
    rng = np.random.default_rng(8)
    n, m, w, reps = 2, 12, 40, 100
    hits = {"plain": 0, "sandwich": 0, "design effect": 0}
    for _ in range(reps):
        # a window's outputs respond alike to the offset (a forecast's steps are smooth)
        a = rng.normal(size=(w, 1, n)) + rng.normal(0, 0.1, size=(w, m, n))
        truth = rng.normal(size=n)
        shared = rng.normal(0, 1.0, size=(w, 1)) + rng.normal(0, 0.2, size=(w, m))
        y = np.einsum("wmn,n->wm", a, truth) + shared
        A = a.reshape(-1, n)
        fit = np.linalg.lstsq(A, y.reshape(-1), rcond=None)[0]
        sigma2 = np.mean((A @ fit - y.reshape(-1)) ** 2)
        hits["plain"] += abs(fit[0] - truth[0]) < 1.96 * np.sqrt(np.linalg.inv(A.T @ A / sigma2)[0, 0])
        args = (_LinearModel(torch.from_numpy(a).float()), {}, torch.zeros(w, n), torch.zeros(w, m),
                torch.from_numpy(y).float(), torch.from_numpy(fit[None]).float(), np.zeros(w, np.int64),
                np.array([w]))
        for name, clusters in (("design effect", np.zeros(w, np.int64)), ("sandwich", np.arange(w))):
            cov = laplace_posterior(*args, prior_weight=1e-9, clusters=clusters)[0].numpy()
            hits[name] += abs(fit[0] - truth[0]) < 1.96 * np.sqrt(cov[0, 0])
    assert hits["plain"] / reps < 0.6
    assert 0.88 <= hits["sandwich"] / reps <= 1.0
    assert 0.88 <= hits["design effect"] / reps <= 1.0


def test_an_ensembles_structures_each_have_their_own_posterior_and_noise_model():
    rng = np.random.default_rng(5)
    na, nb, m, w = 2, 3, 4, 9
    n = na + nb
    a = torch.from_numpy(rng.normal(size=(w, m, na))).float()
    b = torch.from_numpy(rng.normal(size=(w, m, nb))).float()
    y = torch.from_numpy(rng.normal(0, 1.0, size=(w, m))).float()
    offset = torch.from_numpy(rng.normal(size=(1, n))).float()
    owner, counts = np.zeros(w, np.int64), np.array([w])
    weight = 0.02
    # one cluster: the precision's inverse times the design effect (the sandwich is the test
    # above's)
    cov = laplace_posterior(_LinearEnsemble(a, b), {}, torch.zeros(w, n), torch.zeros(w, m), y, offset, owner,
                            counts, prior_weight=weight, clusters=np.zeros(w, np.int64))[0].numpy()
    sig, resid = [], []
    for mat, part in ((a, offset[0, :na]), (b, offset[0, na:])):
        r = np.einsum("wmn,n->wm", mat.double().numpy(), part.double().numpy()) - y.double().numpy()
        resid.append(r)
        sig.append(max(float(np.mean(r ** 2)), SIGMA2_FLOOR))
    r = np.stack(resid, 1)  # [w, 2, m]
    deff = min(max(m * np.mean(r.mean(-1) ** 2) / np.mean(r ** 2), 1.0), m)
    assert sig[0] != pytest.approx(sig[1], rel=0.05)  # the structures fit unequally well
    prior = weight * 2 * m / n / np.mean(sig)
    for block, mat, s2 in ((slice(0, na), a, sig[0]), (slice(na, n), b, sig[1])):
        A = mat.double().reshape(-1, mat.shape[-1]).numpy()
        exact = np.linalg.inv(A.T @ A / s2 + prior * np.eye(A.shape[1])) * deff
        np.testing.assert_allclose(cov[block, block], exact, rtol=1e-3, atol=1e-7)  # float32 differences
    # one structure's outputs say nothing about the other's parameters
    np.testing.assert_allclose(cov[:na, na:], 0.0, atol=1e-12)


def test_a_patient_without_windows_has_no_posterior():
    a = torch.zeros(0, 2, 3)
    cov = laplace_posterior(_LinearModel(a), {}, torch.zeros(0, 3), torch.zeros(0, 2), torch.zeros(0, 2),
                            torch.zeros(1, 3), np.zeros(0, np.int64), np.array([0]), prior_weight=0.02)
    assert torch.isnan(cov).all()


@pytest.fixture(scope="module")
def noisy_site():
    site = _site(2)
    rng = np.random.default_rng(1)
    site.series[:, 0] += rng.normal(0, 8.0, size=len(site.series)).astype(np.float32)  # CGM noise
    return site


@pytest.mark.studies  # three identifications with posteriors: kept out of the 10-minute suite
def test_the_spread_of_insulin_sensitivity_shrinks_as_a_patients_windows_grow(noisy_site):
    torch.manual_seed(0)
    model = HybridSurrogate(SPEC, ModelConfig(kind="hybrid", hidden=8, layers=1))
    until = np.full(noisy_site.n_patients, DAYS * 288 - 1)
    sd = {}
    for w in (4, 16, 64):
        fit = identify(model, noisy_site, np.arange(2), until, windows=w, steps=60, posterior=True)
        assert fit.posterior_cov.shape == (2, len(SPEC.core and model.binding.params), len(model.binding.params))
        spread = parameter_spread(model, noisy_site, fit, "si")
        assert np.all(np.isfinite(spread.sd)) and np.all(spread.sd > 0)
        sd[w] = spread.relative_sd
    # 4 and 16 windows: the design effect's inflation, estimated from few windows (noisy); 64:
    # the sandwich; a long record's posterior is narrower than either short one's
    assert np.all(sd[64] < sd[16]) and np.all(sd[64] < sd[4])


def test_a_patient_without_windows_is_not_identifiable(noisy_site):
    torch.manual_seed(0)
    model = HybridSurrogate(SPEC, ModelConfig(kind="hybrid", hidden=8, layers=1))
    fit = identify(model, noisy_site, np.array([0, 1]), np.array([10, DAYS * 288 - 1]), steps=20, posterior=True)
    spread = parameter_spread(model, noisy_site, fit, "si")
    assert spread.identifiable.tolist() == [False, bool(spread.relative_sd[1] < IDENTIFIABLE_REL_SD)]
    assert np.isnan(spread.sd[0])


def test_whatif_json_reports_the_posterior_spread_of_insulin_sensitivity_and_its_flag(noisy_site):
    import json

    from twinfed.cli.twin import whatif_json
    from twinfed.models.plan import TrainingPlan
    from twinfed.models.twin import Twin
    from twinfed.models.whatif import default_scenarios, run_whatif

    torch.manual_seed(0)
    config = ModelConfig(kind="hybrid", hidden=8, layers=1)
    twin = Twin(TrainingPlan(spec=SPEC, rounds=1, model=config), HybridSurrogate(SPEC, config))
    res = run_whatif(twin, noisy_site, "p1", 2 * 1440.0, default_scenarios(SPEC))
    out = json.loads(json.dumps(whatif_json(res, twin, SPEC)))
    params = out["parameters"]
    assert params["from"] == "personalised" and "clinical" in params  # the fields that were there
    post = params["posterior"]
    assert set(post["parameters"]) == {p.name for p in twin.surrogate.binding.params}
    si = post["parameters"]["si"]
    assert si["sd"] > 0 and si["relative_sd"] == pytest.approx(si["sd"] / si["value"], rel=1e-2)
    key = post["identifiability"]
    assert key["parameter"] == "si" and key["threshold_relative_sd"] == IDENTIFIABLE_REL_SD
    assert key["identifiable"] == (key["relative_sd"] < IDENTIFIABLE_REL_SD)
    # without personalisation there is no posterior to report
    res = run_whatif(twin, noisy_site, "p1", 2 * 1440.0, default_scenarios(SPEC), personalise=False)
    assert whatif_json(res, twin, SPEC)["parameters"]["posterior"] is None


@pytest.mark.parametrize("structures", [None, ("minimal", "two-compartment")], ids=["one", "ensemble"])
def test_the_windows_jacobian_by_central_differences_is_forward_mode_ads(noisy_site, structures):
    from test_ensemble import with_structures

    from twinfed.models.personalise import window_jacobian
    from twinfed.models.windows import gather

    spec = SPEC if structures is None else with_structures(SPEC, structures)
    torch.manual_seed(0)
    model = HybridSurrogate(spec, ModelConfig(kind="hybrid", hidden=8, layers=1))
    batch = gather(noisy_site, np.array([300, 500, 700]), np.array([0, 0, 1]), with_context=True)
    with torch.no_grad():
        u = model.unpack(torch.from_numpy(model.inputs.batch_features(batch)))
        z = model.parameters_of(u) + torch.randn(3, len(model.binding.params)) * 0.3
        corr = model.corrections(u)
        exact = torch.func.jacfwd(lambda s: model.member_outputs(u, z + s, corr))(torch.zeros(z.shape[1]))
        # rows one at a time in the passes, too: the blocks cannot change a row's derivative
        for rows in (8192, 2 * z.shape[1]):
            got = window_jacobian(model, u, z, corr, rows_per_pass=rows)
            assert got.shape == exact.shape == (3, model.n_structures, model.inputs.n_outputs, z.shape[1])
            torch.testing.assert_close(got, exact, rtol=2e-2, atol=2e-3 * float(exact.abs().max()))
