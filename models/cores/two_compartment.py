"""The glucose-insulin core's second structure: two glucose compartments and three insulin
actions of their own speeds (Hovorka et al. 2004 in spirit), the structure the minimal core lacks
where an insulin response lasts hours.

Same roles, interface and guarantees as :class:`~twinfed.models.cores.glucose.GlucoseInsulinCore`
(the "minimal" structure); a twin that declares both averages them. Bergman's single action
``X G`` rises and decays with one time constant, so a response that peaks at 3-4 h and is still
large at 8-12 h (as insulin does in a Hovorka-type patient) is out of its reach. Here insulin
acts three ways, each with its own dynamics: on uptake from the accessible compartment (the slow
action, rate ``ka1``: time constants from 50 min to 11 h), on disposal from the non-accessible one
(fast) and on endogenous production (saturating suppression). Suppressed production lowers glucose
without the restoring force that removal proportional to glucose has, so with little glucose
effectiveness an effect lasts hours. Fitted to the Hovorka simulator's median patient, it is
mostly that path which carries the tail: a 2 U bolus at fasting -28 / -56 / -52 mg/dL at 2 / 4 /
8 h against -35 / -59 / -49 (the minimal core fitted on such patients: about -22 / -33 / -20).

Per patient (bounded, see ``PARAMS``): insulin sensitivity ``si`` (insulin-stimulated glucose
removal, slow and fast actions together, per U/min of plasma insulin), the slow action's share
``slow`` and rate ``ka1``, the sensitivity of hepatic production ``se``, the basal rate ``basal``
and the glucose ``gb`` it holds without food, glucose effectiveness ``sg``, the compartments'
exchange rate ``k12``, subcutaneous absorption ``tau_i``, gut absorption ``tau_c`` and ``cf``
(the rise of glucose per gram absorbed, as in the minimal core). Glucose amounts are in mg/dL of
the accessible volume, time in minutes:

    s1' = u_I - s1/tau_i,   s2' = (s1 - s2)/tau_i,   I = s2/tau_i            (U, U/min)
    x1' = ka1 (slow si I - x1)        slow action: uptake from the accessible compartment
    x2' = KA2 ((1-slow) si I - x2)    fast action: disposal from the non-accessible one
    x3' = KA3 (se I - x3)             suppression of endogenous production
    G'  = -(sg + x1) G - k12 (G - G2) + EGP + Ra     accessible glucose (the sensor's)
    G2' = k12 (G - G2) - M(G) x2 G2                 non-accessible glucose
    EGP = egp_b exp(-(x3 - x3_b))     saturating: never negative, suppressed fully at high insulin
    q1' = u_C - q1/tau_c,   q2' = (q1 - q2)/tau_c,   Ra = cf q2/tau_c    (g, mg/dL/min)

``I`` is plasma insulin as a rate (U/min): plasma clearance (minutes) is quick beside a step, so
plasma insulin follows absorption. ``egp_b`` is what holds the basal steady state (basal insulin,
no food) at ``gb``: ``egp_b = gb (sg + x1_b) + k12 (gb - G2_b)`` with ``x_b`` the actions at
basal insulin and ``G2_b = k12 gb / (k12 + M(gb) x2_b)``. ``M(G) = 1 + HYPO_GAIN ln(G_HYPO /
max(G, G_HYPO_FLOOR))^2`` below ``G_HYPO`` (1 above) makes insulin-driven disposal stronger in
hypoglycaemia, as the risk term of UVA/Padova does.

Departure from Hovorka: there, insulin *transports* glucose from the accessible compartment to the
non-accessible one, from which it can return. Then more insulin can raise glucose later (glucose
parked in ``G2`` flows back), so that form cannot guarantee the sign of a treatment's effect. Here
insulin's slow action removes glucose from the accessible compartment for good (uptake into the
cells), and distribution between the compartments is insulin-independent exchange ``k12``: every
coupling between compartments is non-negative and every action only removes glucose.

Discretisation, chosen so the guarantees hold for any parameters in range and any step:
- absorption: the chains are stepped exactly (``chain_step``) and what enters the blood is the
  mass that left the depots, so insulin and carbohydrate absorbed never exceed what was given;
- actions: exact exponential steps under the step's mean plasma insulin (what was absorbed
  over it / h), so each action is non-decreasing in the insulin given, now or before;
- glucose: exponential-integrator steps of each compartment (``y e^{-ch} + inflow (1 -
  e^{-ch}) / c``) with the step's mean actions, the other compartment's value at the step's start
  and ``M`` at the step's start. ``G`` after the step is non-increasing in ``x1`` and ``x3`` and
  non-decreasing in ``G``, ``G2`` and the appearance; ``G2`` after it is non-increasing in ``x2``
  and non-decreasing in ``G`` (also through ``M``, which falls as ``G`` rises) and ``G2``.
  Composed step after step, **the forecast never rises with more insulin (now or earlier) and
  never falls with more carbohydrate**: the sign of a treatment's effect is right by construction (tested with
  hypothesis). The clamp of glucose to [10, 1000] mg/dL is non-decreasing and keeps it.
Before the forecast origin the depots and actions are warmed up over the last ``WARMUP_STEPS``
of the record from the basal steady state (no food) in the minimal core's blocks. Glucose starts
at its last reading, the non-accessible compartment at its quasi-steady value for that reading and
the warmed-up disposal action (a state carried from an earlier forecast keeps its own).
"""

from __future__ import annotations

import torch

from twinfed.models.cores import CoreBinding
from twinfed.models.cores.base import Param, chain_step

PARAMS: tuple[Param, ...] = (
    Param("si", 0.03, 3.0, "1/min per U/min", "insulin sensitivity: glucose removal per plasma insulin",
          per_kg=-1),
    Param("slow", 0.1, 0.95, "1", "share of insulin-stimulated removal through the slow action"),
    Param("ka1", 0.0015, 0.02, "1/min", "rate of the slow insulin action (hours-long tails)"),
    Param("se", 2.0, 200.0, "1 per U/min", "sensitivity of endogenous glucose production to insulin",
          per_kg=-1),
    Param("basal", 0.2, 8.0, "U/h", "basal insulin rate holding gb without food", per_kg=1),
    Param("gb", 70.0, 280.0, "mg/dL", "glucose held by basal insulin without food"),
    Param("sg", 0.0001, 0.03, "1/min", "glucose effectiveness (insulin-independent uptake)"),
    Param("k12", 0.03, 0.12, "1/min", "exchange between the accessible and non-accessible compartments"),
    Param("tau_i", 20.0, 150.0, "min", "subcutaneous insulin absorption time"),
    Param("tau_c", 10.0, 150.0, "min", "carbohydrate absorption time"),
    Param("cf", 1.0, 30.0, "mg/dL per g", "glucose rise per gram of carbohydrate", per_kg=-1),
)
KA2 = 0.056  # 1/min: the fast (disposal) action, Hovorka's ka2
KA3 = 0.024  # 1/min: the action on endogenous production, Hovorka's ka3
G_HYPO, G_HYPO_FLOOR, HYPO_GAIN = 100.0, 50.0, 4.0  # M(60 mg/dL) = 2.0, M(50) = 2.9
WARMUP_STEPS = 72  # 6 hours, as the minimal core
COARSE, FINE_STEPS = 3, 6
G_FLOOR, G_CEIL = 10.0, 1000.0


def hypo_multiplier(g: torch.Tensor) -> torch.Tensor:
    """``M(G)``: 1 at or above ``G_HYPO``, rising as glucose falls below it (non-increasing in G)."""
    low = torch.log(G_HYPO / g.clamp(G_HYPO_FLOOR, G_HYPO))
    return 1.0 + HYPO_GAIN * low * low


class TwoCompartmentCore(torch.nn.Module):
    """Parameter-free: ``forward(theta, ...)`` with theta from :func:`~twinfed.models.cores.base.bounded`."""

    PARAMS = PARAMS

    def __init__(self, step_minutes: float):
        super().__init__()
        self.h = float(step_minutes)

    # -- the basal steady state ----------------------------------------------------------------

    @staticmethod
    def _sensitivities(theta) -> torch.Tensor:
        """Each action's steady state per U/min of plasma insulin ``[..., 3]``."""
        return torch.stack([theta["si"] * theta["slow"], theta["si"] * (1 - theta["slow"]), theta["se"]], -1)

    @staticmethod
    def _rates(theta) -> torch.Tensor:
        ka1 = theta["ka1"]
        return torch.stack([ka1, torch.full_like(ka1, KA2), torch.full_like(ka1, KA3)], -1)

    def _basal(self, theta) -> dict[str, torch.Tensor]:
        """The actions ``x_b``, ``G2_b`` and ``egp_b`` of the basal steady state."""
        x_b = self._sensitivities(theta) * (theta["basal"] / 60.0).unsqueeze(-1)
        gb, k12 = theta["gb"], theta["k12"]
        g2_b = k12 * gb / (k12 + hypo_multiplier(gb) * x_b[..., 1])
        egp_b = gb * (theta["sg"] + x_b[..., 0]) + k12 * (gb - g2_b)
        return {"x": x_b, "g2": g2_b, "egp": egp_b}

    # -- steps ----------------------------------------------------------------------------------

    @staticmethod
    def _taus(theta) -> torch.Tensor:
        return torch.stack([theta["tau_i"], theta["tau_c"]], dim=-1)

    @staticmethod
    def _decays(theta, tau, rates, h):
        return torch.exp(-h / tau), torch.exp(-rates * h)

    @staticmethod
    def _step(sens, tau, s1, s2, x, given, h, decays):
        """``h`` minutes of the depots and actions under the amounts ``given`` (``[..., 2]``,
        spread evenly); returns them, the step's mean actions and the carbohydrate absorbed."""
        e_chain, e_x = decays
        s1, s2, absorbed = chain_step(s1, s2, given / h, tau, h, e_chain)
        x_new = x * e_x + sens * (absorbed[..., :1] / h) * (1 - e_x)
        return s1, s2, x_new, 0.5 * (x + x_new), absorbed[..., 1]

    def warmup(self, theta: dict[str, torch.Tensor], insulin: torch.Tensor, carbs: torch.Tensor,
               mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Depots and actions at the forecast origin from the recorded amounts ``[..., L]`` (per
        step), ``mask`` 1 where the record reaches (steps it does not reach: basal insulin, no
        food). All but the last ``FINE_STEPS`` are taken ``COARSE`` steps at a time."""
        basal_step = theta["basal"] * self.h / 60.0
        given = torch.stack([mask * insulin + (1 - mask) * basal_step.unsqueeze(-1), mask * carbs], dim=-1)
        tau, sens, rates = self._taus(theta), self._sensitivities(theta), self._rates(theta)
        steady = torch.stack([theta["basal"] / 60.0 * theta["tau_i"], torch.zeros_like(theta["basal"])], -1)
        s1, s2 = steady, steady
        x = sens * (theta["basal"] / 60.0).unsqueeze(-1)
        length = given.shape[-2]
        fine = min(FINE_STEPS, length)
        n_coarse = (length - fine) // COARSE
        head = length - fine - n_coarse * COARSE
        coarse = given[..., head: head + n_coarse * COARSE, :]
        coarse = coarse.reshape(*coarse.shape[:-2], n_coarse, COARSE, coarse.shape[-1]).sum(-2)
        blocks = [(1, given[..., t, :]) for t in range(head)]
        blocks += [(COARSE, coarse[..., b, :]) for b in range(n_coarse)]
        blocks += [(1, given[..., t, :]) for t in range(length - fine, length)]
        decays = {}
        for n, amount in blocks:
            h = self.h * n
            if h not in decays:
                decays[h] = self._decays(theta, tau, rates, h)
            s1, s2, x, _, _ = self._step(sens, tau, s1, s2, x, amount, h, decays[h])
        return self._state(s1, s2, x)

    @staticmethod
    def _state(s1, s2, x, g2=None) -> dict[str, torch.Tensor]:
        state = {"s1": s1[..., 0], "s2": s2[..., 0], "q1": s1[..., 1], "q2": s2[..., 1],
                 "x1": x[..., 0], "x2": x[..., 1], "x3": x[..., 2]}
        if g2 is not None:
            state["g2"] = g2
        return state

    def forward(self, theta: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                g0: torch.Tensor, insulin: torch.Tensor, carbs: torch.Tensor, *,
                carry: bool = False):
        """Glucose ``[..., K]`` (mg/dL) at the end of each future step, from the warmed-up
        ``state``, the last reading ``g0`` and the planned amounts ``[..., K]``. ``carry``: also
        return the state at the end (with the non-accessible glucose ``g2``), so a forecast can be
        continued exactly."""
        h = self.h
        tau, sens, rates = self._taus(theta), self._sensitivities(theta), self._rates(theta)
        s1 = torch.stack([state["s1"], state["q1"]], -1)
        s2 = torch.stack([state["s2"], state["q2"]], -1)
        x = torch.stack([state["x1"], state["x2"], state["x3"]], -1)
        basal = self._basal(theta)
        k12, sg, cf = theta["k12"], theta["sg"], theta["cf"]
        g = g0
        if "g2" in state:
            g2 = state["g2"]
        else:  # quasi-steady for the reading and the warmed-up disposal action
            g2 = k12 * g0 / (k12 + hypo_multiplier(g0) * state["x2"])
        given = torch.stack([insulin, carbs], dim=-1)
        decays = self._decays(theta, tau, rates, h)
        egp_b, x3_b = basal["egp"], basal["x"][..., 2]
        out = []
        for t in range(given.shape[-2]):
            s1, s2, x, xm, carbs_in = self._step(sens, tau, s1, s2, x, given[..., t, :], h, decays)
            m = hypo_multiplier(g)
            # the accessible compartment: removal sg + x1 + k12, inflow k12 G2 + EGP + Ra
            c1 = sg + xm[..., 0] + k12
            inflow = k12 * g2 + egp_b * torch.exp(x3_b - xm[..., 2]) + cf * carbs_in / h
            e1 = torch.exp(-c1 * h)
            # the non-accessible compartment: removal k12 + M x2, inflow k12 G
            c2 = k12 + m * xm[..., 1]
            e2 = torch.exp(-c2 * h)
            g_new = g * e1 + inflow * (1 - e1) / c1
            g2 = g2 * e2 + k12 * g * (1 - e2) / c2
            g = g_new.clamp(G_FLOOR, G_CEIL)
            out.append(g)
        path = torch.stack(out, dim=-1)
        if not carry:
            return path
        return path, self._state(s1, s2, x, g2)

    def clinical(self, theta: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                 g_ref: float = 140.0) -> dict[str, torch.Tensor]:
        """The parameters in a clinician's terms at the forecast origin. The insulin sensitivity
        factor is the fall a unit causes near ``g_ref`` when its whole action has run (removal
        ``si g_ref`` plus the production it suppresses, linearised at basal)."""
        basal = self._basal(theta)
        isf = theta["si"] * g_ref + basal["egp"] * theta["se"]
        return {
            "insulin_sensitivity_mgdl_per_u": isf,
            "carb_ratio_g_per_u": isf / theta["cf"],
            "carb_factor_mgdl_per_g": theta["cf"],
            "basal_u_per_h": theta["basal"],
            "insulin_on_board_u": state["s1"] + state["s2"] - theta["basal"] / 60.0 * theta["tau_i"] * 2,
            "carbs_on_board_g": state["q1"] + state["q2"],
            "glucose_effectiveness_per_min": theta["sg"],
            "insulin_absorption_min": theta["tau_i"],
            "carb_absorption_min": theta["tau_c"],
            "slow_action_hours": 1.0 / (60.0 * theta["ka1"]),
            "endogenous_production_mgdl_per_min": basal["egp"],
        }


class TwoCompartmentBinding(CoreBinding):
    """The two-compartment core on a spec's glucose state, insulin and carbohydrate controls and
    body-weight covariate (the minimal core's roles)."""

    def __init__(self, spec):
        super().__init__(spec, TwoCompartmentCore(spec.step_minutes))
        self.warmup = min(WARMUP_STEPS, spec.context_length)

    def origin(self, theta: dict, u: dict) -> dict[str, torch.Tensor]:
        w = self.warmup
        return self.core.warmup(theta, self.recorded(u, "insulin", w), self.recorded(u, "carbs", w),
                                u["mask"][..., -w:])

    def run(self, theta: dict, state: dict, u: dict, *, carry: bool = False):
        out = self.core(theta, state, self.last(u, "glucose"), self.planned(u, "insulin"),
                        self.planned(u, "carbs"), carry=carry)
        return ({"glucose": out[0]}, out[1]) if carry else {"glucose": out}



