"""The cardio core's second structure: the drug lowers pressure through an indirect response on
peripheral resistance (Jusko type I), not through an effect compartment.

Same roles, same interface and same guarantees as :class:`~twinfed.models.cores.cardio.CardioCore`
(the "effect-compartment" structure); a twin that declares both averages them, and their
disagreement widens its intervals. The two structures differ where it matters for a trial: the
effect compartment lags the *concentration* and saturates afterwards, so its time of maximal effect
after a dose is the same for every dose; here the drug saturates first (it inhibits the
*production* of resistance) and resistance turns over slowly afterwards, so a larger dose keeps
production inhibited longer and the fall in pressure peaks later and lasts longer (the
hallmark of indirect-response models, Sharma & Jusko 1998).

Per patient (bounded, see ``PARAMS``): absorption ``ka`` and elimination ``ke`` (the kinetics of
the effect-compartment structure); the turnover rate ``kout`` of peripheral resistance, the drug's
maximal fractional inhibition of its production ``imax`` and the concentration for half of it
``ic50``; and, with the effect-compartment structure's meanings and ranges, ``sbp0``, ``tau_p``,
``hr0``, ``baro``, ``tau_h``, ``act_sbp``, ``act_hr``. Doses enter in mg per kg of body weight
(apparent volume ``VD_L_PER_KG`` x weight); the baroreflex gain's range moves with age
(:func:`~twinfed.models.cores.cardio.age_scales`).

    g' = u - ka g,   a' = ka g - ke a,   c = a / VD_L_PER_KG             (mg/kg, mg/kg, mg/L)
    R' = kout (1 - I(c) - R),   I(c) = imax c / (ic50 + c)               resistance (1 untreated)
    S' = (sbp0 R + act_sbp A - S) / tau_p                                SBP (mmHg)
    Q' = (act_sbp A - Q) / tau_p                                         activity's part of S
    H' = (hr0 + baro (sbp0 - P) + act_hr A - H) / tau_h,   P = S - Q     heart rate (bpm)

``u`` is the dose rate, ``A`` the activity (0..1). Pressure is flow times resistance: with cardiac
output at its set point, resting SBP is ``sbp0 R``; ``R`` relaxes from 1 towards ``1 - I(c)`` with
the turnover time ``1 / kout`` (hours), and stays in ``[1 - imax, 1]``. Activity and the baroreflex
act as in the effect-compartment structure (the reflex answers the drug's fall, not the rise
activity causes; ``P' = (sbp0 R - P) / tau_p``).

Discretisation, chosen so the guarantees hold for any parameters in range and any step:
- kinetics: ``(g, a)`` and the step's integral of ``c`` (a third, accumulating state) are linear
  under a constant dose rate, stepped exactly with the matrix exponential of the augmented system
  matrix. It is Metzler (off-diagonal entries ``ka``, ``1 / VD_L_PER_KG`` non-negative), so the
  exponential and the response to the dose rate are non-negative entrywise (rounding clipped at
  0): the amounts at the end of a step, and the step's mean concentration, are non-decreasing in
  the amounts at its start and in the dose. Drug absorbed is what left the gut depot (given +
  depot before - depot after): never more than was given;
- resistance: an exponential-integrator step (``gamma = exp(-kout h)`` in (0, 1)) towards
  ``1 - I(c_mean)`` with the step's exact mean concentration: non-decreasing in ``R`` before, and
  non-increasing in the concentration, as ``I`` is increasing;
- SBP, ``P`` and heart rate: exponential-integrator steps (``alpha = exp(-h / tau_p)``, ``beta =
  exp(-h / tau_h)``) towards targets built with the step's mean resistance, every coupling
  non-negative (``sbp0 > 0`` on ``R``, ``baro > 0`` on ``sbp0 - P``). So, step by step, **more drug
  (now or earlier in the context) never raises SBP and never lowers heart rate**; activity raises
  the SBP and heart-rate targets and leaves ``P`` alone, activity earlier in the context raises
  ``Q`` at the origin and so lowers ``P``: **more activity never lowers either**. The clamps to
  physiological limits are non-decreasing maps and keep every inequality (tested with hypothesis).
Without drug ``R`` stays exactly 1 and SBP, heart rate relax geometrically to ``sbp0``, ``hr0``.
Before the forecast origin kinetics and resistance are warmed up over the whole context from the
untreated steady state, in the effect-compartment structure's blocks (``COARSE`` steps, the
block's doses spread evenly over it, the last ``FINE_STEPS`` one step at a time); steps the record
does not reach are taken as no drug and no activity.
"""

from __future__ import annotations

import math

import torch

from twinfed.models.cores import CardioBinding
from twinfed.models.cores.base import Param
from twinfed.models.cores.cardio import (COARSE, FINE_STEPS, HR_CEIL, HR_FLOOR, PARAMS as EFFECT_PARAMS,
                                         SBP_CEIL, SBP_FLOOR, VD_L_PER_KG)

LN2 = math.log(2.0)
_SHARED = {p.name: p for p in EFFECT_PARAMS}
PARAMS: tuple[Param, ...] = (
    _SHARED["ka"],
    _SHARED["ke"],
    Param("kout", LN2 / (12 * 60), LN2 / 20, "1/min",
          "turnover rate of peripheral resistance (half-life 20 min to 12 h)"),
    Param("imax", 0.05, 0.6, "1", "the drug's maximal fractional inhibition of resistance production"),
    Param("ic50", 0.02, 0.7, "mg/L", "plasma concentration for half the maximal inhibition"),
    _SHARED["sbp0"],
    _SHARED["tau_p"],
    _SHARED["hr0"],
    _SHARED["baro"],
    _SHARED["tau_h"],
    _SHARED["act_sbp"],
    _SHARED["act_hr"],
)


class IndirectResponseCore(torch.nn.Module):
    """Parameter-free: ``forward(theta, ...)`` with theta from :func:`bounded` (and ``age_scales``)."""

    PARAMS = PARAMS

    def __init__(self, step_minutes: float):
        super().__init__()
        self.h = float(step_minutes)

    @staticmethod
    def kinetics(theta: dict[str, torch.Tensor], h: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact step of ``h`` minutes of ``(g, a, auc)`` (``auc``: the integral of the
        concentration, mg/L min): the transition ``[..., 3, 3]`` and the response ``[..., 3]`` to a
        dose rate of 1 mg/kg/min held over the step."""
        ka, ke = theta["ka"], theta["ke"]
        o = torch.zeros_like(ka)
        # The dose rate as a fourth, constant state: one matrix exponential gives both.
        rows = ((-ka, o, o, o + 1.0), (ka, -ke, o, o), (o, o + 1.0 / VD_L_PER_KG, o, o), (o, o, o, o))
        m = torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)
        full = torch.linalg.matrix_exp(m * h).clamp(min=0.0)
        return full[..., :3, :3], full[..., :3, 3]

    @staticmethod
    def _pk(g: torch.Tensor, a: torch.Tensor, amount: torch.Tensor, h: float,
            step: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gut and central amounts after ``h`` minutes in which ``amount`` (mg/kg) was taken,
        spread evenly; the mean concentration over those minutes; and what entered the blood, by
        mass balance on the gut depot. (The rows written out: no matrix product this small.)"""
        t, r = step
        rate = amount / h
        g_new = t[..., 0, 0] * g + r[..., 0] * rate
        a_new = t[..., 1, 0] * g + t[..., 1, 1] * a + r[..., 1] * rate
        mean_c = (t[..., 2, 0] * g + t[..., 2, 1] * a + r[..., 2] * rate) / h
        absorbed = (amount + g - g_new).clamp(min=0.0)
        return g_new, a_new, mean_c.clamp(min=0.0), absorbed

    @staticmethod
    def _resistance(theta: dict[str, torch.Tensor], r: torch.Tensor, mean_c: torch.Tensor,
                    gamma: torch.Tensor) -> torch.Tensor:
        target = 1.0 - theta["imax"] * mean_c / (theta["ic50"] + mean_c)
        return gamma * r + (1 - gamma) * target

    def warmup(self, theta: dict[str, torch.Tensor], dose: torch.Tensor, activity: torch.Tensor,
               mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Drug amounts, resistance and activity's part of SBP at the forecast origin, from the
        recorded doses (mg/kg) and activity ``[..., L]`` per step, ``mask`` 1 where the record
        reaches."""
        dose, activity = dose * mask, activity * mask
        length = dose.shape[-1]
        fine = min(FINE_STEPS, length)
        # Pad the oldest end with untreated steps to whole blocks: from the untreated steady
        # state they change nothing.
        pad = (-(length - fine)) % COARSE
        old = torch.nn.functional.pad(dose[..., : length - fine], (pad, 0))
        old = old.reshape(*dose.shape[:-1], -1, COARSE).sum(-1)
        g = torch.zeros(theta["ka"].shape, dtype=dose.dtype, device=dose.device)
        a = g
        r = g + 1.0
        if old.shape[-1]:
            hc = self.h * COARSE
            coarse, gamma = self.kinetics(theta, hc), torch.exp(-theta["kout"] * hc)
            for b in range(old.shape[-1]):
                g, a, c, _ = self._pk(g, a, old[..., b], hc, coarse)
                r = self._resistance(theta, r, c, gamma)
        step, gamma = self.kinetics(theta, self.h), torch.exp(-theta["kout"] * self.h)
        for t in range(length - fine, length):
            g, a, c, _ = self._pk(g, a, dose[..., t], self.h, step)
            r = self._resistance(theta, r, c, gamma)
        # Q after the record: sum over steps of (1 - alpha) alpha^age act_sbp A (age 0: the last).
        age = torch.arange(length - 1, -1, -1, dtype=dose.dtype, device=dose.device)
        kept = torch.exp(-self.h * age / theta["tau_p"].unsqueeze(-1))
        q = theta["act_sbp"] * -torch.expm1(-self.h / theta["tau_p"]) * (activity * kept).sum(-1)
        return {"gut": g, "central": a, "resistance": r, "q": q}

    def forward(self, theta: dict[str, torch.Tensor], state: dict[str, torch.Tensor], sbp: torch.Tensor,
                hr: torch.Tensor, dose: torch.Tensor, activity: torch.Tensor, *, carry: bool = False):
        """SBP (mmHg) and heart rate (bpm) ``[..., K]`` at the end of each future step, from the
        warmed-up ``state``, the last readings ``sbp``, ``hr`` and the planned doses (mg/kg) and
        activity ``[..., K]``. ``carry``: also return the state at the end (like :meth:`warmup`'s:
        ``q`` such that ``P = S - q`` holds at the last step), to continue the forecast exactly."""
        h = self.h
        step = self.kinetics(theta, h)
        gamma = torch.exp(-theta["kout"] * h)
        alpha = torch.exp(-h / theta["tau_p"])
        beta = torch.exp(-h / theta["tau_h"])
        sbp0 = theta["sbp0"]
        g, a, res = state["gut"], state["central"], state["resistance"]
        p = sbp - state["q"]
        s, r = sbp, hr
        sbps, hrs = [], []
        for t in range(dose.shape[-1]):
            g, a, c, _ = self._pk(g, a, dose[..., t], h, step)
            res_new = self._resistance(theta, res, c, gamma)
            rest = sbp0 * 0.5 * (res + res_new)
            res = res_new
            s = (alpha * s + (1 - alpha) * (rest + theta["act_sbp"] * activity[..., t])).clamp(SBP_FLOOR, SBP_CEIL)
            p_new = alpha * p + (1 - alpha) * rest
            drive = (theta["hr0"] + theta["baro"] * (sbp0 - 0.5 * (p + p_new))
                     + theta["act_hr"] * activity[..., t])
            r = (beta * r + (1 - beta) * drive).clamp(HR_FLOOR, HR_CEIL)
            p = p_new
            sbps.append(s)
            hrs.append(r)
        paths = torch.stack(sbps, dim=-1), torch.stack(hrs, dim=-1)
        if not carry:
            return paths
        return paths, {"gut": g, "central": a, "resistance": res, "q": s - p}

    @staticmethod
    def clinical(theta: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The parameters in a clinician's terms at the forecast origin, under the
        effect-compartment structure's keys: the "effect-site concentration" is the
        effect-equivalent one (the steady plasma concentration that would hold resistance where
        it is now), the "effect delay" is resistance's turnover half-life."""
        imax, ic50 = theta["imax"], theta["ic50"]
        inhibited = (1.0 - state["resistance"]).clamp(min=0.0)
        inhibited = torch.minimum(inhibited, imax * (1 - 1e-6))
        return {
            "drug_concentration_mg_per_l": state["central"] / VD_L_PER_KG,
            "effect_site_concentration_mg_per_l": ic50 * inhibited / (imax - inhibited),
            "sbp_lowering_now_mmhg": theta["sbp0"] * (1.0 - state["resistance"]),
            "max_sbp_reduction_mmhg": imax * theta["sbp0"],
            "ec50_mg_per_l": ic50,
            "sbp_set_point_mmhg": theta["sbp0"],
            "hr_baseline_bpm": theta["hr0"],
            "baroreflex_gain_bpm_per_mmhg": theta["baro"],
            "drug_half_life_h": LN2 / theta["ke"] / 60.0,
            "absorption_half_life_min": LN2 / theta["ka"],
            "effect_delay_half_life_min": LN2 / theta["kout"],
            "sbp_rise_at_full_activity_mmhg": theta["act_sbp"],
            "hr_rise_at_full_activity_bpm": theta["act_hr"],
        }


class IndirectResponseBinding(CardioBinding):
    """The indirect-response core on the cardio roles: CardioBinding's reading of the inputs
    (doses per kg of body weight, the whole context as warm-up, age scaling the baroreflex gain's
    range) with this structure's core, so a twin can swap one for the other."""

    def __init__(self, spec):
        super().__init__(spec)
        self.core = IndirectResponseCore(spec.step_minutes)
