"""Patient-level DP-SGD steps with real Opacus."""

import warnings

import numpy as np
import torch

from twinfed.models.features import Scaler
from twinfed.models.plan import ModelConfig
from twinfed.models.spec import load_spec
from twinfed.models.surrogate import build_surrogate, get_weights
from twinfed.models.train import run_steps


def _private(model):
    from opacus import PrivacyEngine

    x = torch.zeros(4, 2, Scaler(load_spec("glucose")).n_features)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(4, 2, 12)), batch_size=4)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _module, optimizer, _loader = PrivacyEngine().make_private(
            module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0, max_grad_norm=0.1,
            poisson_sampling=True)
    return _module, optimizer


def test_an_empty_poisson_draw_still_takes_its_noise_only_step():
    spec = load_spec("glucose")
    model = build_surrogate(spec, ModelConfig(hidden=8))
    module, optimizer = _private(model)
    before = get_weights(model)
    empty = [(torch.zeros(0, 2, Scaler(spec).n_features), torch.zeros(0, 2, 12))]
    result = run_steps(module, optimizer, empty, 1)
    assert result.steps == 1 and np.isnan(result.mean_loss)  # no loss to report ...
    assert any(np.abs(a - b).max() > 0 for a, b in zip(get_weights(model), before))  # ... but noise added


def test_without_dp_an_empty_draw_changes_nothing():
    spec = load_spec("glucose")
    model = build_surrogate(spec, ModelConfig(hidden=8))
    before = get_weights(model)
    empty = [(torch.zeros(0, 2, Scaler(spec).n_features), torch.zeros(0, 2, 12))]
    result = run_steps(model, torch.optim.Adam(model.parameters(), lr=0.01), empty, 3)
    assert result.steps == 3 and all((a == b).all() for a, b in zip(get_weights(model), before))
