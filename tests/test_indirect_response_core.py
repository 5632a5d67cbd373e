"""The cardio core's indirect-response structure: the effect-compartment structure's guarantees
(the drug never raises pressure nor lowers heart rate, activity never lowers either, parameters in
range, drug mass conserved, untreated states at their set points), a response shape the effect
compartment cannot make, and a binding that reads the cardio roles exactly as CardioBinding."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from twinfed.models.cores import CardioBinding
from twinfed.models.cores.base import bounded
from twinfed.models.cores.cardio import PARAMS as EFFECT_PARAMS, CardioCore, age_scales
from twinfed.models.cores.indirect_response import (PARAMS, IndirectResponseBinding, IndirectResponseCore,
                                                    VD_L_PER_KG)
from twinfed.models.spec import load_spec

SPEC = load_spec("cardio")
K, L, H = SPEC.horizon_steps, SPEC.context_length, float(SPEC.step_minutes)
BINDING = IndirectResponseBinding(SPEC)
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


def _forecast(z, u, binding=BINDING) -> np.ndarray:
    """SBP and heart rate ``[k, 2]``."""
    return binding.forecast(torch.tensor([z], dtype=torch.float64), u)[0][0].numpy()


def _typical(**values) -> dict[str, torch.Tensor]:
    theta = bounded(torch.zeros(1, len(PARAMS), dtype=torch.float64), PARAMS, None)
    theta.update({k: torch.tensor([v], dtype=torch.float64) for k, v in values.items()})
    return theta


def _untreated(core, theta, dose_mg, steps, weight=70.0):
    """SBP and heart rate over ``steps`` after ``dose_mg`` taken at the origin by a patient at
    rest, untreated for the day before and at the set points."""
    zeros = torch.zeros(1, L, dtype=torch.float64)
    state = core.warmup(theta, zeros, zeros, zeros + 1)
    dose = torch.zeros(1, steps, dtype=torch.float64)
    dose[0, 0] = dose_mg / weight
    sbp, hr = core(theta, state, theta["sbp0"], theta["hr0"], dose, torch.zeros_like(dose))
    return sbp[0].numpy(), hr[0].numpy()


# -- the guarantees ---------------------------------------------------------------------------


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


@pytest.mark.studies  # kept out of the 10-minute suite (the drug test runs there)
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


@settings(max_examples=40, deadline=None)
@given(z=z_vectors, dose=plans, act=levels, doses=past_doses, sbp=st.sampled_from([45.0, 295.0]),
       hr=st.sampled_from([22.0, 245.0]), extra=st.floats(50, 5000), at=st.integers(0, K - 1))
def test_at_the_physiological_limits_the_clamps_keep_the_inequalities(z, dose, act, doses, sbp, hr, extra, at):
    # readings next to the clamps, and huge doses that drive the targets through them
    base = _forecast(z, _u(_doses(doses), np.zeros(L), dose, act, sbp, hr))
    more = list(dose)
    more[at] += extra
    out = _forecast(z, _u(_doses(doses), np.zeros(L), more, act, sbp, hr))
    assert (out[:, 0] <= base[:, 0] + 1e-9).all() and (out[:, 1] >= base[:, 1] - 1e-9).all()
    assert (out[:, 0] >= 40.0).all() and (out[:, 0] <= 300.0).all()
    assert (out[:, 1] >= 20.0).all() and (out[:, 1] <= 250.0).all()


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
    step = IndirectResponseCore.kinetics(theta, h)
    g = a = torch.zeros(1, dtype=torch.float64)
    given_total = absorbed_total = 0.0
    for amount in amounts:
        g, a, c, absorbed = IndirectResponseCore._pk(g, a, torch.tensor([amount], dtype=torch.float64), h, step)
        given_total += amount
        absorbed_total += float(absorbed)
        assert float(g) >= 0 and float(a) >= 0 and float(c) >= 0
        assert absorbed_total <= given_total + 1e-9
        assert float(g) + absorbed_total == pytest.approx(given_total, rel=1e-9, abs=1e-9)
        assert float(a) <= absorbed_total + 1e-9  # elimination only takes away


@settings(max_examples=30, deadline=None)
@given(z=z_vectors, amount=st.floats(0, 3), n=st.sampled_from([2, 6, 12]))
def test_the_kinetics_step_and_its_mean_concentration_are_exact_whatever_its_length(z, amount, n):
    theta = bounded(torch.tensor([z], dtype=torch.float64), PARAMS, None)
    g0, a0 = torch.tensor([0.3], dtype=torch.float64), torch.tensor([0.2], dtype=torch.float64)
    amt = torch.tensor([amount], dtype=torch.float64)
    g1, a1, c1, _ = IndirectResponseCore._pk(g0, a0, amt, 5.0 * n, IndirectResponseCore.kinetics(theta, 5.0 * n))
    g, a, small, auc = g0, a0, IndirectResponseCore.kinetics(theta, 5.0), 0.0
    for _ in range(n):
        g, a, c, _ = IndirectResponseCore._pk(g, a, amt / n, 5.0, small)
        auc = auc + c * 5.0
    assert torch.allclose(torch.cat([g1, a1, c1 * 5.0 * n]), torch.cat([g, a, auc]), rtol=1e-9, atol=1e-12)


def test_without_drug_or_activity_readings_at_the_set_point_stay_there():
    z = np.random.default_rng(0).uniform(-3, 3, len(PARAMS)).tolist()
    u = _u(np.zeros(L), np.zeros(L), np.zeros(K), np.zeros(K), weight=82.0, age=64.0)
    theta = BINDING.theta(torch.tensor([z], dtype=torch.float64), u)
    sbp0, hr0 = float(theta["sbp0"]), float(theta["hr0"])
    out = _forecast(z, _u(np.zeros(L), np.zeros(L), np.zeros(K), np.zeros(K), sbp0, hr0, 82.0, 64.0))
    assert np.allclose(out[:, 0], sbp0, atol=1e-9) and np.allclose(out[:, 1], hr0, atol=1e-9)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_without_drug_or_activity_readings_off_the_set_point_relax_to_it_geometrically(seed):
    rng = np.random.default_rng(seed)
    theta = bounded(torch.tensor(rng.uniform(-3, 3, (1, len(PARAMS)))), PARAMS, None)
    core = IndirectResponseCore(H)
    zeros = torch.zeros(1, L, dtype=torch.float64)
    state = core.warmup(theta, zeros, zeros, zeros + 1)
    assert float(state["resistance"]) == 1.0 and float(state["gut"]) == float(state["central"]) == 0.0
    steps = 2000
    sbp0 = theta["sbp0"].item()
    sbp, hr = core(theta, state, torch.tensor([sbp0 + 30.0], dtype=torch.float64),
                   torch.tensor([theta["hr0"].item() - 20.0], dtype=torch.float64),
                   torch.zeros(1, steps, dtype=torch.float64), torch.zeros(1, steps, dtype=torch.float64))
    alpha = np.exp(-H / theta["tau_p"].item())
    known = sbp0 + 30.0 * alpha ** np.arange(1, steps + 1)  # S' = (sbp0 - S) / tau_p, stepped exactly
    assert np.allclose(sbp[0].numpy(), known, rtol=1e-12, atol=1e-9)
    assert hr[0, -1].item() == pytest.approx(theta["hr0"].item(), abs=1e-6)


@pytest.mark.parametrize("seed", [4, 5, 6])
def test_a_steady_infusion_holds_resistance_pressure_and_heart_rate_at_their_steady_state(seed):
    # known answer: c = rate / (ke V), R = 1 - I(c), SBP = sbp0 R, HR = hr0 + baro (sbp0 - SBP)
    rng = np.random.default_rng(seed)
    theta = bounded(torch.tensor(rng.uniform(-2, 2, (1, len(PARAMS)))), PARAMS, None)
    theta["ke"] = theta["ke"].clamp(min=np.log(2) / 240)  # reach the steady state within 4 days
    theta["kout"] = theta["kout"].clamp(min=np.log(2) / 240)
    core, steps, per_step = IndirectResponseCore(H), 4 * 288, 0.01  # mg/kg every 5 minutes
    zeros = torch.zeros(1, L, dtype=torch.float64)
    state = core.warmup(theta, zeros, zeros, zeros + 1)
    dose = torch.full((1, steps), per_step, dtype=torch.float64)
    (sbp, hr), end = core(theta, state, theta["sbp0"], theta["hr0"], dose, torch.zeros_like(dose), carry=True)
    c = per_step / H / (theta["ke"].item() * VD_L_PER_KG)
    r = 1 - theta["imax"].item() * c / (theta["ic50"].item() + c)
    assert end["resistance"].item() == pytest.approx(r, rel=1e-6)
    assert sbp[0, -1].item() == pytest.approx(theta["sbp0"].item() * r, rel=1e-6)
    assert hr[0, -1].item() == pytest.approx(
        theta["hr0"].item() + theta["baro"].item() * theta["sbp0"].item() * (1 - r), rel=1e-6)
    clinical = core.clinical(theta, end)
    assert clinical["effect_site_concentration_mg_per_l"].item() == pytest.approx(c, rel=1e-4)
    assert clinical["sbp_lowering_now_mmhg"].item() == pytest.approx(theta["sbp0"].item() * (1 - r), rel=1e-6)


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


# -- a structure the effect compartment is not --------------------------------------------------


def _matched(z: float) -> tuple[dict, dict]:
    """Both structures' parameters at one point of their ranges, the indirect response's matched
    to the effect compartment's: the same kinetics and set points, resistance turning over as fast
    as the effect site equilibrates, the same maximal fall and half-maximal concentration."""
    effect = bounded(torch.full((1, len(EFFECT_PARAMS)), z, dtype=torch.float64), EFFECT_PARAMS, None)
    indirect = {p.name: effect[p.name] for p in PARAMS if p.name in effect}
    indirect.update(kout=effect["ke0"], imax=effect["emax"] / effect["sbp0"], ic50=effect["ec50"])
    return effect, indirect


def _trough_hours(core, theta, dose_mg, hours=36):
    sbp, _ = _untreated(core, theta, dose_mg, int(hours * 60 / H))
    return (int(np.argmin(sbp)) + 1) * H / 60.0, float(sbp.min() - theta["sbp0"].item())


@pytest.mark.parametrize("z", [-2.0, 0.0, 1.0])
def test_matched_structures_agree_on_a_small_dose_where_saturation_plays_no_part(z):
    # both are then the same linear filter of the concentration: a check that the matching is right
    effect, indirect = _matched(z)
    t_e, fall_e = _trough_hours(CardioCore(H), effect, 1.0)
    t_i, fall_i = _trough_hours(IndirectResponseCore(H), indirect, 1.0)
    assert abs(t_i - t_e) <= 0.5 and fall_i == pytest.approx(fall_e, rel=0.05)


@pytest.mark.parametrize("z", [-2.0, 0.0])
def test_a_larger_dose_peaks_later_under_the_indirect_response_but_not_under_the_effect_compartment(z):
    effect, indirect = _matched(z)
    e = [_trough_hours(CardioCore(H), effect, d) for d in (5.0, 200.0)]
    i = [_trough_hours(IndirectResponseCore(H), indirect, d) for d in (5.0, 200.0)]
    assert e[1][1] < e[0][1] and i[1][1] < i[0][1]  # both fall further
    assert abs(e[1][0] - e[0][0]) <= 0.25  # the effect compartment's trough: the same time
    assert i[1][0] >= i[0][0] + 1.5  # the indirect response's: hours later
    assert i[1][0] >= e[1][0] + 1.5  # and hours after the effect compartment's


# -- the binding ----------------------------------------------------------------------------------


def test_the_binding_reads_the_cardio_roles_as_cardio_binding_does():
    cardio = CardioBinding(SPEC)
    assert BINDING.index == cardio.index and BINDING.state_roles == cardio.state_roles
    assert BINDING.context == cardio.context == L
    assert [p.name for p in BINDING.params] == [p.name for p in PARAMS]
    u = _u(_doses([(L - 30, 20.0)]), np.zeros(L), [10.0] + [0.0] * (K - 1), np.zeros(K), age=70.0)
    z = torch.zeros(1, len(PARAMS), dtype=torch.float64)
    assert torch.allclose(BINDING.theta(z, u)["baro"], cardio.theta(z, u)["baro"])  # age moves its range alike
    # doses reach the core per kg: twice the weight and twice every dose forecast the same
    heavy = _u(_doses([(L - 30, 40.0)]), np.zeros(L), [20.0] + [0.0] * (K - 1), np.zeros(K), weight=140.0, age=70.0)
    assert np.allclose(_forecast(z[0].tolist(), u), _forecast(z[0].tolist(), heavy), rtol=1e-12)
    assert set(BINDING.clinical(z, u)) == set(cardio.clinical(z, u))


def test_a_forecast_continued_from_its_end_state_is_the_forecast_over_both_horizons():
    z = torch.tensor(np.random.default_rng(7).uniform(-2, 2, (1, len(PARAMS))))
    dose, act = np.r_[np.zeros(K - 3), 15.0, 0.0, 0.0], np.linspace(0, 1, K)
    past = _doses([(L - 50, 30.0), (L - 2, 10.0)])
    whole = BINDING.forecast(z, _u(past, np.zeros(L), np.r_[dose, dose], np.r_[act, act]))[0][0]
    first, info = BINDING.forecast(z, _u(past, np.zeros(L), dose, act))
    _, end = BINDING.run(info["theta"], info["state"], _u(past, np.zeros(L), dose, act), carry=True)
    u2 = _u(past, np.zeros(L), dose, act)
    u2["states"] = u2["states"].clone()
    u2["states"][0, -1] = first[0, -1]  # the last readings: where the first horizon ended
    second, _ = BINDING.continued(info["theta"], end, u2)
    assert torch.allclose(torch.cat([first[0], second[0]]), whole, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_forecasts_jacobian_in_the_unconstrained_parameters_is_finite(dtype):
    rng = np.random.default_rng(3)
    n = 6
    past_d = 20.0 * (rng.random((n, L)) < 0.01)
    past_a = rng.random((n, L)) * (rng.random((n, L)) < 0.1)
    u = {"states": torch.tensor(np.stack([rng.uniform(100, 190, (n, L)), rng.uniform(50, 110, (n, L))], -1)),
         "controls": torch.tensor(np.stack([past_d, past_a], -1)),
         "mask": torch.tensor((np.arange(L) >= rng.integers(0, L // 2, (n, 1))).astype(float)),
         "future": torch.tensor(np.stack([20.0 * (rng.random((n, K)) < 0.2), rng.random((n, K))], -1)),
         "covariates": torch.tensor(np.stack([rng.uniform(40, 120, n), rng.uniform(12, 90, n)], -1))}
    u = {k: v.to(dtype) for k, v in u.items()}
    z = torch.tensor(rng.uniform(-6, 6, (n, len(PARAMS))), dtype=dtype)
    jac = torch.func.jacfwd(lambda shift: BINDING.forecast(z + shift, u)[0])(torch.zeros(len(PARAMS), dtype=dtype))
    assert jac.shape == (n, K, 2, len(PARAMS))
    assert torch.isfinite(jac).all() and (jac != 0).any()
