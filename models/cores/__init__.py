"""Mechanistic cores for hybrid twins, bound to a spec's columns by its ``[twin.core]`` roles.

A binding knows which spec column plays each role of its core, runs the core on a hybrid's
unpacked inputs (``HybridSurrogate.unpack``) and reports its parameters in clinical terms.
"""

from __future__ import annotations

import dataclasses
from importlib import import_module

import torch

from twinfed.models.cores.base import Param, bounded, unbounded
from twinfed.models.spec import CORE_ROLES, TwinSpec

# The key of ``theta`` that picks, per row, which structure of an ensemble runs it
# (:class:`EnsembleBinding`); without it an ensemble's path is its structures' mean.
MEMBER = "_member"


class CoreBinding:
    """What every binding shares: each role's column, the bounded parameters (``z`` <-> theta),
    the forecast of the bound states and the clinical report. A binding says how its core reads
    the inputs: ``origin`` (the core's state at the forecast origin) and ``run`` (each bound
    state's path over the horizon)."""

    n_members = 1  # structures: one, or an ensemble's (EnsembleBinding)

    def __init__(self, spec: TwinSpec, core: torch.nn.Module):
        self.core = core
        columns = {"state": spec.state_columns, "control": spec.control_columns,
                   "covariate": spec.covariate_columns}
        roles = CORE_ROLES[spec.core.name]
        self.index = {role: columns[kind].index(spec.core.roles[role]) for role, kind in roles.items()}
        self.state_roles = {self.index[role]: role for role, kind in roles.items() if kind == "state"}
        self.n_states = len(spec.states)

    @property
    def params(self) -> tuple[Param, ...]:
        return self.core.PARAMS

    # -- the inputs by role ---------------------------------------------------------------------

    def last(self, u: dict, role: str) -> torch.Tensor:
        """The state's last reading (the forecast origin)."""
        return u["states"][..., -1, self.index[role]]

    def recorded(self, u: dict, role: str, steps: int) -> torch.Tensor:
        """The control over the last ``steps`` of the context (``u["mask"]`` says where the record
        reaches)."""
        return u["controls"][..., -steps:, self.index[role]]

    def planned(self, u: dict, role: str) -> torch.Tensor:
        return u["future"][..., self.index[role]]

    def covariate(self, u: dict, role: str) -> torch.Tensor:
        return u["covariates"][..., self.index[role]]

    # -- parameters -----------------------------------------------------------------------------

    def scales(self, u: dict) -> dict[str, torch.Tensor]:
        """Factors on parameters whose range moves with a covariate other than weight."""
        return {}

    def _weight(self, u: dict) -> torch.Tensor | None:
        return self.covariate(u, "weight") if "weight" in self.index else None

    def theta(self, z: torch.Tensor, u: dict) -> dict[str, torch.Tensor]:
        theta = bounded(z, self.params, self._weight(u))
        for name, factor in self.scales(u).items():
            theta[name] = theta[name] * factor
        return theta

    def z_of(self, theta: dict[str, torch.Tensor], u: dict) -> torch.Tensor:
        scales = self.scales(u)
        plain = {name: v / scales[name] if name in scales else v for name, v in theta.items()}
        return unbounded(plain, self.params, self._weight(u))

    # -- the core -------------------------------------------------------------------------------

    def origin(self, theta: dict, u: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def run(self, theta: dict, state: dict, u: dict, *, carry: bool = False):
        """Each bound state's path over ``u["future"]``, by role; with ``carry`` also the core's
        state at the end (to continue from it)."""
        raise NotImplementedError

    def forecast(self, z: torch.Tensor, u: dict) -> tuple[torch.Tensor, dict]:
        """The bound states ``[..., K, S]`` (spec units; NaN for states the core does not bind)."""
        theta = self.theta(z, u)
        state = self.origin(theta, u)
        return self._stacked(self.run(theta, state, u)), {"theta": theta, "state": state}

    def member_forecasts(self, z: torch.Tensor, u: dict) -> torch.Tensor:
        """Each structure's forecast ``[..., M, K, S]`` (one structure: ``M = 1``)."""
        return self.forecast(z, u)[0].unsqueeze(-3)

    def continued(self, theta: dict, state: dict, u: dict) -> tuple[torch.Tensor, dict]:
        """The bound states ``[..., k, S]`` over ``u["future"]`` (``k`` steps, any number) from
        the core's ``state`` and the last readings in ``u["states"]``, and the state after them:
        a forecast continued without warming the core up again from the record."""
        paths, end = self.run(theta, state, u, carry=True)
        return self._stacked(paths), end

    def _stacked(self, paths: dict[str, torch.Tensor]) -> torch.Tensor:
        some = next(iter(paths.values()))
        cols = [paths[self.state_roles[j]] if j in self.state_roles else torch.full_like(some, float("nan"))
                for j in range(self.n_states)]
        return torch.stack(cols, dim=-1)

    def clinical(self, z: torch.Tensor, u: dict) -> dict[str, torch.Tensor]:
        theta = self.theta(z, u)
        return self.core.clinical(theta, self.origin(theta, u))


class GlucoseBinding(CoreBinding):
    """The glucose-insulin core on a spec's glucose state, insulin and carbohydrate controls and
    body-weight covariate."""

    def __init__(self, spec: TwinSpec):
        from twinfed.models.cores.glucose import WARMUP_STEPS, GlucoseInsulinCore

        super().__init__(spec, GlucoseInsulinCore(spec.step_minutes))
        self.warmup = min(WARMUP_STEPS, spec.context_length)

    def origin(self, theta: dict, u: dict) -> dict[str, torch.Tensor]:
        w = self.warmup
        return self.core.warmup(theta, self.recorded(u, "insulin", w), self.recorded(u, "carbs", w),
                                u["mask"][..., -w:])

    def run(self, theta: dict, state: dict, u: dict, *, carry: bool = False):
        out = self.core(theta, state, self.last(u, "glucose"), self.planned(u, "insulin"),
                        self.planned(u, "carbs"), carry=carry)
        return ({"glucose": out[0]}, out[1]) if carry else {"glucose": out}


class CardioBinding(CoreBinding):
    """The cardio core on a spec's SBP and heart-rate states, dose and activity controls, and
    body-weight and age covariates. Doses reach the core per kg of body weight; age moves the
    baroreflex gain's range."""

    def __init__(self, spec: TwinSpec):
        from twinfed.models.cores.cardio import CardioCore

        super().__init__(spec, CardioCore(spec.step_minutes))
        self.context = spec.context_length

    def scales(self, u: dict) -> dict[str, torch.Tensor]:
        from twinfed.models.cores.cardio import age_scales

        return age_scales(self.covariate(u, "age"))

    def _per_kg(self, dose: torch.Tensor, u: dict) -> torch.Tensor:
        return dose / self.covariate(u, "weight").clamp(min=1.0).unsqueeze(-1)

    def origin(self, theta: dict, u: dict) -> dict[str, torch.Tensor]:
        w = self.context
        return self.core.warmup(theta, self._per_kg(self.recorded(u, "dose", w), u),
                                self.recorded(u, "activity", w), u["mask"][..., -w:])

    def run(self, theta: dict, state: dict, u: dict, *, carry: bool = False):
        out = self.core(theta, state, self.last(u, "sbp"), self.last(u, "hr"),
                        self._per_kg(self.planned(u, "dose"), u), self.planned(u, "activity"), carry=carry)
        (sbp, hr), end = out if carry else (out, None)
        paths = {"sbp": sbp, "hr": hr}
        return (paths, end) if carry else paths


class EnsembleBinding(CoreBinding):
    """Several structures of one core family on the same roles (``spec.core.structures``): the
    parameters are the structures' side by side (the first structure's under their own names, the
    others' as ``"<structure>.<name>"``), and so are their states. A forecast is the structures'
    mean; :meth:`member_forecasts` gives each. With ``theta[MEMBER]`` (a structure index per row)
    each row runs its own structure alone (a trial's paths, a structure per draw)."""

    def __init__(self, spec: TwinSpec, members: list[CoreBinding], names: tuple[str, ...]):
        self.members = members
        self.names = names
        self.n_members = len(members)
        self.core = torch.nn.ModuleList([m.core for m in members])
        self.n_states = len(spec.states)
        self.state_roles = members[0].state_roles
        self.prefixes = [""] + [f"{name}." for name in names[1:]]
        sizes = [len(m.params) for m in members]
        self.slices = [slice(sum(sizes[:i]), sum(sizes[:i + 1])) for i in range(len(sizes))]
        self._params = tuple(dataclasses.replace(p, name=prefix + p.name)
                             for prefix, m in zip(self.prefixes, members) for p in m.params)

    @property
    def params(self) -> tuple[Param, ...]:
        return self._params

    def _own(self, i: int, d: dict) -> dict:
        """Structure ``i``'s part of a merged dict (theta or state), under its own names."""
        prefix = self.prefixes[i]
        if prefix:
            return {k[len(prefix):]: v for k, v in d.items() if k.startswith(prefix)}
        return {k: v for k, v in d.items() if "." not in k and not k.startswith("_")}

    def _merged(self, parts: list[dict]) -> dict:
        return {prefix + k: v for prefix, part in zip(self.prefixes, parts) for k, v in part.items()}

    def theta(self, z: torch.Tensor, u: dict) -> dict[str, torch.Tensor]:
        return self._merged([m.theta(z[..., s], u) for m, s in zip(self.members, self.slices)])

    def z_of(self, theta: dict[str, torch.Tensor], u: dict) -> torch.Tensor:
        return torch.cat([m.z_of(self._own(i, theta), u) for i, m in enumerate(self.members)], dim=-1)

    def origin(self, theta: dict, u: dict) -> dict[str, torch.Tensor]:
        return self._merged([m.origin(self._own(i, theta), u) for i, m in enumerate(self.members)])

    def run(self, theta: dict, state: dict, u: dict, *, carry: bool = False):
        outs = [m.run(self._own(i, theta), self._own(i, state), u, carry=carry) for i, m in enumerate(self.members)]
        paths = [o[0] for o in outs] if carry else outs
        which = theta.get(MEMBER)
        combined = {}
        for role in paths[0]:
            if which is None:
                combined[role] = torch.stack([p[role] for p in paths]).mean(0)
            else:
                pick = paths[0][role]
                for i in range(1, len(paths)):
                    pick = torch.where((which == i).reshape(*which.shape, *([1] * (pick.dim() - which.dim()))),
                                       paths[i][role], pick)
                combined[role] = pick
        if not carry:
            return combined
        return combined, self._merged([o[1] for o in outs])

    def member_forecasts(self, z: torch.Tensor, u: dict) -> torch.Tensor:
        return torch.stack([m.forecast(z[..., s], u)[0] for m, s in zip(self.members, self.slices)], dim=-3)

    def clinical(self, z: torch.Tensor, u: dict) -> dict[str, torch.Tensor]:
        return self._merged([m.clinical(z[..., s], u) for m, s in zip(self.members, self.slices)])


# Each structure's binding, by core family and structure name: a class, or where it lives
# (``module:Class``, imported when a twin uses it).
STRUCTURE_BINDINGS: dict[str, dict[str, type | str]] = {
    "glucose-insulin": {"minimal": GlucoseBinding,
                        "two-compartment": "twinfed.models.cores.two_compartment:TwoCompartmentBinding"},
    "cardio": {"effect-compartment": CardioBinding,
               "indirect-response": "twinfed.models.cores.indirect_response:IndirectResponseBinding"},
}


def _binding_class(family: str, structure: str) -> type:
    where = STRUCTURE_BINDINGS[family][structure]
    if isinstance(where, str):
        module, name = where.split(":")
        return getattr(import_module(module), name)
    return where


def core_for(spec: TwinSpec):
    """The binding of the spec's core: its one structure's, or an :class:`EnsembleBinding` of
    the structures it declares."""
    if spec.core is None:
        raise ValueError("the spec has no [twin.core]")
    if spec.core.name not in STRUCTURE_BINDINGS:
        raise ValueError(f"the {spec.core.name} core is not available in this version of twinfed")
    names = spec.core.members
    members = [_binding_class(spec.core.name, name)(spec) for name in names]
    return members[0] if len(members) == 1 else EnsembleBinding(spec, members, names)
