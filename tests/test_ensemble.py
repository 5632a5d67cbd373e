"""An ensemble twin (issue 21 item 1): several structurally different cores of one family on the
same roles, each trained and identified on its own, their mean the forecast, and their spread in
every what-if and trial interval."""

import numpy as np
import pytest
import torch

from twinfed.errors import SpecError
from twinfed.models.cores import MEMBER, EnsembleBinding
from twinfed.models.hybrid import HybridSurrogate
from twinfed.models.plan import ModelConfig, TrainingPlan
from twinfed.models.spec import CORE_STRUCTURES, load_spec, parse_spec
from twinfed.models.trial import (
    contributions, layout, plan_structures, sensitivity, summarise,
)

from test_trial_engine import Z, _arms, _design

GLUCOSE = load_spec("glucose")
CARDIO = load_spec("cardio")


def with_structures(spec, structures) -> object:
    """``spec`` with its core's ``structures`` declared (None: the key left out)."""
    line = f'name = "{spec.core.name}"\n'
    listed = "" if structures is None else "structures = [" + ", ".join(f'"{s}"' for s in structures) + "]\n"
    return parse_spec(spec.to_toml().replace(line, line + listed, 1))


ENSEMBLE = with_structures(GLUCOSE, CORE_STRUCTURES["glucose-insulin"])


# -- the spec ------------------------------------------------------------------------------------

def test_a_spec_without_structures_runs_its_familys_default_alone_and_keeps_its_text():
    assert GLUCOSE.core.structures is None and GLUCOSE.core.members == ("minimal",)
    assert CARDIO.core.members == ("effect-compartment",)
    assert "structures" not in GLUCOSE.to_toml()  # existing specs (and plans' hashes) unchanged


def test_declared_structures_round_trip_through_the_specs_text():
    assert ENSEMBLE.core.members == ("minimal", "two-compartment")
    assert parse_spec(ENSEMBLE.to_toml()) == ENSEMBLE


@pytest.mark.parametrize("structures, message", [
    (["minimal", "hovorka"], "no structure 'hovorka'; its structures are minimal, two-compartment"),
    (["minimal", "minimal"], "structures must not repeat"),
    ([], "at least 1"),
])
def test_an_unknown_repeated_or_empty_structure_list_is_a_one_line_error(structures, message):
    with pytest.raises(SpecError, match=message) as err:
        with_structures(GLUCOSE, structures)
    assert "\n" not in str(err.value)


# -- the trial's release and summary -------------------------------------------------------------

TWO_ARMS = _design(_arms(("usual-care", "recorded"), ("more", "insulin_u*1.2")),
                   outcomes='["mean_glucose", "time_in_range"]')
STRUCTURES = ("minimal", "two-compartment")


def _structure_values(n=40, gap=6.0, seed=0):
    """[P, M, A, O]: the second structure's effect of ``more`` is ``gap`` mg/dL stronger."""
    rng = np.random.default_rng(seed)
    base = rng.normal(150, 20, n)
    first = np.stack([np.stack([base, rng.uniform(40, 80, n)], -1),
                      np.stack([base - 10 + rng.normal(0, 3, n), rng.uniform(40, 80, n)], -1)], 1)
    second = first.copy()
    second[:, 1, 0] -= gap
    return np.stack([first, second], 1)


def test_an_ensembles_release_adds_each_later_structures_differences_and_stays_within_its_sensitivity():
    names = layout(TWO_ARMS, STRUCTURES)
    extra = [n for n in names if "@" in n[0]]
    assert extra == [("arm@two-compartment", a, o, "sum") for a in ("usual-care", "more")
                     for o in ("mean_glucose", "time_in_range")] + \
        [("contrast@two-compartment", "more", o, "sum") for o in ("mean_glucose", "time_in_range")]
    assert len(names) == len(layout(TWO_ARMS)) + 6 and names[-1][0] == "count"
    sv = _structure_values()
    rows = contributions(sv.mean(1), TWO_ARMS, sv)
    assert rows.shape == (40, len(names))
    assert (np.linalg.norm(rows, axis=1) <= sensitivity(TWO_ARMS, STRUCTURES) * (1 + 1e-12)).all()
    assert np.array_equal(contributions(sv.mean(1), TWO_ARMS), rows[:, [i for i, n in enumerate(names)
                                                                        if "@" not in n[0]]])


def test_the_summary_is_the_structures_mean_and_its_interval_carries_their_spread():
    sv = _structure_values(gap=6.0)
    values = sv.mean(1)
    total = contributions(values, TWO_ARMS, sv).sum(0)
    plain = summarise(contributions(values, TWO_ARMS).sum(0), TWO_ARMS, GLUCOSE)
    both = summarise(total, TWO_ARMS, GLUCOSE, structures=STRUCTURES)
    got, base = both["contrasts"]["more"]["mean_glucose"], plain["contrasts"]["more"]["mean_glucose"]
    per = {s: float(np.mean(sv[:, m, 1, 0] - sv[:, m, 0, 0])) for m, s in enumerate(STRUCTURES)}
    assert got["structures"] == pytest.approx(per, rel=1e-9)
    assert per["two-compartment"] == pytest.approx(per["minimal"] - 6.0)
    assert got["mean"] == pytest.approx(base["mean"], rel=1e-12)  # the structures' mean
    half, base_half = (got["ci95"][1] - got["ci95"][0]) / 2, (base["ci95"][1] - base["ci95"][0]) / 2
    # the variance of the two structures' estimates (6^2 / 2) is added to the mean's
    assert half == pytest.approx(Z * np.sqrt((base_half / Z) ** 2 + 18.0), rel=1e-9)
    assert "2 core structures (minimal, two-compartment)" in both["interval"]
    # where the structures agree (the usual-care arm's time in range is the same), no widening
    arm, arm_base = (r["arms"]["usual-care"]["outcomes"]["time_in_range"] for r in (both, plain))
    assert arm["ci95"] == pytest.approx(arm_base["ci95"], rel=1e-12)


def test_a_trial_plan_knows_its_twins_structures_without_the_weights():
    assert plan_structures(TrainingPlan(spec=ENSEMBLE, rounds=1)) == STRUCTURES
    assert plan_structures(TrainingPlan(spec=GLUCOSE, rounds=1)) == ()
    assert plan_structures(TrainingPlan(spec=ENSEMBLE, rounds=1, model=ModelConfig(kind="mlp-residual"))) == ()


# -- the binding and the twin ---------------------------------------------------------------------

CARDIO_ENSEMBLE = with_structures(CARDIO, CORE_STRUCTURES["cardio"])


def _inputs(spec, n=5, seed=0):
    """Random but physiological hybrid inputs ``u`` for ``n`` windows, and a twin of ``spec``."""
    torch.manual_seed(seed)
    model = HybridSurrogate(spec, ModelConfig(kind="hybrid", hidden=8, layers=1))
    x = torch.zeros(n, model.inputs.n_features)
    u = model.unpack(x)
    lo = torch.tensor([c.min for c in spec.states])
    hi = torch.tensor([c.max for c in spec.states])
    u["states"][:] = lo + (hi - lo) * (0.3 + 0.2 * torch.rand_like(u["states"]))
    u["mask"][:] = 1.0
    u["controls"][..., 0] = (torch.rand_like(u["controls"][..., 0]) < 0.02) * 40.0
    u["future"][..., 0] = (torch.rand_like(u["future"][..., 0]) < 0.2) * 40.0
    u["covariates"][:] = torch.tensor([75.0, 55.0])
    return model, u


def test_an_ensembles_parameters_are_its_structures_side_by_side_and_its_forecast_their_mean():
    model, u = _inputs(CARDIO_ENSEMBLE)
    binding = model.binding
    assert isinstance(binding, EnsembleBinding) and binding.names == ("effect-compartment", "indirect-response")
    first, second = binding.members
    names = [p.name for p in binding.params]
    assert names[:len(first.params)] == [p.name for p in first.params]
    assert names[len(first.params):] == [f"indirect-response.{p.name}" for p in second.params]
    z = torch.randn(5, len(names)) * 0.5
    members = binding.member_forecasts(z, u)  # [5, 2, K, S]
    assert members.shape == (5, 2, CARDIO.horizon_steps, 2)
    assert torch.equal(members[:, 0], first.forecast(z[:, :len(first.params)], u)[0])
    assert torch.equal(members[:, 1], second.forecast(z[:, len(first.params):], u)[0])
    assert not torch.allclose(members[:, 0], members[:, 1])  # structurally different
    torch.testing.assert_close(binding.forecast(z, u)[0], members.mean(1))
    # theta[MEMBER] runs each row's own structure alone
    theta = binding.theta(z, u)
    state = binding.origin(theta, u)
    theta[MEMBER] = torch.tensor([0, 1, 1, 0, 1])
    picked, _ = binding.continued(theta, state, u)
    for row, m in enumerate([0, 1, 1, 0, 1]):
        assert torch.equal(picked[row], members[row, m])


def test_an_ensemble_twin_fits_each_structure_in_training_and_forecasts_their_mean_otherwise():
    model, u = _inputs(CARDIO_ENSEMBLE)
    z = model.parameters_of(u)
    corr = model.corrections(u)
    members = model.member_outputs(u, z, corr)
    assert members.shape == (5, 2, model.inputs.n_outputs)
    torch.testing.assert_close(model.outputs(u, z, corr), members.mean(1))
    single, su = _inputs(CARDIO)
    assert single.member_outputs(su, single.parameters_of(su), single.corrections(su)).shape == \
        (5, 1, single.inputs.n_outputs)
    assert single.n_structures == 1 and model.n_structures == 2
    # the encoder gives every structure its parameters
    assert model.encoder[-1].out_features == len(model.binding.params) == 2 * len(single.binding.params)


@pytest.fixture(scope="module")
def cardio_site(tmp_path_factory):
    from twinfed.models.cohort import generate_cohort
    from twinfed.models.site_data import load_site

    root = tmp_path_factory.mktemp("cardio-ensemble")
    generate_cohort("cardio", sites=1, patients=6, days=3, seed=0, out=root)
    return load_site(root / "site-a", CARDIO_ENSEMBLE)


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_an_ensembles_dp_step_fits_each_structure_per_patient_alike_on_both_per_sample_paths(cardio_site):
    """The node's fast per-patient gradients and Opacus's hooks give the same clipped, noised
    update of an ensemble, whose loss is each structure's error (not their mean's)."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    from twinfed.models.surrogate import build_surrogate, get_weights, inputs_for
    from twinfed.models.train import PatientWindows, run_steps
    from twinfed.privacy.dp import DPSettings, make_private

    config = ModelConfig(kind="hybrid")
    data = PatientWindows(cardio_site, seed=3, windows_per_patient=4, inputs=inputs_for(CARDIO_ENSEMBLE, config))
    x, y = data.draw(np.arange(6))

    def model():
        net = build_surrogate(CARDIO_ENSEMBLE, config)
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        return net

    net = model()
    net.train()
    out = net(x)
    assert out.shape == (6, 4, 2, y.shape[-1])  # each structure's forecast, fitted on its own
    dp = DPSettings(noise_multiplier=0.7, clipping_norm=0.05, sample_rate=0.5, expected_batch=4)
    ref_net = model()
    module = GradSampleModule(ref_net)
    opt = DPOptimizer(torch.optim.Adam(ref_net.parameters(), lr=0.01), noise_multiplier=0.7, max_grad_norm=0.05,
                      expected_batch_size=4, generator=torch.Generator().manual_seed(11))
    opt.zero_grad(set_to_none=True)
    pred = module(x)
    (((pred - y.unsqueeze(-2)) ** 2).sum() / pred.numel()).backward()
    opt.step()
    module.cleanup()
    fast_net = model()
    fast, fast_opt = make_private(fast_net, torch.optim.Adam(fast_net.parameters(), lr=0.01), dp, method="linear")
    fast_opt.generator = torch.Generator().manual_seed(11)
    try:
        run_steps(fast, fast_opt, [(x, y)], 1)
    finally:
        fast.cleanup()
    for a, b in zip(get_weights(fast_net), get_weights(ref_net)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert all(np.abs(a - b).max() > 0 for a, b in zip(get_weights(fast_net), get_weights(model())))


@pytest.mark.studies  # identification of 24 parameters per patient: about 20 s
def test_an_ensembles_trial_runs_each_structure_on_its_own_draws_and_its_interval_carries_their_spread(cardio_site):
    from twinfed.models.arms import parse_design
    from twinfed.models.surrogate import build_surrogate, get_weights
    from twinfed.models.trial import run_site_trial
    from twinfed.models.twin import Twin

    design = parse_design("""
[trial]
name = "dose"
purpose = "in-silico-trial"
reference = "usual-care"
start_hours = 36
duration_days = 1
outcomes = ["mean_sbp", "time_above_140"]
draws = 1
seed = 3

[[trial.arms]]
name = "usual-care"
scenario = "recorded"

[[trial.arms]]
name = "again"
scenario = "recorded"

[[trial.arms]]
name = "forty"
rule = { kind = "daily-dose", control = "dose_mg", amount = 40.0, times_min = [480] }
""", CARDIO_ENSEMBLE, source="arms.toml")
    plan = TrainingPlan(spec=CARDIO_ENSEMBLE, rounds=1, model=ModelConfig(kind="hybrid"))
    twin = Twin.from_weights(plan, get_weights(build_surrogate(CARDIO_ENSEMBLE, plan.model, seed=0)))
    out = run_site_trial(twin, cardio_site, design)
    assert out.structures == ("effect-compartment", "indirect-response")
    p = out.n_patients
    assert p >= 4 and out.structure_values.shape == (p, 2, 3, 2)
    # one draw asked for, one per structure run: the outcome is the structures' mean
    np.testing.assert_allclose(out.values, out.structure_values.mean(1), rtol=1e-12)
    # identical arms are identical under every structure; a dose moves each structure differently
    assert np.array_equal(out.structure_values[:, :, 0], out.structure_values[:, :, 1])
    effect = out.structure_values[:, :, 2, 0] - out.structure_values[:, :, 0, 0]  # [P, 2] mmHg
    assert (effect <= 1e-9).all() and not np.allclose(effect[:, 0], effect[:, 1])
    names = ("effect-compartment", "indirect-response")
    report = summarise(contributions(out.values, design, out.structure_values).sum(0), design, CARDIO_ENSEMBLE,
                       structures=names)
    plain = summarise(contributions(out.values, design).sum(0), design, CARDIO_ENSEMBLE)
    got, base = report["contrasts"]["forty"]["mean_sbp"], plain["contrasts"]["forty"]["mean_sbp"]
    assert got["structures"] == pytest.approx(dict(zip(names, effect.mean(0))), rel=1e-9)
    assert got["ci95"][1] - got["ci95"][0] > base["ci95"][1] - base["ci95"][0]
    assert report["contrasts"]["again"]["mean_sbp"]["ci95"] == [0.0, 0.0]


@pytest.mark.studies  # a posterior of 24 parameters: about 15 s
def test_an_ensembles_what_if_reports_each_structure_and_its_intervals_carry_their_spread(cardio_site):
    from twinfed.cli.twin import whatif_json
    from twinfed.models.calibration import IntervalCalibration, interval_bands
    from twinfed.models.conformal import n_bins
    from twinfed.models.plan import CalibrationConfig
    from twinfed.models.surrogate import build_surrogate, get_weights
    from twinfed.models.twin import Twin
    from twinfed.models.whatif import Op, Scenario, run_whatif

    plan = TrainingPlan(spec=CARDIO_ENSEMBLE, rounds=1, model=ModelConfig(kind="hybrid"))
    twin = Twin.from_weights(plan, get_weights(build_surrogate(CARDIO_ENSEMBLE, plan.model, seed=0)))
    bins = n_bins(CalibrationConfig().edges)
    masses = np.append(0.7 ** np.arange(bins - 1), 0.0)
    cal = IntervalCalibration.from_histogram(np.tile(40 * masses / masses.sum(), (2, 1)), CARDIO_ENSEMBLE,
                                             CalibrationConfig(), differential_privacy=False,
                                             noise_multiplier=None, sites=1, source="test")
    dose = Scenario("dose-40-now", (Op("dose_mg", "+", 40.0),))
    res = run_whatif(twin, cardio_site, cardio_site.patient_ids[0], 36 * 60, [Scenario("recorded"), dose],
                     calibration=cal)
    assert res.structures == ("effect-compartment", "indirect-response")
    for name, fc in res.forecasts.items():
        members = res.structure_forecasts[name]  # [2, K, S]
        np.testing.assert_allclose(fc, members.mean(0), rtol=1e-5, atol=1e-3)
        plain = interval_bands(fc, res.scales, cal, CARDIO_ENSEMBLE)
        spread = members.std(0, ddof=1)
        for key, (lo, hi) in res.bands[name].items():
            assert (hi - lo >= plain[key][1] - plain[key][0] - 1e-9).all()
        if spread.max() > 0.5:  # where the structures disagree, the interval is wider
            assert (res.bands[name]["95"][1] - res.bands[name]["95"][0]).sum() > \
                (plain["95"][1] - plain["95"][0]).sum()
    assert res.structure_forecasts["dose-40-now"].std(0, ddof=1).max() > 0.5
    out = whatif_json(res, twin, CARDIO_ENSEMBLE)
    assert set(out["scenarios"]["dose-40-now"]["structures"]) == set(res.structures)
    assert len(out["scenarios"]["dose-40-now"]["structures"]["indirect-response"]["sbp_mmhg"]) == \
        CARDIO_ENSEMBLE.horizon_steps
