"""The hybrid twin: a mechanistic core, an encoder for its per-patient parameters, and a bounded
neural correction that cannot reverse a treatment's effect.

- The **core** (``twinfed.models.cores``, chosen by the spec's ``[twin.core]``) simulates the
  bound states over the horizon from the planned treatment. It has no weights.
- The **encoder** (the population part, trained federated under DP) maps a patient's covariates
  and a summary of the identification context (the last ``spec.context_length`` steps: levels,
  variability, daily amounts, habits) to the core's parameters, each bounded to its range. At the
  hospital, :mod:`twinfed.models.personalise` refines them from the patient's own record.
- The **correction** adds, per state and step, at most ``CORRECTION_BOUND`` (in the forecast's
  scaled units) for what the core does not capture (sensor noise at the origin, unmodelled
  drift). It reads the recent history and covariates, **never the planned treatment**: two
  what-ifs of one patient differ only through the core, so the direction of every treatment's
  effect is the core's, which is right by construction.
Only ``Linear`` layers are trained (Opacus computes their per-sample gradients; the core's
operations keep the per-patient batch dimension), a few thousand weights against the neural
surrogate's tens of thousands: DP noise grows with the square root of the count.

Inputs travel as one flat vector per window (``HybridInputs``), so the data path, the DP example
(k windows of one patient) and the loss are the neural surrogate's; outputs are the change of
each state from its last reading over the horizon, in the same scaled units.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from twinfed.models.cores import core_for
from twinfed.models.features import CONTROL_GAIN, DELTA_UNITS
from twinfed.models.plan import ModelConfig
from twinfed.models.spec import TwinSpec
from twinfed.models.windows import Batch

CORRECTION_BOUND = 1.0  # scaled units: a tenth of a state's half-range (29 mg/dL for glucose)
RECENT_STEPS = 24  # the encoder's "recent" window inside the context (2 h at 5 min)


class HybridInputs:
    """Windows -> one flat vector each: context (states and controls), its mask, the planned
    controls and the covariates, in the spec's units. Targets and decoding are the neural
    surrogate's (change from the last reading, ``DELTA_UNITS`` per half-range)."""

    with_context = True

    def __init__(self, spec: TwinSpec):
        self.spec = spec
        self.lc, self.k = spec.context_length, spec.horizon_steps
        self.s, self.c, self.v = len(spec.states), len(spec.controls), len(spec.covariates)
        self.half = np.array([(c.max - c.min) / 2 for c in spec.states], np.float32)

    @property
    def n_features(self) -> int:
        return self.lc * (self.s + self.c) + self.lc + self.k * self.c + self.v

    @property
    def n_outputs(self) -> int:
        return self.k * self.s

    def batch_features(self, batch: Batch) -> np.ndarray:
        n = len(batch.history)
        if batch.context is None:
            raise ValueError("the hybrid twin needs windows gathered with their context")
        # Explicit widths: an empty batch (Poisson sampling can draw none) must work too.
        return np.concatenate([batch.context.reshape(n, self.lc * (self.s + self.c)),
                               batch.context_mask.reshape(n, self.lc),
                               batch.future_controls.reshape(n, self.k * self.c),
                               batch.covariates.reshape(n, self.v)], axis=1).astype(np.float32)

    def targets(self, batch: Batch) -> np.ndarray:
        last = batch.history[:, -1, : self.s]
        d = (batch.future_states - last[:, None, :]) / self.half * DELTA_UNITS
        return d.reshape(len(d), self.n_outputs).astype(np.float32)

    def decode(self, last_states: np.ndarray, outputs: np.ndarray) -> np.ndarray:
        d = outputs.reshape(len(outputs), self.k, self.s)
        return last_states[:, None, :] + d * self.half / DELTA_UNITS

    def spanning(self, steps: int) -> HybridInputs:
        """The same inputs for windows whose planned controls run ``steps`` steps (a rolled-forward
        loss's long windows, ``twinfed.models.train``)."""
        other = object.__new__(HybridInputs)
        other.__dict__.update(self.__dict__)
        other.k = int(steps)
        return other

    def rolled_targets(self, batch: Batch, every: int) -> np.ndarray:
        """The recorded states every ``every`` steps along a long window, ``[B, P, S]``, as changes
        from the last reading in the targets' scaled units (``P = steps // every``)."""
        last = batch.history[:, -1, : self.s]
        at = batch.future_states[:, every - 1::every, :]
        return ((at - last[:, None, :]) / self.half * DELTA_UNITS).astype(np.float32)


def _mlp(n_in: int, n_out: int, config: ModelConfig) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = n_in
    for _ in range(config.layers):
        layers += [nn.Linear(width, config.hidden), nn.SiLU()]
        width = config.hidden
    last = nn.Linear(width, n_out)
    nn.init.zeros_(last.weight)  # start at the population's typical patient, no correction
    nn.init.zeros_(last.bias)
    return nn.Sequential(*layers, last)


class HybridSurrogate(nn.Module):
    def __init__(self, spec: TwinSpec, config: ModelConfig):
        super().__init__()
        if spec.core is None:
            raise ValueError("a hybrid twin needs a [twin.core] in its spec")
        config = config.resolved(spec)
        self.spec = spec
        self.inputs = HybridInputs(spec)
        self.binding = core_for(spec)
        self.core = self.binding.core
        s, c = self.inputs.s, self.inputs.c
        # The spec's declared ranges (constants, never data statistics); not weights: not sent.
        for name, values in (("s_mid", [(x.min + x.max) / 2 for x in spec.states]),
                             ("s_half", [(x.max - x.min) / 2 for x in spec.states]),
                             ("c_max", [x.max for x in spec.controls] or [1.0]),
                             ("v_mid", [(x.min + x.max) / 2 for x in spec.covariates] or [0.0]),
                             ("v_half", [(x.max - x.min) / 2 for x in spec.covariates] or [1.0])):
            self.register_buffer(name, torch.tensor(values, dtype=torch.float32), persistent=False)
        n_enc = 6 * s + 4 * c + self.inputs.v + 1
        n_corr = (spec.history_steps + 1) * s + spec.history_steps * c + self.inputs.v
        self.encoder = _mlp(n_enc, len(self.binding.params), config)
        self.correction = _mlp(n_corr, self.inputs.n_outputs, config)

    # -- unpacking ----------------------------------------------------------------------------

    def unpack(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        i = self.inputs
        lead = x.shape[:-1]
        n_ctx = i.lc * (i.s + i.c)
        ctx = x[..., :n_ctx].reshape(*lead, i.lc, i.s + i.c)
        mask = x[..., n_ctx: n_ctx + i.lc]
        off = n_ctx + i.lc
        future = x[..., off: off + i.k * i.c].reshape(*lead, i.k, i.c)
        cov = x[..., off + i.k * i.c: off + i.k * i.c + i.v]
        return {"states": ctx[..., : i.s], "controls": ctx[..., i.s:], "mask": mask,
                "future": future, "covariates": cov}

    # -- the encoder's view of the identification context ---------------------------------------

    def context_features(self, u: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = u["mask"]
        valid = mask.sum(-1).clamp(min=1.0)
        m = mask.unsqueeze(-1)
        z = (u["states"] - self.s_mid) / self.s_half * m  # scaled states, 0 where unrecorded
        mean = z.sum(-2) / valid.unsqueeze(-1)
        var = ((z - mean.unsqueeze(-2)) ** 2 * m).sum(-2) / valid.unsqueeze(-1)
        big = 1e3 * (1 - m)
        zmin = (z + big).amin(-2)
        zmax = (z - big).amax(-2)
        recent = z[..., -RECENT_STEPS:, :].mean(-2)
        frac = u["controls"] / self.c_max * m
        per_day = 1440.0 / self.spec.step_minutes
        daily = frac.sum(-2) * (per_day / valid.unsqueeze(-1))
        given = (frac > 0).float().sum(-2) / valid.unsqueeze(-1)
        floor = (frac + big).amin(-2).clamp(max=1.0) * CONTROL_GAIN  # e.g. the basal rate
        recent_total = frac[..., -6 * RECENT_STEPS // 2:, :].sum(-2)
        cov = (u["covariates"] - self.v_mid) / self.v_half
        feats = torch.cat([mean, var.sqrt(), zmin, zmax, z[..., -1, :], recent, daily, given, floor,
                           recent_total, cov, (valid / mask.shape[-1]).unsqueeze(-1)], dim=-1)
        return feats.clamp(-10.0, 10.0)

    def correction_features(self, u: dict[str, torch.Tensor]) -> torch.Tensor:
        h = self.spec.history_steps
        states = u["states"][..., -h:, :]
        last = states[..., -1, :]
        deltas = (states - last.unsqueeze(-2)) / self.s_half * DELTA_UNITS
        frac = (u["controls"][..., -h:, :] / self.c_max).clamp(0, 1)
        controls = torch.log1p(frac * 1000.0) / np.log1p(1000.0)
        cov = (u["covariates"] - self.v_mid) / self.v_half
        return torch.cat([((last - self.s_mid) / self.s_half), deltas.flatten(-2), controls.flatten(-2),
                          cov], dim=-1).clamp(-20.0, 20.0)

    # -- forward ------------------------------------------------------------------------------

    def parameters_of(self, u: dict[str, torch.Tensor]) -> torch.Tensor:
        """The encoder's unconstrained core parameters ``z`` for each window."""
        return self.encoder(self.context_features(u))

    def simulate(self, z: torch.Tensor, u: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """The core's forecast of its states ``[..., K, S]`` (spec units, NaN for unbound
        states) with parameters ``z``, and its state at the origin."""
        return self.binding.forecast(z, u)

    def corrections(self, u: dict[str, torch.Tensor]) -> torch.Tensor:
        """The bounded correction ``[..., K*S]``: a function of history and covariates only."""
        return CORRECTION_BOUND * torch.tanh(self.correction(self.correction_features(u)))

    @property
    def n_structures(self) -> int:
        """The core structures the twin runs (more than one: an ensemble, ``spec.core.structures``)."""
        return self.binding.n_members

    def _scaled(self, core: torch.Tensor, last: torch.Tensor, correction: torch.Tensor) -> torch.Tensor:
        bound = torch.isfinite(core)
        delta = torch.where(bound, (torch.nan_to_num(core) - last.unsqueeze(-2)) / self.s_half * DELTA_UNITS,
                            torch.zeros_like(core))
        return delta.flatten(-2) + correction

    def outputs(self, u: dict[str, torch.Tensor], z: torch.Tensor, correction: torch.Tensor) -> torch.Tensor:
        """The forecast (change from the last reading, scaled) of the core run with ``z``, plus
        ``correction``; an ensemble's is its structures' mean."""
        core, _ = self.simulate(z, u)
        return self._scaled(core, u["states"][..., -1, :], correction)

    def member_outputs(self, u: dict[str, torch.Tensor], z: torch.Tensor, correction: torch.Tensor) -> torch.Tensor:
        """Each structure's forecast ``[..., M, K*S]`` (as :meth:`outputs`; ``M = 1`` for one
        structure): what training and identification fit, so that every structure is fitted
        to the data on its own (fitting the mean would let one structure make up for another)."""
        if self.n_structures == 1:
            return self.outputs(u, z, correction).unsqueeze(-2)
        cores = self.binding.member_forecasts(z, u)  # [..., M, K, S]
        last = u["states"][..., -1, :].unsqueeze(-2)
        return self._scaled(cores, last, correction.unsqueeze(-2))

    def forward(self, x: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
        """The forecast; ``offset`` (a patient's identification, ``twinfed.models.personalise``)
        shifts the encoder's unconstrained parameters ``z`` of each window. An ensemble in
        training mode gives each structure's forecast, ``[..., M, K*S]`` (the training loss
        fits each), else the structures' mean."""
        u = self.unpack(x)
        z = self.parameters_of(u)
        z = z if offset is None else z + offset
        if self.training and self.n_structures > 1:
            return self.member_outputs(u, z, self.corrections(u))
        return self.outputs(u, z, self.corrections(u))


    # -- the rolled-forward loss (training.rolled_hours) ------------------------------------------

    def unpack_span(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """As :meth:`unpack`, for windows whose planned controls run any number of steps
        (``HybridInputs.spanning``): the width of ``x`` says how many."""
        i = self.inputs
        lead = x.shape[:-1]
        n_ctx = i.lc * (i.s + i.c)
        steps = (x.shape[-1] - n_ctx - i.lc - i.v) // max(i.c, 1)
        ctx = x[..., :n_ctx].reshape(*lead, i.lc, i.s + i.c)
        off = n_ctx + i.lc
        future = x[..., off: off + steps * i.c].reshape(*lead, steps, i.c)
        return {"states": ctx[..., : i.s], "controls": ctx[..., i.s:], "mask": x[..., n_ctx: off],
                "future": future, "covariates": x[..., off + steps * i.c: off + steps * i.c + i.v]}

    def rolled_outputs(self, x: torch.Tensor, points: int) -> torch.Tensor:
        """The core alone rolled forward from each window's origin over its whole planned span
        (long windows, :meth:`unpack_span`) with the encoder's parameters, each structure on its
        own: ``[..., M, points, S]`` at every ``span / points``-th step, as changes from the last
        reading in the targets' scaled units; NaN for states the core does not bind. No correction:
        it is bounded and reads only the record up to the origin; what is fitted here is the
        parameters' hold over hours."""
        u = self.unpack_span(x)
        steps = u["future"].shape[-2]
        if points < 1 or steps % points:
            raise ValueError(f"a span of {steps} steps cannot be scored at {points} evenly spaced points")
        every = steps // points
        cores = self.binding.member_forecasts(self.parameters_of(u), u)[..., every - 1::every, :]
        last = u["states"][..., -1, :][..., None, None, :]
        return (cores - last) / self.s_half * DELTA_UNITS


def n_trained_weights(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
