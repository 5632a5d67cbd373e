"""Personalisation: a patient's core parameters identified from their own record."""

import numpy as np
import pytest
import torch

from twinfed.models.cores.base import bounded
from twinfed.models.cores.glucose import PARAMS, GlucoseInsulinCore
from twinfed.models.hybrid import HybridSurrogate
from twinfed.models.personalise import identify
from twinfed.models.plan import ModelConfig
from twinfed.models.site_data import SiteData
from twinfed.models.spec import load_spec

SPEC = load_spec("glucose")
DAYS = 3
TRUE = {"si": 0.9, "basal": 0.9, "sg": 0.012, "gb": 120.0, "tau_i": 70.0, "p2": 0.04, "tau_c": 30.0,
        "cf": 9.0}


def _record(theta: dict, n_steps: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Glucose from the core's own equations (noise-free), under basal insulin, three meals a
    day with boluses, and a few snacks: [T] glucose, [T, 2] insulin and carbs."""
    h = SPEC.step_minutes
    insulin = np.full(n_steps, TRUE["basal"] * h / 60.0)
    carbs = np.zeros(n_steps)
    for day in range(DAYS):
        for clock, grams in ((7.5, 50), (12.5, 70), (19.0, 80), (16.0, 20)):
            t = int((day * 24 + clock + rng.uniform(-0.5, 0.5)) * 60 / h)
            if t < n_steps:
                carbs[t] += grams * rng.uniform(0.7, 1.3)
                insulin[max(0, t - 2)] += round(grams / 12 * rng.uniform(0.7, 1.3) * 2) / 2
    core = GlucoseInsulinCore(h).double()
    th = {k: torch.tensor([v], dtype=torch.float64) for k, v in theta.items()}
    state = core.warmup(th, torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64),
                        torch.zeros(1, 1, dtype=torch.float64))
    g = core(th, state, th["gb"], torch.tensor(insulin[None]), torch.tensor(carbs[None]))[0].numpy()
    return np.concatenate([[TRUE["gb"]], g[:-1]]), np.stack([insulin, carbs], axis=1)


def _site(n_patients: int = 2) -> SiteData:
    rng = np.random.default_rng(0)
    n = DAYS * 288
    series, covariates = [], []
    for _ in range(n_patients):
        g, controls = _record(TRUE, n, rng)
        series.append(np.concatenate([g[:, None], controls], axis=1))
        covariates.append([70.0, 40.0])
    return SiteData(spec=SPEC, patient_ids=[f"p{i}" for i in range(n_patients)],
                    series=np.concatenate(series).astype(np.float32),
                    steps=np.tile(np.arange(n), n_patients), offsets=np.arange(n_patients + 1) * n,
                    covariates=np.array(covariates, np.float32))


@pytest.fixture(scope="module")
def fitted():
    torch.manual_seed(0)
    model = HybridSurrogate(SPEC, ModelConfig(kind="hybrid", hidden=8, layers=1))  # population prior:
    site = _site()                                                                  # the typical patient
    until = np.full(site.n_patients, DAYS * 288 - 1)
    # A weak prior: three noise-free days of the core's own physiology should speak for themselves.
    return model, site, identify(model, site, np.arange(site.n_patients), until, windows=48, steps=300,
                                 prior_weight=1e-4)


def test_identification_recovers_the_parameters_of_noise_free_data_from_the_cores_own_model(fitted):
    model, site, result = fitted
    # The untrained encoder says "the typical patient" (z = 0) for every window: z is the offset.
    theta = {k: v.numpy() for k, v in bounded(result.offset, PARAMS, torch.tensor([70.0, 70.0])).items()}
    # Started from the typical patient (up to 2.2x away). What three days of meals, boluses and
    # basal identify well: the basal rate and the level it holds (10%), the carbohydrate
    # absorption time and the carbohydrate ratio si/cf (15%), sensitivity and carbohydrate
    # factor each (25%; they trade off against each other). The insulin timing parameters
    # (tau_i, p2) trade off too and are not asserted.
    for name, tolerance in (("basal", 0.10), ("gb", 0.10), ("tau_c", 0.15), ("si", 0.25), ("cf", 0.25)):
        assert theta[name] == pytest.approx([TRUE[name]] * 2, rel=tolerance), name
    assert theta["si"] / theta["cf"] == pytest.approx([TRUE["si"] / TRUE["cf"]] * 2, rel=0.15)


def test_personalisation_lowers_the_patients_forecast_error(fitted):
    model, site, result = fitted
    from twinfed.models.windows import WindowIndex, gather

    index = WindowIndex.build(site)
    batch = gather(site, index.starts[::7], index.window_patients()[::7], with_context=True)
    x = torch.from_numpy(model.inputs.batch_features(batch))
    y = torch.from_numpy(model.inputs.targets(batch))
    with torch.no_grad():
        before = float(((model(x) - y) ** 2).mean())
        after = float(((model(x, result.offset[torch.from_numpy(batch.patients)]) - y) ** 2).mean())
    assert after < 0.2 * before


def test_a_patient_without_a_full_window_before_the_decision_keeps_the_prior(fitted):
    model, site, _ = fitted
    early = identify(model, site, np.array([0]), np.array([10]))
    assert early.n_windows.tolist() == [0] and not early.offset.any()
