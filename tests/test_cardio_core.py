"""The cardio core and its hybrid twin: the drug never raises pressure nor lowers heart rate,
activity never lowers either, parameters in range, drug mass conserved, per-patient gradients
Opacus can take, and a twin that learns from the built-in simulator's cohort."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from twinfed.models.cores import core_for
from twinfed.models.cores.base import bounded
from twinfed.models.cores.cardio import PARAMS, CardioCore, age_scales
from twinfed.models.hybrid import HybridInputs, HybridSurrogate
from twinfed.models.plan import ModelConfig, TrainingConfig
from twinfed.models.spec import load_spec

SPEC = load_spec("cardio")
K, L = SPEC.horizon_steps, SPEC.context_length
BINDING = core_for(SPEC)
torch.set_default_dtype(torch.float32)

z_vectors = st.lists(st.floats(-8, 8), min_size=len(PARAMS), max_size=len(PARAMS))
plans = st.lists(st.floats(0, 100), min_size=K, max_size=K)
levels = st.lists(st.floats(0, 1), min_size=K, max_size=K)
# A day of record: a few doses and activity episodes at any time of it.
past_doses = st.lists(st.tuples(st.integers(0, L - 1), st.floats(0, 100)), max_size=4)
past_activity = st.lists(st.tuples(st.integers(0, L - 1), st.integers(1, 12), st.floats(0, 1)), max_size=4)


def _doses(events):
    out = np.zeros(L)
    for at, amount in events:
        out[at] += amount
    return out


def _episodes(events):
    out = np.zeros(L)
    for at, n, level in events:
        out[at: at + n] = np.maximum(out[at: at + n], level)
    return out


def _u(past_dose, past_act, dose, act, sbp=150.0, hr=75.0, weight=70.0, age=50.0, mask=None):
    def t(a):
        return torch.tensor(np.asarray(a, dtype=np.float64)[None])

    states = np.tile([sbp, hr], (L, 1))
    return {"states": t(states), "controls": t(np.stack([past_dose, past_act], -1)),
            "mask": t(np.ones(L) if mask is None else mask), "future": t(np.stack([dose, act], -1)),
            "covariates": t([weight, age])}


def _forecast(z, u) -> np.ndarray:
    """SBP and heart rate ``[K, 2]``."""
    return BINDING.forecast(torch.tensor([z], dtype=torch.float64), u)[0][0].numpy()


@settings(max_examples=60, deadline=None)
@given(z=z_vectors, dose=plans, act=levels, doses=past_doses, acts=past_activity, extra=st.floats(0.5, 100),
       at=st.integers(0, K - 1), back=st.integers(0, L - 1), sbp=st.floats(60, 250), hr=st.floats(30, 200),
       weight=st.floats(3, 300), age=st.floats(1, 110))
def test_more_drug_now_or_earlier_never_raises_sbp_and_never_lowers_heart_rate(
        z, dose, act, doses, acts, extra, at, back, sbp, hr, weight, age):
    past_d, past_a = _doses(doses), _episodes(acts)
    base = _forecast(z, _u(past_d, past_a, dose, act, sbp, hr, weight, age))
    more = list(dose)
    more[at] += extra
    earlier = past_d.copy()
    earlier[back] += extra
    for changed in (_u(past_d, past_a, more, act, sbp, hr, weight, age),
                    _u(earlier, past_a, dose, act, sbp, hr, weight, age)):
        out = _forecast(z, changed)
        assert (out[:, 0] <= base[:, 0] + 1e-9).all()
        assert (out[:, 1] >= base[:, 1] - 1e-9).all()


@settings(max_examples=60, deadline=None)
@given(z=z_vectors, dose=plans, act=levels, doses=past_doses, acts=past_activity, extra=st.floats(0.01, 1),
       at=st.integers(0, K - 1), back=st.integers(0, L - 1), sbp=st.floats(60, 250), hr=st.floats(30, 200),
       age=st.floats(1, 110))
def test_more_activity_now_or_earlier_never_lowers_sbp_or_heart_rate(
        z, dose, act, doses, acts, extra, at, back, sbp, hr, age):
    past_d, past_a = _doses(doses), _episodes(acts)
    base = _forecast(z, _u(past_d, past_a, dose, act, sbp, hr, age=age))
    more = list(act)
    more[at] = min(1.0, more[at] + extra)
    earlier = past_a.copy()
    earlier[back] = min(1.0, earlier[back] + extra)
    for changed in (_u(past_d, past_a, dose, more, sbp, hr, age=age), _u(past_d, earlier, dose, act, sbp, hr, age=age)):
        assert (_forecast(z, changed) >= base - 1e-9).all()


@settings(max_examples=60, deadline=None)
@given(z=z_vectors, weight=st.floats(1, 400), age=st.floats(0, 120))
def test_every_parameter_stays_in_its_range_and_maps_back(z, weight, age):
    u = {"covariates": torch.tensor([[weight, age]], dtype=torch.float64)}
    theta = BINDING.theta(torch.tensor([z], dtype=torch.float64), u)
    factor = {name: float(f) for name, f in age_scales(u["covariates"][:, 1]).items()}
    for p in PARAMS:
        scale = (weight / 70.0) ** p.per_kg * factor.get(p.name, 1.0)
        assert p.lo * scale * (1 - 1e-9) <= float(theta[p.name]) <= p.hi * scale * (1 + 1e-9), p.name
    again = BINDING.theta(BINDING.z_of(theta, u), u)
    for p in PARAMS:
        assert float(again[p.name]) == pytest.approx(float(theta[p.name]), rel=1e-3)


@settings(max_examples=60, deadline=None)
@given(z=z_vectors, amounts=st.lists(st.floats(0, 3), min_size=1, max_size=40),
       h=st.sampled_from([1.0, 5.0, 30.0, 240.0]))
def test_drug_absorbed_never_exceeds_what_was_given_and_the_blood_never_gains_more(z, amounts, h):
    theta = bounded(torch.tensor([z], dtype=torch.float64), PARAMS, None)
    step = CardioCore.kinetics(theta, h)
    x = torch.zeros(1, 3, dtype=torch.float64)
    given_total = absorbed_total = 0.0
    for a in amounts:
        x, absorbed = CardioCore._pk(x, torch.tensor([a], dtype=torch.float64), h, step)
        given_total += a
        absorbed_total += float(absorbed)
        assert (x >= 0).all()
        assert absorbed_total <= given_total + 1e-9
        assert float(x[0, 0]) + absorbed_total == pytest.approx(given_total, rel=1e-9, abs=1e-9)
        assert float(x[0, 1]) <= absorbed_total + 1e-9  # elimination only takes away


@settings(max_examples=30, deadline=None)
@given(z=z_vectors, amount=st.floats(0, 3), n=st.sampled_from([2, 6, 12]))
def test_the_kinetics_step_is_exact_whatever_its_length(z, amount, n):
    theta = bounded(torch.tensor([z], dtype=torch.float64), PARAMS, None)
    x0 = torch.tensor([[0.3, 0.2, 0.05]], dtype=torch.float64)
    amt = torch.tensor([amount], dtype=torch.float64)
    one, _ = CardioCore._pk(x0, amt, 5.0 * n, CardioCore.kinetics(theta, 5.0 * n))
    x, small = x0, CardioCore.kinetics(theta, 5.0)
    for _ in range(n):
        x, _ = CardioCore._pk(x, amt / n, 5.0, small)
    assert torch.allclose(one, x, rtol=1e-9, atol=1e-12)


def test_without_drug_or_activity_readings_at_the_set_point_stay_there():
    z = np.random.default_rng(0).uniform(-3, 3, len(PARAMS)).tolist()
    u = _u(np.zeros(L), np.zeros(L), np.zeros(K), np.zeros(K), weight=82.0, age=64.0)
    theta = BINDING.theta(torch.tensor([z], dtype=torch.float64), u)
    sbp0, hr0 = float(theta["sbp0"]), float(theta["hr0"])
    out = _forecast(z, _u(np.zeros(L), np.zeros(L), np.zeros(K), np.zeros(K), sbp0, hr0, 82.0, 64.0))
    assert np.allclose(out[:, 0], sbp0, atol=1e-9) and np.allclose(out[:, 1], hr0, atol=1e-9)


def test_doses_and_activity_before_the_record_begins_count_as_none():
    z = [0.5] * len(PARAMS)
    unrecorded = (np.arange(L) < L // 2).astype(float)
    doses, acts = 30.0 * unrecorded, 0.8 * unrecorded  # what the gap holds is never read
    none = _forecast(z, _u(np.zeros(L), np.zeros(L), np.zeros(K), np.zeros(K), mask=1 - unrecorded))
    assert np.array_equal(_forecast(z, _u(doses, acts, np.zeros(K), np.zeros(K), mask=1 - unrecorded)), none)


def test_a_typical_patients_morning_dose_lowers_sbp_and_raises_heart_rate_hours_later():
    z = [0.0] * len(PARAMS)
    theta = BINDING.theta(torch.tensor([z], dtype=torch.float64), _u(*[np.zeros(L)] * 2, *[np.zeros(K)] * 2))
    sbp0, hr0 = float(theta["sbp0"]), float(theta["hr0"])
    dosed = np.zeros(L)
    dosed[L - 36] = 20.0  # 20 mg three hours before the origin
    none = _forecast(z, _u(np.zeros(L), np.zeros(L), np.zeros(K), np.zeros(K), sbp0, hr0))
    out = _forecast(z, _u(dosed, np.zeros(L), np.zeros(K), np.zeros(K), sbp0, hr0))
    assert (out[-1, 0] < none[-1, 0] - 3.0) and (out[-1, 1] > none[-1, 1] + 1.0)


def _hybrid(seed: int, weight_sd: float) -> HybridSurrogate:
    """A small cardio hybrid with random weights (a trained encoder is not at the typical patient)."""
    torch.manual_seed(seed)
    model = HybridSurrogate(SPEC, ModelConfig(kind="hybrid", hidden=8, layers=1))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, weight_sd)
    return model


def _inputs(n, k, rng):
    i = HybridInputs(SPEC)
    shape = (n, k, i.lc)
    ctx = np.stack([rng.uniform(100, 190, shape), rng.uniform(50, 110, shape),
                    20.0 * (rng.random(shape) < 0.01), rng.random(shape) * (rng.random(shape) < 0.1)], axis=-1)
    mask = (rng.random((n, k, 1)) < 0.7) | (np.arange(i.lc) > i.lc // 2)
    fut = np.stack([20.0 * (rng.random((n, k, K)) < 0.1), rng.random((n, k, K))], axis=-1)
    cov = np.stack([rng.uniform(40, 120, (n, k)), rng.uniform(12, 90, (n, k))], axis=-1)
    flat = np.concatenate([(ctx * mask[..., None]).reshape(n, k, -1), mask.astype(float).reshape(n, k, -1)
                           * np.ones((n, k, i.lc)), fut.reshape(n, k, -1), cov], axis=-1)
    return torch.tensor(flat, dtype=torch.float32)


def _one_patient_at_a_time(model, x, y) -> dict[str, torch.Tensor]:
    """Each patient's gradient of the summed squared error, by plain autograd on their rows alone."""
    names, params = zip(*model.named_parameters())
    grads = [torch.autograd.grad(((model(x[i: i + 1]) - y[i: i + 1]) ** 2).sum(), params) for i in range(len(x))]
    return {name: torch.stack([g[j] for g in grads]) for j, name in enumerate(names)}


def test_opacus_per_patient_gradients_through_the_cardio_core_match_autograd_one_patient_at_a_time():
    from opacus import GradSampleModule

    model = _hybrid(seed=1, weight_sd=0.1)
    x = _inputs(4, 3, np.random.default_rng(1))  # 4 patients x 3 windows each
    y = torch.randn(*x.shape[:2], model.inputs.n_outputs)
    expected = _one_patient_at_a_time(model, x, y)
    private = GradSampleModule(model, loss_reduction="sum")
    ((private(x) - y) ** 2).sum().backward()
    try:
        for name, p in model.named_parameters():
            assert torch.allclose(p.grad_sample, expected[name], atol=1e-5, rtol=1e-4), name
    finally:
        private.cleanup()


@pytest.fixture(scope="module")
def cohort_site(tmp_path_factory):
    from twinfed.models.cohort import generate_cohort
    from twinfed.models.site_data import load_site

    out = tmp_path_factory.mktemp("cardio")
    generate_cohort("cardio", sites=1, patients=40, days=2, seed=0, out=out)
    return load_site(out / "site-a", SPEC)


def test_a_cardio_hybrid_forecasts_real_windows_finitely_and_short_training_lowers_its_loss(cohort_site):
    from twinfed.models.surrogate import build_surrogate, inputs_for
    from twinfed.models.train import PatientWindows, train_local

    config = ModelConfig(kind="hybrid", hidden=32)
    net = build_surrogate(SPEC, config)
    inputs = inputs_for(SPEC, config)
    data = PatientWindows(cohort_site, seed=1, windows_per_patient=4, inputs=inputs)
    x, y = data.draw(np.arange(len(data)))
    with torch.no_grad():
        out = net(x)
        before = float(torch.nn.functional.mse_loss(out, y))
    assert torch.isfinite(out).all()
    train_local(net, cohort_site, TrainingConfig(local_steps=40, batch_size=8, learning_rate=3e-3,
                                                 windows_per_patient=4), seed=2, inputs=inputs)
    with torch.no_grad():
        after = float(torch.nn.functional.mse_loss(net(x), y))
    assert after < 0.7 * before
