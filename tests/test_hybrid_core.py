"""The glucose-insulin core and the hybrid twin: effects of the right sign by construction,
parameters in range, mass conserved, and per-patient gradients Opacus can take."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from twinfed.models.cores.base import bounded, chain_step, unbounded
from twinfed.models.cores.glucose import PARAMS, GlucoseInsulinCore
from twinfed.models.hybrid import CORRECTION_BOUND, HybridSurrogate
from twinfed.models.plan import ModelConfig
from twinfed.models.spec import load_spec

SPEC = load_spec("glucose")
K = SPEC.horizon_steps
torch.set_default_dtype(torch.float32)

z_vectors = st.lists(st.floats(-8, 8), min_size=len(PARAMS), max_size=len(PARAMS))
amounts = st.lists(st.floats(0, 12), min_size=K, max_size=K)
history_amounts = st.lists(st.floats(0, 12), min_size=72, max_size=72)


def _theta(z, weight=70.0):
    return bounded(torch.tensor([z], dtype=torch.float64), PARAMS, torch.tensor([weight], dtype=torch.float64))


def _forecast(theta, insulin_past, carbs_past, insulin, carbs, g0=140.0):
    core = GlucoseInsulinCore(5).double()
    past = lambda a: torch.tensor([a], dtype=torch.float64)  # noqa: E731
    state = core.warmup(theta, past(insulin_past), past(carbs_past), torch.ones(1, len(insulin_past),
                                                                                 dtype=torch.float64))
    return core(theta, state, torch.tensor([g0], dtype=torch.float64), past(insulin), past(carbs))[0].numpy()


@settings(max_examples=60, deadline=None)
@given(z=z_vectors, ins=amounts, carbs=amounts, past_i=history_amounts, past_c=history_amounts,
       extra=st.floats(0.01, 10), at=st.integers(0, K - 1), g0=st.floats(40, 400))
def test_more_insulin_never_raises_and_more_carbohydrate_never_lowers_the_forecast(
        z, ins, carbs, past_i, past_c, extra, at, g0):
    theta = _theta(z)
    base = _forecast(theta, past_i, past_c, ins, carbs, g0)
    more_i, more_c = list(ins), list(carbs)
    more_i[at] += extra
    more_c[at] += extra * 10
    assert (_forecast(theta, past_i, past_c, more_i, carbs, g0) <= base + 1e-9).all()
    assert (_forecast(theta, past_i, past_c, ins, more_c, g0) >= base - 1e-9).all()
    # ... and insulin given earlier (on board now) works the same way.
    past_more = list(past_i)
    past_more[-1 - at] += extra
    assert (_forecast(theta, past_more, past_c, ins, carbs, g0) <= base + 1e-9).all()


@settings(max_examples=60, deadline=None)
@given(z=z_vectors, weight=st.floats(1, 400))
def test_every_parameter_stays_in_its_range_and_maps_back(z, weight):
    w = torch.tensor([weight], dtype=torch.float64)
    theta = bounded(torch.tensor([z], dtype=torch.float64), PARAMS, w)
    for p in PARAMS:
        scale = (weight / 70.0) ** p.per_kg
        assert p.lo * scale * (1 - 1e-9) <= float(theta[p.name]) <= p.hi * scale * (1 + 1e-9), p.name
    again = bounded(unbounded(theta, PARAMS, w), PARAMS, w)
    for p in PARAMS:
        assert float(again[p.name]) == pytest.approx(float(theta[p.name]), rel=1e-3)


@settings(max_examples=60, deadline=None)
@given(rates=st.lists(st.floats(0, 5), min_size=1, max_size=40), tau=st.floats(5, 300),
       h=st.sampled_from([1.0, 5.0, 15.0]))
def test_absorption_never_delivers_more_than_was_given(rates, tau, h):
    s1 = s2 = torch.zeros(1, dtype=torch.float64)
    given_total = absorbed_total = 0.0
    for r in rates:
        s1, s2, out = chain_step(s1, s2, torch.tensor([r], dtype=torch.float64), torch.tensor([tau], dtype=torch.float64), h)
        given_total += r * h
        absorbed_total += float(out)
        assert float(s1) >= 0 and float(s2) >= 0
    assert absorbed_total <= given_total + 1e-9
    assert absorbed_total + float(s1 + s2) == pytest.approx(given_total, rel=1e-9, abs=1e-9)


def test_without_food_and_at_the_basal_rate_glucose_settles_at_its_basal_level():
    theta = _theta([0.0] * len(PARAMS))
    basal_step = float(theta["basal"]) * 5 / 60
    g = _forecast(theta, [basal_step] * 72, [0.0] * 72, [basal_step] * K, [0.0] * K, g0=float(theta["gb"]))
    assert np.allclose(g, float(theta["gb"]), atol=1e-6)


def _hybrid(seed=0):
    torch.manual_seed(seed)
    return HybridSurrogate(SPEC, ModelConfig(kind="hybrid", hidden=8, layers=1))


def _inputs(n, k, rng):
    from twinfed.models.hybrid import HybridInputs

    i = HybridInputs(SPEC)
    ctx = np.stack([rng.uniform(60, 250, (n, k, i.lc)), rng.exponential(0.3, (n, k, i.lc)),
                    rng.exponential(2.0, (n, k, i.lc)) * (rng.random((n, k, i.lc)) < 0.05)], axis=-1)
    mask = (rng.random((n, k, 1)) < 0.9) | (np.arange(i.lc) > i.lc // 2)
    fut = np.stack([rng.exponential(0.3, (n, k, K)), rng.exponential(2.0, (n, k, K))], axis=-1)
    cov = np.stack([rng.uniform(20, 120, (n, k)), rng.uniform(5, 90, (n, k))], axis=-1)
    flat = np.concatenate([(ctx * mask[..., None]).reshape(n, k, -1), mask.astype(float).reshape(n, k, -1)
                           * np.ones((n, k, i.lc)), fut.reshape(n, k, -1), cov], axis=-1)
    return torch.tensor(flat, dtype=torch.float32)


def test_the_correction_never_sees_the_planned_treatment_and_stays_bounded():
    model = _hybrid()
    with torch.no_grad():
        for p in model.correction.parameters():
            p.normal_(0, 3.0)  # a wild correction
        x = _inputs(5, 1, np.random.default_rng(0))[:, 0]
        u = model.unpack(x)
        c1 = model.correction(model.correction_features(u))
        x2 = x.clone()
        n_fut = SPEC.horizon_steps * len(SPEC.controls)
        x2[:, -n_fut - len(SPEC.covariates): -len(SPEC.covariates)] += 5.0  # another plan
        c2 = model.correction(model.correction_features(model.unpack(x2)))
        assert torch.equal(c1, c2)
        z = model.parameters_of(u)
        delta = model(x2, z) - model(x, z)
        core = (model.simulate(z, model.unpack(x2))[0] - model.simulate(z, u)[0])[..., 0]
        assert torch.allclose(delta, core / model.s_half * 10.0, atol=1e-4)  # only through the core
        assert (CORRECTION_BOUND * torch.tanh(c1)).abs().max() <= CORRECTION_BOUND


def test_opacus_per_patient_gradients_through_the_core_match_autograd_one_patient_at_a_time():
    from opacus import GradSampleModule

    model = _hybrid(seed=1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    x = _inputs(4, 3, np.random.default_rng(1))  # 4 patients x 3 windows each
    y = torch.randn(4, 3, model.inputs.n_outputs)
    gsm = GradSampleModule(model, loss_reduction="sum")
    loss = ((gsm(x) - y) ** 2).sum()
    loss.backward()
    per_sample = {name: p.grad_sample.clone() for name, p in gsm.named_parameters()}
    gsm.cleanup()
    for i in range(4):
        model.zero_grad()
        ((model(x[i: i + 1]) - y[i: i + 1]) ** 2).sum().backward()
        for name, p in model.named_parameters():
            assert torch.allclose(per_sample[f"_module.{name}"][i], p.grad, atol=1e-5, rtol=1e-4), name
