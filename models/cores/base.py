"""What every mechanistic core of a hybrid twin is: bounded parameters and a differentiable,
parameter-free simulation of the core's states over the forecast horizon.

A core holds no trainable weights: its per-patient parameters come from the hybrid's encoder
(federated, under DP) or from a patient's own identification at the hospital. Every parameter is
bounded to a physiological range; the encoder and the identification work on unconstrained
values ``z`` that map into the range through a sigmoid in log space, so no optimiser can leave it.
Tensors keep any leading batch shape (``[B, k]`` for k windows per patient under DP, ``[N]`` in
evaluation): per-sample gradients see one patient per row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Param:
    """One core parameter: its range, its population-typical value (the range's log-midpoint,
    where an untrained encoder starts), its unit, and whether it scales with body weight
    (``per_kg``: +1 grows with weight, -1 shrinks, e.g. a volume-normalised sensitivity)."""

    name: str
    lo: float
    hi: float
    unit: str
    meaning: str
    per_kg: int = 0

    @property
    def typical(self) -> float:
        return math.sqrt(self.lo * self.hi)


REFERENCE_WEIGHT_KG = 70.0


def bounded(z: torch.Tensor, params: tuple[Param, ...], weight_kg: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Unconstrained ``z`` ``[..., P]`` -> each parameter inside its range, scaled by weight."""
    out = {}
    for i, p in enumerate(params):
        lo, hi = math.log(p.lo), math.log(p.hi)
        value = torch.exp(lo + (hi - lo) * torch.sigmoid(z[..., i]))
        if p.per_kg and weight_kg is not None:
            value = value * (weight_kg / REFERENCE_WEIGHT_KG) ** p.per_kg
        out[p.name] = value
    return out


def unbounded(values: dict[str, torch.Tensor], params: tuple[Param, ...],
              weight_kg: torch.Tensor | None) -> torch.Tensor:
    """The inverse of :func:`bounded` (values clipped just inside their ranges)."""
    cols = []
    for p in params:
        v = values[p.name]
        if p.per_kg and weight_kg is not None:
            v = v / (weight_kg / REFERENCE_WEIGHT_KG) ** p.per_kg
        lo, hi = math.log(p.lo), math.log(p.hi)
        frac = ((torch.log(v) - lo) / (hi - lo)).clamp(1e-4, 1 - 1e-4)
        cols.append(torch.log(frac) - torch.log1p(-frac))
    return torch.stack(cols, dim=-1)


def chain_step(s1: torch.Tensor, s2: torch.Tensor, rate: torch.Tensor, tau: torch.Tensor,
               h: float, decay: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One exact step of ``h`` minutes of a two-compartment chain (``s1' = rate - s1/tau``,
    ``s2' = (s1 - s2)/tau``) under a constant input ``rate``; returns the new depots and the amount
    that left the chain during the step, by mass balance (never more than was in it or given).
    ``decay``: ``exp(-h/tau)``, if the caller already has it."""
    ah = h / tau
    e = torch.exp(-ah) if decay is None else decay
    steady = rate * tau
    n1 = s1 * e + steady * (1 - e)
    n2 = s2 * e + s1 * ah * e + steady * (1 - e - ah * e)
    out = rate * h + (s1 + s2) - (n1 + n2)
    return n1, n2, out.clamp(min=0.0)
