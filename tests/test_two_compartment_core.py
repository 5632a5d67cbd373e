"""The two-compartment glucose core (the glucose-insulin family's second structure): the minimal
core's guarantees (effects of the right sign by construction, parameters in range, mass kept,
basal steady state), an insulin response that lasts hours, forward-mode AD and a binding that
swaps in for the minimal core's."""

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from twinfed.models.cores import GlucoseBinding
from twinfed.models.cores.base import bounded, unbounded
from twinfed.models.cores.glucose import GlucoseInsulinCore
from twinfed.models.cores.two_compartment import (
    PARAMS,
    WARMUP_STEPS,
    TwoCompartmentBinding,
    TwoCompartmentCore,
    hypo_multiplier,
)
from twinfed.models.spec import load_spec

SPEC = load_spec("glucose")
K = SPEC.horizon_steps
L = WARMUP_STEPS
F64 = torch.float64

z_vectors = st.lists(st.floats(-8, 8), min_size=len(PARAMS), max_size=len(PARAMS))
amounts = st.lists(st.floats(0, 12), min_size=K, max_size=K)
history_amounts = st.lists(st.floats(0, 12), min_size=L, max_size=L)


def _t(a):
    return torch.tensor([a], dtype=F64)


def _theta(z, weight=70.0):
    return bounded(torch.tensor([z], dtype=F64), PARAMS, _t(weight))


def _run(theta, insulin_past, carbs_past, insulin, carbs, g0=140.0, carry=False):
    core = TwoCompartmentCore(5).double()
    state = core.warmup(theta, _t(insulin_past), _t(carbs_past), torch.ones(1, len(insulin_past), dtype=F64))
    return core(theta, state, _t(g0), _t(insulin), _t(carbs), carry=carry)


def _forecast(theta, insulin_past, carbs_past, insulin, carbs, g0=140.0):
    return _run(theta, insulin_past, carbs_past, insulin, carbs, g0)[0].numpy()


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
    # ... and insulin given earlier (on board now, acting slowly) works the same way, as does
    # carbohydrate eaten earlier.
    past_more = list(past_i)
    past_more[-1 - at * 5] += extra
    assert (_forecast(theta, past_more, past_c, ins, carbs, g0) <= base + 1e-9).all()
    past_more_c = list(past_c)
    past_more_c[-1 - at] += extra * 10
    assert (_forecast(theta, past_i, past_more_c, ins, carbs, g0) >= base - 1e-9).all()


# Corners of the ranges as often as inner values: where a structure's sign would break.
corner_z_vectors = st.lists(st.one_of(st.sampled_from([-8.0, 8.0]), st.floats(-8, 8)),
                            min_size=len(PARAMS), max_size=len(PARAMS))
# Hovorka's own form (insulin transporting glucose into the non-accessible compartment, whence it
# returns) breaks the sign here: 10 U more leaves glucose 6.8 mg/dL higher 8 h later.
RETURNING_CORNER = [8.0 if p.name in ("si", "slow", "ka1", "sg") else -8.0 if p.name in ("se", "basal", "k12")
                    else 0.0 for p in PARAMS]


@pytest.mark.studies  # 8 h of steps per example: kept out of the 10-minute suite
@settings(max_examples=40, deadline=None)
@given(z=corner_z_vectors, g0=st.floats(40, 400), dose=st.floats(0.1, 20), meal=st.floats(0, 150),
       at=st.integers(0, 11))
@example(z=RETURNING_CORNER, g0=140.0, dose=10.0, meal=0.0, at=0)
def test_over_a_long_horizon_too_insulin_never_raises_and_carbohydrate_never_lowers_glucose(
        z, g0, dose, meal, at):
    """Eight hours continued step after step (as a trial's roll-forward does): glucose an action
    parked in the non-accessible compartment would bring back later would show here."""
    theta = _theta(z)
    b = float(theta["basal"]) * 5 / 60
    steps = 96
    ins, carbs = [b] * steps, [0.0] * steps
    carbs[0] = meal
    base = _forecast(theta, [b] * L, [0.0] * L, ins, carbs, g0)
    more = list(ins)
    more[at] += dose
    assert (_forecast(theta, [b] * L, [0.0] * L, more, carbs, g0) <= base + 1e-9).all()
    fed = list(carbs)
    fed[at] += dose * 10
    assert (_forecast(theta, [b] * L, [0.0] * L, ins, fed, g0) >= base - 1e-9).all()


@settings(max_examples=40, deadline=None)
@given(z=z_vectors, ins=st.lists(st.floats(0, 100), min_size=K, max_size=K),
       carbs=st.lists(st.floats(0, 300), min_size=K, max_size=K),
       past_i=st.lists(st.floats(0, 100), min_size=L, max_size=L),
       past_c=st.lists(st.floats(0, 300), min_size=L, max_size=L), g0=st.floats(20, 600),
       weight=st.floats(1, 400))
def test_glucose_stays_within_10_and_1000_and_absorption_never_exceeds_what_was_given(
        z, ins, carbs, past_i, past_c, g0, weight):
    theta = _theta(z, weight)
    path, end = _run(theta, past_i, past_c, ins, carbs, g0, carry=True)
    assert torch.isfinite(path).all()
    assert ((path >= 10.0) & (path <= 1000.0)).all()
    assert float(end["g2"]) >= 0
    # Carbohydrate still in the gut is never negative nor more than was eaten.
    on_board = float(end["q1"] + end["q2"])
    assert -1e-9 <= on_board <= sum(past_c) + sum(carbs) + 1e-6
    # Insulin: the depots start at the basal steady state; what left them (absorbed) is at least 0
    # and at most what they held plus what was given.
    start = float(theta["basal"] / 60.0 * theta["tau_i"] * 2)
    depot = float(end["s1"] + end["s2"])
    assert depot >= -1e-9
    absorbed = start + sum(past_i) + sum(ins) - depot
    assert -1e-6 <= absorbed <= start + sum(past_i) + sum(ins) + 1e-9


@settings(max_examples=60, deadline=None)
@given(z=z_vectors, weight=st.floats(1, 400))
def test_every_parameter_stays_in_its_range_and_maps_back(z, weight):
    w = _t(weight)
    theta = bounded(torch.tensor([z], dtype=F64), PARAMS, w)
    for p in PARAMS:
        scale = (weight / 70.0) ** p.per_kg
        assert p.lo * scale * (1 - 1e-9) <= float(theta[p.name]) <= p.hi * scale * (1 + 1e-9), p.name
    again = bounded(unbounded(theta, PARAMS, w), PARAMS, w)
    for p in PARAMS:
        assert float(again[p.name]) == pytest.approx(float(theta[p.name]), rel=1e-3)


@pytest.mark.parametrize("z", [0.0, -6.0, 6.0, "mixed"])
def test_without_food_and_at_the_basal_rate_glucose_stays_at_its_basal_level(z):
    zs = [((-1) ** i) * 5.0 for i in range(len(PARAMS))] if z == "mixed" else [z] * len(PARAMS)
    theta = _theta(zs)
    basal_step = float(theta["basal"]) * 5 / 60
    g = _forecast(theta, [basal_step] * L, [0.0] * L, [basal_step] * 48, [0.0] * 48, g0=float(theta["gb"]))
    assert np.allclose(g, float(theta["gb"]), atol=1e-6)


def test_the_hypoglycaemia_multiplier_is_one_above_100_and_grows_below():
    g = torch.tensor([400.0, 100.0, 80.0, 60.0, 50.0, 30.0], dtype=F64)
    m = hypo_multiplier(g)
    assert m[0] == m[1] == 1.0
    assert (m[1:].diff() >= 0).all() and m[3] == pytest.approx(2.04, abs=0.01)


def test_a_forecast_continued_from_its_carried_state_is_the_longer_forecast():
    theta = _theta([0.3 * (i % 3 - 1) for i in range(len(PARAMS))])
    rng = np.random.default_rng(0)
    past_i, past_c = list(rng.exponential(0.3, L)), list(rng.exponential(2, L) * (rng.random(L) < 0.1))
    ins, carbs = list(rng.exponential(0.3, 2 * K)), [0.0] * 3 + [40.0] + [0.0] * (2 * K - 4)
    whole = _forecast(theta, past_i, past_c, ins, carbs)
    first, end = _run(theta, past_i, past_c, ins[:K], carbs[:K], carry=True)
    core = TwoCompartmentCore(5).double()
    second = core(theta, end, first[..., -1], _t(ins[K:]), _t(carbs[K:]))
    assert np.allclose(np.concatenate([first[0].numpy(), second[0].numpy()]), whole, atol=1e-10)


# Parameters of a Hovorka-type patient, in range: the structure fitted to the responses of the
# Hovorka simulator's median patient (70 kg, basal 0.79 U/h, fasting 135 mg/dL) to a 2 U bolus, a
# 30% basal rise and a 50 g meal, rounded.
SLOW_PATIENT = {"si": 0.53, "slow": 0.87, "ka1": 0.019, "se": 137.0, "basal": 0.786, "gb": 135.0,
                "sg": 0.0003, "k12": 0.11, "tau_i": 83.0, "tau_c": 37.0, "cf": 13.2}


def _insulin_response(theta, hours, bolus=0.0, basal_factor=1.0):
    """Glucose change from the fasting basal steady state (mg/dL) at each whole hour."""
    core = TwoCompartmentCore(5).double()
    b = float(theta["basal"]) * 5 / 60
    state = core.warmup(theta, _t([b] * L), _t([0.0] * L), torch.ones(1, L, dtype=F64))
    steps = hours * 12
    ins = [b * basal_factor] * steps
    ins[0] += bolus
    path = core(theta, state, _t(float(theta["gb"])), _t(ins), _t([0.0] * steps))[0]
    return {h: float(path[h * 12 - 1]) - float(theta["gb"]) for h in range(1, hours + 1)}


def test_insulin_can_still_act_strongly_after_4_8_and_12_hours():
    """A Hovorka-type patient's 2 U bolus at fasting lowers glucose by about 34 / 54 / 42 mg/dL
    at 2 / 4 / 8 h, and a 30% basal rise by about 54 mg/dL at 12 h (the minimal core, fitted,
    reaches 22 / 33 / 20 and 33): parameters in range reach at least 80% of that at 4, 8 and 12 h."""
    for p in PARAMS:
        assert p.lo <= SLOW_PATIENT[p.name] <= p.hi, p.name
    theta = {k: _t(v) for k, v in SLOW_PATIENT.items()}
    effect = _insulin_response(theta, 8, bolus=2.0)
    assert effect[2] < -0.6 * 34 and effect[4] <= 0.8 * -54 and effect[8] <= 0.8 * -42, effect
    assert _insulin_response(theta, 12, basal_factor=1.3)[12] <= 0.8 * -54


def test_forward_mode_jacobian_of_the_forecast_wrt_z_is_finite_and_per_row():
    rng = np.random.default_rng(1)
    n = 3
    z = torch.tensor(rng.normal(0, 2, (n, len(PARAMS))))
    w = torch.tensor([50.0, 70.0, 120.0], dtype=F64)
    past_i = torch.tensor(rng.exponential(0.3, (n, L)))
    past_c = torch.tensor(rng.exponential(2, (n, L)) * (rng.random((n, L)) < 0.1))
    ins, carbs = torch.tensor(rng.exponential(0.3, (n, K))), torch.tensor(rng.exponential(2, (n, K)))
    core = TwoCompartmentCore(5).double()

    def forecast(z):
        theta = bounded(z, PARAMS, w)
        state = core.warmup(theta, past_i, past_c, torch.ones(n, L, dtype=F64))
        return core(theta, state, torch.tensor([90.0, 140.0, 250.0], dtype=F64), ins, carbs)

    jac = torch.func.jacfwd(forecast)(z)  # [n, K, n, P]
    assert torch.isfinite(jac).all()
    assert jac[0, :, 0].abs().sum() > 0
    for i in range(n):  # a row reads only its own patient's parameters
        for j in range(n):
            if i != j:
                assert (jac[i, :, j] == 0).all()
    back = torch.autograd.functional.jacobian(forecast, z)
    assert torch.allclose(jac, back, atol=1e-8, rtol=1e-6)


def test_clinical_reports_every_term_the_minimal_core_reports_in_the_same_meaning():
    theta = _theta([0.0] * len(PARAMS))
    core = TwoCompartmentCore(5).double()
    b = float(theta["basal"]) * 5 / 60
    ones = torch.ones(1, L, dtype=F64)
    state = core.warmup(theta, _t([b] * (L - 1) + [b + 3.0]), _t([0.0] * (L - 1) + [50.0]), ones)
    terms = core.clinical(theta, state)
    minimal = GlucoseInsulinCore(5).double()
    mtheta = bounded(torch.zeros(1, 8, dtype=F64), minimal.PARAMS, _t(70.0))
    assert set(minimal.clinical(mtheta, minimal.warmup(mtheta, _t([0.0] * L), _t([0.0] * L), ones))) <= set(terms)
    assert 2.5 < float(terms["insulin_on_board_u"]) <= 3.0  # the bolus of the last step, barely absorbed
    assert 45.0 < float(terms["carbs_on_board_g"]) <= 50.0
    assert float(terms["carb_ratio_g_per_u"]) == pytest.approx(
        float(terms["insulin_sensitivity_mgdl_per_u"] / terms["carb_factor_mgdl_per_g"]))
    assert float(terms["basal_u_per_h"]) == pytest.approx(float(theta["basal"]))


def _inputs(n, rng):
    lc = SPEC.context_length
    states = torch.tensor(rng.uniform(60, 250, (n, lc, 1)))
    controls = torch.tensor(np.stack([rng.exponential(0.3, (n, lc)),
                                      rng.exponential(2.0, (n, lc)) * (rng.random((n, lc)) < 0.05)], -1))
    future = torch.tensor(np.stack([rng.exponential(0.3, (n, K)), rng.exponential(2.0, (n, K))], -1))
    cov = torch.tensor(np.stack([rng.uniform(40, 120, n), rng.uniform(5, 90, n)], -1))
    return {"states": states, "controls": controls, "mask": torch.ones(n, lc, dtype=F64), "future": future,
            "covariates": cov}


def test_the_binding_reads_the_same_roles_as_the_minimal_one_and_warms_up_over_the_last_steps():
    binding, minimal = TwoCompartmentBinding(SPEC), GlucoseBinding(SPEC)
    assert binding.index == minimal.index and binding.state_roles == minimal.state_roles
    assert binding.warmup == minimal.warmup == min(WARMUP_STEPS, SPEC.context_length)
    binding.core.double()
    u = _inputs(4, np.random.default_rng(2))
    z = torch.zeros(4, len(PARAMS), dtype=F64)
    path, parts = binding.forecast(z, u)
    assert path.shape == (4, K, len(SPEC.states)) and torch.isfinite(path).all()
    assert torch.allclose(parts["theta"]["si"] * u["covariates"][:, 0] / 70.0,
                          torch.full((4,), PARAMS[0].typical, dtype=F64))
    # Insulin before the warm-up changes nothing; insulin inside it lowers the forecast.
    early, late = {**u, "controls": u["controls"].clone()}, {**u, "controls": u["controls"].clone()}
    early["controls"][:, -binding.warmup - 1, 0] += 5.0
    late["controls"][:, -3, 0] += 5.0
    assert torch.equal(binding.forecast(z, early)[0], path)
    assert (binding.forecast(z, late)[0] < path).any() and (binding.forecast(z, late)[0] <= path).all()
    # A continued forecast from the carried state.
    paths, end = binding.run(parts["theta"], parts["state"], u, carry=True)
    assert torch.equal(paths["glucose"], path[..., 0]) and "g2" in end
    assert set(binding.clinical(z, u)) >= set(minimal.clinical(torch.zeros(4, 8, dtype=F64), u))


def _alone():
    """The glucose spec with this structure as its core's only one."""
    from twinfed.models.spec import parse_spec

    line = f'name = "{SPEC.core.name}"\n'
    return parse_spec(SPEC.to_toml().replace(line, line + 'structures = ["two-compartment"]\n', 1))


def test_a_hybrid_twin_runs_it_alone_in_float32_with_opacus_per_patient_gradients_matching_autograd():
    from opacus import GradSampleModule

    from twinfed.models.hybrid import HybridSurrogate
    from twinfed.models.plan import ModelConfig

    torch.manual_seed(1)
    spec = _alone()
    model = HybridSurrogate(spec, ModelConfig(kind="hybrid", hidden=8, layers=1))
    assert isinstance(model.binding, TwoCompartmentBinding)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    rng = np.random.default_rng(1)
    u = _inputs(12, rng)
    ctx = torch.cat([u["states"], u["controls"]], -1).reshape(12, -1)
    x = torch.cat([ctx, u["mask"], u["future"].reshape(12, -1), u["covariates"]], -1).float().reshape(4, 3, -1)
    assert model.unpack(x)["future"].shape == (4, 3, K, 2)  # the layout HybridSurrogate.unpack reads
    y = torch.randn(4, 3, model.inputs.n_outputs)
    out = model(x)
    assert torch.isfinite(out).all()
    gsm = GradSampleModule(model, loss_reduction="sum")
    ((gsm(x) - y) ** 2).sum().backward()
    per_sample = {name: p.grad_sample.clone() for name, p in gsm.named_parameters()}
    gsm.cleanup()
    for i in range(4):
        model.zero_grad()
        ((model(x[i: i + 1]) - y[i: i + 1]) ** 2).sum().backward()
        for name, p in model.named_parameters():
            assert torch.isfinite(p.grad).all(), name
            assert torch.allclose(per_sample[f"_module.{name}"][i], p.grad, atol=1e-5, rtol=1e-4), name


@settings(max_examples=30, deadline=None)
@given(z=corner_z_vectors, past_i=st.lists(st.floats(0, 30), min_size=L, max_size=L),
       ins=st.lists(st.floats(0, 30), min_size=K, max_size=K), g0=st.floats(20, 600))
def test_in_float32_at_any_parameters_the_forecast_and_its_gradient_are_finite(z, past_i, ins, g0):
    core = TwoCompartmentCore(5)
    zt = torch.tensor([z], dtype=torch.float32, requires_grad=True)
    theta = bounded(zt, PARAMS, torch.tensor([70.0]))
    f32 = lambda a: torch.tensor([a], dtype=torch.float32)  # noqa: E731
    state = core.warmup(theta, f32(past_i), torch.zeros(1, L), torch.ones(1, L))
    path = core(theta, state, f32(g0), f32(ins), torch.zeros(1, K))
    assert torch.isfinite(path).all() and ((path >= 10) & (path <= 1000)).all()
    path.sum().backward()
    assert torch.isfinite(zt.grad).all()
