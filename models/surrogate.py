"""The surrogate network: history, future treatment and covariates -> the forecast horizon.

Only layers Opacus can make private (Linear, activations; no BatchNorm). A linear path runs
beside the MLP so the network starts from, and can always fall back to, an ARX-like model.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from twinfed.models.features import Scaler
from twinfed.models.plan import ModelConfig
from twinfed.models.spec import TwinSpec


class Surrogate(nn.Module):
    def __init__(self, n_features: int, n_outputs: int, config: ModelConfig):
        super().__init__()
        layers: list[nn.Module] = []
        width = n_features
        for _ in range(config.layers):
            layers += [nn.Linear(width, config.hidden), nn.SiLU()]
            width = config.hidden
        layers.append(nn.Linear(width, n_outputs))
        self.mlp = nn.Sequential(*layers)
        self.linear = nn.Linear(n_features, n_outputs)
        # Start at persistence: a fresh twin forecasts "no change", not noise.
        for lin in (self.mlp[-1], self.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x) + self.linear(x)


def inputs_for(spec: TwinSpec, config: ModelConfig):
    """How windows become this model's inputs and targets (``Scaler`` or ``HybridInputs``)."""
    if config.resolved(spec).kind == "hybrid":
        from twinfed.models.hybrid import HybridInputs

        return HybridInputs(spec)
    return Scaler(spec)


def build_surrogate(spec: TwinSpec, config: ModelConfig, *, seed: int = 0) -> nn.Module:
    config = config.resolved(spec)
    kind = config.kind
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if kind == "hybrid":
            from twinfed.models.hybrid import HybridSurrogate

            return HybridSurrogate(spec, config)
        scaler = Scaler(spec)
        return Surrogate(scaler.n_features, scaler.n_outputs, config)
    finally:
        torch.random.set_rng_state(gen_state)


def get_weights(model: nn.Module) -> list[np.ndarray]:
    return [p.detach().cpu().numpy().copy() for p in model.state_dict().values()]


def set_weights(model: nn.Module, weights: list[np.ndarray]) -> None:
    keys = list(model.state_dict().keys())
    if len(keys) != len(weights):
        raise ValueError(f"expected {len(keys)} weight arrays, got {len(weights)}")
    model.load_state_dict({k: torch.from_numpy(np.asarray(w)) for k, w in zip(keys, weights)})


def weight_names(model: nn.Module) -> list[str]:
    return list(model.state_dict().keys())
