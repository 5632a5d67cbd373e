"""The surrogate network, its scaling, and local training."""

import numpy as np
import pytest
import torch

from builders import write_site
from twinfed.models.features import Scaler
from twinfed.models.plan import ModelConfig, TrainingConfig
from twinfed.models.site_data import load_site
from twinfed.models.spec import load_spec
from twinfed.models.surrogate import build_surrogate, get_weights, inputs_for, set_weights
from twinfed.models.train import PatientWindows, train_local
from twinfed.models.twin import Twin
from twinfed.models.windows import WindowIndex, gather


@pytest.fixture
def site(tmp_path):
    return load_site(write_site(tmp_path / "s", n_patients=12, n_steps=120), load_spec("glucose"))


@pytest.mark.parametrize("twin", ["glucose", "cardio"])
def test_surrogate_maps_features_to_the_whole_horizon_of_every_state(twin):
    spec = load_spec(twin)
    scaler = Scaler(spec)
    net = build_surrogate(spec, ModelConfig(kind="mlp-residual", hidden=32, layers=2))
    out = net(torch.zeros(7, scaler.n_features))
    assert out.shape == (7, spec.horizon_steps * len(spec.states))


def test_a_fresh_neural_surrogate_forecasts_persistence(site):
    plan_spec = site.spec
    config = ModelConfig(kind="mlp-residual", hidden=16)
    net = build_surrogate(plan_spec, config)
    index = WindowIndex.build(site)
    batch = gather(site, index.starts[:5], index.window_patients()[:5])
    from twinfed.models.plan import TrainingPlan

    twin = Twin(TrainingPlan(spec=plan_spec, rounds=1, model=config), net)
    pred = twin.forecast(batch)
    last = batch.history[:, -1, :1]
    np.testing.assert_allclose(pred, np.repeat(last[:, None, :], plan_spec.horizon_steps, axis=1), atol=1e-4)


def test_scaling_uses_only_the_specs_ranges_not_the_data(site):
    scaler = Scaler(site.spec)
    index = WindowIndex.build(site)
    batch = gather(site, index.starts[:3], index.window_patients()[:3])
    shifted = gather(site, index.starts[3:6], index.window_patients()[3:6])
    # Scaling the first batch must not depend on which other windows exist.
    a = scaler.batch_features(batch)
    both = scaler.features(np.concatenate([batch.history, shifted.history]),
                           np.concatenate([batch.future_controls, shifted.future_controls]),
                           np.concatenate([batch.covariates, shifted.covariates]))
    np.testing.assert_array_equal(a, both[:3])


def test_decode_inverts_targets(site):
    scaler = Scaler(site.spec)
    index = WindowIndex.build(site)
    batch = gather(site, index.starts[:4], index.window_patients()[:4])
    back = scaler.decode(batch.history[:, -1, :1], scaler.targets(batch))
    np.testing.assert_allclose(back, batch.future_states, rtol=1e-5, atol=1e-3)


def test_one_training_example_is_one_patient(site):
    data = PatientWindows(site, seed=0)
    assert len(data) == site.n_patients
    x, y = data.draw(np.array([0, 1, 2]))
    assert x.shape[0] == 3 and y.shape[0] == 3


def test_an_example_of_k_windows_draws_them_all_from_its_own_patient(site):
    data = PatientWindows(site, seed=0, windows_per_patient=5)
    x, y = data.draw(np.array([1, 3]))
    assert x.shape == (2, 5, Scaler(site.spec).n_features) and y.shape == (2, 5, 12)
    rng = np.random.default_rng(0)
    starts = data.index.per_patient(data.patients[[1, 3]], rng, 5)
    for p, row in zip(data.patients[[1, 3]], starts):
        sl = site.patient_slice(int(p))
        assert all(sl.start <= s < sl.stop for s in row)  # never a window of another patient


@pytest.mark.parametrize("kind", ["mlp-residual", "hybrid"])
def test_short_training_lowers_the_loss(site, kind):
    spec = site.spec
    config = ModelConfig(kind=kind, hidden=32)
    net = build_surrogate(spec, config)
    inputs = inputs_for(spec, config)
    data = PatientWindows(site, seed=1, inputs=inputs)
    x, y = data.draw(np.arange(len(data)))
    with torch.no_grad():
        before = float(torch.nn.functional.mse_loss(net(x), y))
    train_local(net, site, TrainingConfig(local_steps=60, batch_size=8, learning_rate=3e-3), seed=2,
                inputs=inputs)
    with torch.no_grad():
        after = float(torch.nn.functional.mse_loss(net(x), y))
    assert after < 0.7 * before


def test_weights_round_trip_through_a_model_directory(site, tmp_path):
    from twinfed.models.plan import TrainingPlan

    plan = TrainingPlan(spec=site.spec, rounds=1, model=ModelConfig(hidden=8))
    net = build_surrogate(site.spec, plan.model, seed=3)
    Twin(plan, net).save(tmp_path / "run")
    loaded = Twin.load(tmp_path / "run")
    for a, b in zip(get_weights(net), get_weights(loaded.surrogate)):
        np.testing.assert_array_equal(a, b)
    assert loaded.plan.sha256() == plan.sha256()


def test_set_weights_refuses_the_wrong_number_of_arrays():
    net = build_surrogate(load_spec("glucose"), ModelConfig(hidden=8))
    with pytest.raises(ValueError, match="expected"):
        set_weights(net, get_weights(net)[:-1])


def test_an_empty_draw_of_patients_gives_empty_tensors_of_the_right_width(site):
    data = PatientWindows(site, seed=0)
    x, y = data.draw(np.array([], dtype=np.int64))
    assert x.shape == (0, 1, Scaler(site.spec).n_features) and y.shape == (0, 1, 12)
