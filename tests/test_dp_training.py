"""Patient-level DP-SGD steps with real Opacus, as the node takes them."""

import numpy as np
import pytest
import torch

from builders import write_site
from twinfed.models.plan import ModelConfig, TrainingConfig
from twinfed.models.site_data import load_site
from twinfed.models.spec import load_spec
from twinfed.models.surrogate import build_surrogate, get_weights, inputs_for
from twinfed.models.train import PatientWindows, run_steps
from twinfed.privacy import dp as dp_module
from twinfed.privacy.dp import DPSettings, make_private, train_private


def _model(kind="hybrid"):
    return build_surrogate(load_spec("glucose"), ModelConfig(kind=kind, hidden=8))


def _inputs(kind):
    return inputs_for(load_spec("glucose"), ModelConfig(kind=kind))


@pytest.mark.parametrize("kind", ["hybrid", "mlp-residual"])
def test_an_empty_poisson_draw_still_takes_its_noise_only_step(kind):
    model = _model(kind)
    module, optimizer = make_private(model, torch.optim.Adam(model.parameters(), lr=0.01),
                                     DPSettings(1.0, 0.1, 0.5, 2))
    before = get_weights(model)
    empty = [(torch.zeros(0, 2, _inputs(kind).n_features), torch.zeros(0, 2, 12))]
    result = run_steps(module, optimizer, empty, 1)
    module.cleanup()
    assert result.steps == 1 and np.isnan(result.mean_loss)  # no loss to report ...
    assert any(np.abs(a - b).max() > 0 for a, b in zip(get_weights(model), before))  # ... but noise added


def test_without_dp_an_empty_draw_changes_nothing():
    model = _model("mlp-residual")
    before = get_weights(model)
    empty = [(torch.zeros(0, 2, _inputs("mlp-residual").n_features), torch.zeros(0, 2, 12))]
    result = run_steps(model, torch.optim.Adam(model.parameters(), lr=0.01), empty, 3)
    assert result.steps == 3 and all((a == b).all() for a, b in zip(get_weights(model), before))


def test_the_sample_rate_and_averaging_batch_come_from_the_settings_not_the_site_size(tmp_path, monkeypatch):
    site = load_site(write_site(tmp_path / "site", n_patients=7, n_steps=60), load_spec("glucose"))
    data = PatientWindows(site, seed=0, windows_per_patient=2, inputs=_inputs("hybrid"))
    seen = {}

    def spy(module, optimizer, loader, steps):
        seen.update(rate=loader.sample_rate, batch=optimizer.expected_batch_size,
                    sigma=optimizer.noise_multiplier, clip=optimizer.max_grad_norm)
        return run_steps(module, optimizer, loader, steps)

    monkeypatch.setattr(dp_module, "run_steps", spy)
    # Released count 40 (7 in truth): rate 4/40, batch 4. Opacus's make_private would use 7.
    train_private(_model(), data, TrainingConfig(batch_size=4), DPSettings(1.3, 0.2, 0.1, 4), steps=2)
    assert seen == {"rate": 0.1, "batch": 4, "sigma": 1.3, "clip": 0.2}
