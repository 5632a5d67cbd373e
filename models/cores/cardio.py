"""The cardio core: an oral antihypertensive's kinetics and effect, systolic pressure and heart rate.

Per patient (bounded, see ``PARAMS``): absorption ``ka``, elimination ``ke`` and effect-site
equilibration ``ke0``; the drug's maximal SBP reduction ``emax`` and the concentration for half of
it ``ec50``; the untreated resting SBP ``sbp0`` (the baroreflex set point) and its lag ``tau_p``;
the resting heart rate at the set point ``hr0``, the baroreflex gain ``baro`` and the heart rate's
lag ``tau_h``; and the rises of SBP and heart rate at full activity, ``act_sbp`` and ``act_hr``.
Doses enter in mg per kg of body weight, so the apparent volume (V/F, ``VD_L_PER_KG`` x weight)
is the only place weight acts; its individual variation is not identifiable apart from ``ec50``
from pressure alone (only c/ec50 enters the effect) and lives in ``ec50``. The baroreflex gain's
range shifts with age (``age_scales``: it about halves every ``BARO_HALVING_YEARS`` of life).

    g' = u - ka g,   a' = ka g - ke a,   c = a / VD_L_PER_KG          (mg/kg, mg/kg, mg/L)
    e' = ke0 (c - e),   D = emax e / (ec50 + e)                         (mg/L, mmHg)
    S' = (sbp0 - D + act_sbp A - S) / tau_p                             SBP (mmHg)
    Q' = (act_sbp A - Q) / tau_p                                        activity's part of S
    H' = (hr0 + baro (sbp0 - P) + act_hr A - H) / tau_h,   P = S - Q    heart rate (bpm)

``u`` is the dose rate, ``A`` the activity (0..1). Activity resets the baroreflex set point by the
pressure it causes itself (``Q``, central command, as in the built-in simulator), so the reflex
answers the drug's fall ``D`` (and any departure of the reading from the set point at the origin),
not the rise activity causes. ``P = S - Q`` obeys ``P' = (sbp0 - D - P) / tau_p``: the core steps
``S`` and ``P``. SBP and heart rate start at their last readings and relax to their targets.

Discretisation, chosen so the guarantees hold for any parameters in range and any step:
- kinetics: ``(g, a, e)`` is linear under a constant dose rate, stepped exactly with the matrix
  exponential of its (augmented) system matrix. That matrix is Metzler (its off-diagonal entries
  ``ka``, ``ke0 / VD_L_PER_KG`` are non-negative), so its exponential and the step's response to
  the dose rate are non-negative entrywise (rounding is clipped at 0): every compartment at the
  end of a step is non-decreasing in every compartment at its start and in the dose. What entered
  the blood is what left the gut depot (given + depot before - depot after), so drug absorbed
  never exceeds what was given;
- SBP, ``P`` and heart rate: exponential-integrator steps (factors ``alpha = exp(-h/tau_p)`` and
  ``beta = exp(-h/tau_h)`` in (0, 1)) towards the step's target, with the step's mean effect-site
  concentration. A new value is non-decreasing in the previous one and in the target; the SBP and
  ``P`` targets fall with ``D``, which rises with the concentration; the heart-rate target falls
  with ``P``. So, step by step, **more drug (now or earlier in the context) never raises SBP and
  never lowers heart rate**. Activity in a step raises the SBP and heart-rate targets and leaves
  ``P`` alone; activity earlier in the context raises ``Q`` at the origin, which lowers ``P`` (SBP
  starts from its reading) and so raises heart rate: **more activity never lowers either**. The
  clamps to physiological limits are non-decreasing maps and keep every inequality (tested with
  hypothesis).
Before the forecast origin the kinetics are warmed up over the whole context from the steady state
of no drug, ``COARSE`` steps at a time (the block's doses spread evenly over it: a dose hours ago
needs no 5-minute timing) but the last ``FINE_STEPS`` one step at a time; ``Q`` at the origin is
the exact geometric sum of the recorded activity. Steps the record does not reach are taken as no
drug and no activity.
"""

from __future__ import annotations

import math

import torch

from twinfed.models.cores.base import Param

LN2 = math.log(2.0)
PARAMS: tuple[Param, ...] = (
    Param("ka", 0.005, 0.08, "1/min", "oral absorption rate"),
    Param("ke", LN2 / (32 * 60), LN2 / (2 * 60), "1/min", "elimination rate (half-life 2 to 32 h)"),
    Param("ke0", 0.002, 0.06, "1/min", "effect-site equilibration rate"),
    Param("emax", 8.0, 100.0, "mmHg", "the drug's maximal SBP reduction"),
    Param("ec50", 0.02, 0.7, "mg/L", "effect-site concentration for half the maximal reduction"),
    Param("sbp0", 100.0, 220.0, "mmHg", "untreated resting SBP, the baroreflex set point"),
    Param("tau_p", 2.0, 40.0, "min", "lag of pressure behind its target"),
    Param("hr0", 45.0, 115.0, "bpm", "resting heart rate at the set point"),
    Param("baro", 0.06, 4.0, "bpm per mmHg",
          "baroreflex gain at age 50: heart-rate rise per mmHg below the set point"),
    Param("tau_h", 0.5, 20.0, "min", "lag of heart rate behind its target"),
    Param("act_sbp", 3.0, 60.0, "mmHg", "SBP rise at full activity"),
    Param("act_hr", 8.0, 150.0, "bpm", "heart-rate rise at full activity"),
)
VD_L_PER_KG = 2.0  # apparent volume V/F of an oral antihypertensive (L per kg body weight)
REFERENCE_AGE_YEARS = 50.0
BARO_HALVING_YEARS = 40.0  # baroreflex sensitivity falls with age (stiffer arteries)
COARSE, FINE_STEPS = 6, 6  # the warm-up's blocks: 30 min, but the last half hour at 5 min
SBP_FLOOR, SBP_CEIL = 40.0, 300.0
HR_FLOOR, HR_CEIL = 20.0, 250.0


def age_scales(age_years: torch.Tensor) -> dict[str, torch.Tensor]:
    """Factors on parameters whose physiological range moves with age (like ``per_kg`` with
    weight): the baroreflex gain's."""
    years = age_years.clamp(0.0, 120.0)
    return {"baro": torch.exp(LN2 * (REFERENCE_AGE_YEARS - years) / BARO_HALVING_YEARS)}


class CardioCore(torch.nn.Module):
    """Parameter-free: ``forward(theta, ...)`` with theta from :func:`bounded` (and ``age_scales``)."""

    PARAMS = PARAMS

    def __init__(self, step_minutes: float):
        super().__init__()
        self.h = float(step_minutes)

    @staticmethod
    def kinetics(theta: dict[str, torch.Tensor], h: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact step of ``h`` minutes of ``(g, a, e)``: the transition ``[..., 3, 3]`` and the
        response ``[..., 3]`` to a dose rate of 1 mg/kg/min held over the step."""
        ka, ke, ke0 = theta["ka"], theta["ke"], theta["ke0"]
        o = torch.zeros_like(ka)
        # The system augmented with the dose rate as a fourth, constant state: one matrix
        # exponential gives both the transition and the response to the rate.
        rows = ((-ka, o, o, o + 1.0), (ka, -ke, o, o), (o, ke0 / VD_L_PER_KG, -ke0, o), (o, o, o, o))
        m = torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)
        full = torch.linalg.matrix_exp(m * h).clamp(min=0.0)
        return full[..., :3, :3], full[..., :3, 3]

    @staticmethod
    def _pk(x: torch.Tensor, amount: torch.Tensor, h: float,
            step: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(g, a, e)`` ``[..., 3]`` after ``h`` minutes in which ``amount`` (mg/kg) was taken,
        spread evenly; and what entered the blood, by mass balance on the gut depot."""
        transition, response = step
        # A 3x3 product written out elementwise: cheaper than a batched matmul this small.
        new = (transition * x.unsqueeze(-2)).sum(-1) + response * (amount / h).unsqueeze(-1)
        absorbed = (amount + x[..., 0] - new[..., 0]).clamp(min=0.0)
        return new, absorbed

    def warmup(self, theta: dict[str, torch.Tensor], dose: torch.Tensor, activity: torch.Tensor,
               mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Drug amounts and concentrations, and activity's part of SBP, at the forecast origin,
        from the recorded doses (mg/kg) and activity ``[..., L]`` per step, ``mask`` 1 where the
        record reaches."""
        dose, activity = dose * mask, activity * mask
        length = dose.shape[-1]
        fine = min(FINE_STEPS, length)
        # Pad the oldest end with steps of no drug to whole blocks: from the no-drug steady state
        # they change nothing.
        pad = (-(length - fine)) % COARSE
        old = torch.nn.functional.pad(dose[..., : length - fine], (pad, 0))
        old = old.reshape(*dose.shape[:-1], -1, COARSE).sum(-1)
        x = torch.zeros(*theta["ka"].shape, 3, dtype=dose.dtype, device=dose.device)
        if old.shape[-1]:
            coarse = self.kinetics(theta, self.h * COARSE)
            for b in range(old.shape[-1]):
                x, _ = self._pk(x, old[..., b], self.h * COARSE, coarse)
        step = self.kinetics(theta, self.h)
        for t in range(length - fine, length):
            x, _ = self._pk(x, dose[..., t], self.h, step)
        # Q after the record: sum over steps of (1 - alpha) alpha^age act_sbp A (age 0: the last).
        age = torch.arange(length - 1, -1, -1, dtype=dose.dtype, device=dose.device)
        tau_p = theta["tau_p"].unsqueeze(-1)
        kept = torch.exp(-self.h * age / tau_p)
        q = theta["act_sbp"] * -torch.expm1(-self.h / theta["tau_p"]) * (activity * kept).sum(-1)
        return {"gut": x[..., 0], "central": x[..., 1], "effect": x[..., 2], "q": q}

    def forward(self, theta: dict[str, torch.Tensor], state: dict[str, torch.Tensor], sbp: torch.Tensor,
                hr: torch.Tensor, dose: torch.Tensor, activity: torch.Tensor, *, carry: bool = False):
        """SBP (mmHg) and heart rate (bpm) ``[..., K]`` at the end of each future step, from the
        warmed-up ``state``, the last readings ``sbp``, ``hr`` and the planned doses (mg/kg) and
        activity ``[..., K]``. ``carry``: also return the state at the end (like :meth:`warmup`'s:
        ``q`` such that ``P = S - q`` holds at the last step), to continue the forecast exactly."""
        h = self.h
        step = self.kinetics(theta, h)
        alpha = torch.exp(-h / theta["tau_p"])
        beta = torch.exp(-h / theta["tau_h"])
        x = torch.stack([state["gut"], state["central"], state["effect"]], dim=-1)
        p = sbp - state["q"]
        s, r = sbp, hr
        sbps, hrs = [], []
        for t in range(dose.shape[-1]):
            x_new, _ = self._pk(x, dose[..., t], h, step)
            e = (0.5 * (x[..., 2] + x_new[..., 2])).clamp(min=0.0)
            x = x_new
            rest = theta["sbp0"] - theta["emax"] * e / (theta["ec50"] + e)
            s = (alpha * s + (1 - alpha) * (rest + theta["act_sbp"] * activity[..., t])).clamp(SBP_FLOOR, SBP_CEIL)
            p_new = alpha * p + (1 - alpha) * rest
            drive = (theta["hr0"] + theta["baro"] * (theta["sbp0"] - 0.5 * (p + p_new))
                     + theta["act_hr"] * activity[..., t])
            r = (beta * r + (1 - beta) * drive).clamp(HR_FLOOR, HR_CEIL)
            p = p_new
            sbps.append(s)
            hrs.append(r)
        paths = torch.stack(sbps, dim=-1), torch.stack(hrs, dim=-1)
        if not carry:
            return paths
        return paths, {"gut": x[..., 0], "central": x[..., 1], "effect": x[..., 2], "q": s - p}

    @staticmethod
    def clinical(theta: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The parameters in a clinician's terms at the forecast origin."""
        e = state["effect"]
        return {
            "drug_concentration_mg_per_l": state["central"] / VD_L_PER_KG,
            "effect_site_concentration_mg_per_l": e,
            "sbp_lowering_now_mmhg": theta["emax"] * e / (theta["ec50"] + e),
            "max_sbp_reduction_mmhg": theta["emax"],
            "ec50_mg_per_l": theta["ec50"],
            "sbp_set_point_mmhg": theta["sbp0"],
            "hr_baseline_bpm": theta["hr0"],
            "baroreflex_gain_bpm_per_mmhg": theta["baro"],
            "drug_half_life_h": LN2 / theta["ke"] / 60.0,
            "absorption_half_life_min": LN2 / theta["ka"],
            "effect_delay_half_life_min": LN2 / theta["ke0"],
            "sbp_rise_at_full_activity_mmhg": theta["act_sbp"],
            "hr_rise_at_full_activity_bpm": theta["act_hr"],
        }
