"""The glucose-insulin core: Bergman's minimal model with insulin and carbohydrate absorption.

Per patient (bounded, see ``PARAMS``): insulin sensitivity ``si``, the basal insulin rate ``basal``
at which insulin action is zero, glucose effectiveness ``sg``, the glucose level ``gb`` basal
insulin holds without food, subcutaneous absorption ``tau_i``, insulin-action dynamics ``p2``,
gut absorption ``tau_c``, and ``cf`` (the rise of glucose per gram of carbohydrate absorbed).

    s1' = u_I - s1/tau_i,   s2' = (s1 - s2)/tau_i,   R_I = s2/tau_i              (U, U/min)
    X'  = p2 (si (R_I - basal/60) - X)                                            (1/min)
    q1' = u_C - q1/tau_c,   q2' = (q1 - q2)/tau_c,   Ra = cf q2/tau_c              (g, mg/dL/min)
    G'  = -max(sg + X, 0) G + sg gb + Ra                                           (mg/dL)

Discretisation, chosen so the guarantees hold for any parameters in range and any step:
- absorption: the chains are stepped exactly (``chain_step``) and what enters the blood is the
  mass that left the depots, so insulin and carbohydrate absorbed never exceed what was given;
- glucose: an exponential-integrator step with the step's mean action and appearance. It is
  non-increasing in the action and non-decreasing in the appearance and the previous glucose,
  and every absorption step is non-decreasing in what was given, so **the forecast never rises
  with more insulin and never falls with more carbohydrate**: the sign of a treatment's effect is
  right by construction (tested with hypothesis).
Before the forecast origin the insulin and gut depots and the insulin action are warmed up over
the last ``WARMUP_STEPS`` of the record from the patient's basal steady state (no food); glucose
starts at its last reading. Steps the record does not reach are taken as basal insulin, no food.
"""

from __future__ import annotations

import torch

from twinfed.models.cores.base import Param, chain_step

PARAMS: tuple[Param, ...] = (
    Param("si", 0.04, 4.0, "1/min per U/min", "insulin sensitivity", per_kg=-1),
    Param("basal", 0.2, 8.0, "U/h", "basal insulin rate at which insulin action is zero", per_kg=1),
    Param("sg", 0.001, 0.06, "1/min", "glucose effectiveness"),
    Param("gb", 70.0, 280.0, "mg/dL", "glucose held by basal insulin without food"),
    Param("tau_i", 20.0, 150.0, "min", "subcutaneous insulin absorption time"),
    Param("p2", 0.005, 0.12, "1/min", "rate of insulin action"),
    Param("tau_c", 10.0, 150.0, "min", "carbohydrate absorption time"),
    Param("cf", 1.0, 30.0, "mg/dL per g", "glucose rise per gram of carbohydrate", per_kg=-1),
)
WARMUP_STEPS = 72  # 6 hours: a bolus is > 99% absorbed and acted within it
COARSE, FINE_STEPS = 3, 6  # the warm-up's blocks: 15 min, but the last half hour at 5 min
G_FLOOR, G_CEIL = 10.0, 1000.0


class GlucoseInsulinCore(torch.nn.Module):
    """Parameter-free: ``forward(theta, ...)`` with theta from :func:`bounded`."""

    PARAMS = PARAMS

    def __init__(self, step_minutes: float):
        super().__init__()
        self.h = float(step_minutes)

    def warmup(self, theta: dict[str, torch.Tensor], insulin: torch.Tensor, carbs: torch.Tensor,
               mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Depots and action at the forecast origin from the recorded amounts ``[..., L]`` (per
        step), ``mask`` 1 where the record reaches. All but the last ``FINE_STEPS`` are taken
        ``COARSE`` steps at a time (amounts spread evenly over the block): a bolus hours ago
        needs no 5-minute timing, and the loop is three times shorter."""
        basal_step = theta["basal"] * self.h / 60.0
        given = torch.stack([mask * insulin + (1 - mask) * basal_step.unsqueeze(-1), mask * carbs], dim=-1)
        tau = self._taus(theta)
        # The insulin depots start at the basal steady state, the gut empty; action at zero.
        steady = torch.stack([theta["basal"] / 60.0 * theta["tau_i"], torch.zeros_like(theta["basal"])], -1)
        s1, s2 = steady, steady
        x = torch.zeros_like(theta["basal"])
        length = given.shape[-2]
        fine = min(FINE_STEPS, length)
        n_coarse = (length - fine) // COARSE
        head = length - fine - n_coarse * COARSE  # a few leftover oldest steps, stepped finely
        # Each block's amounts, summed in one operation (not one per block: a fit differentiates
        # through the warm-up dozens of times).
        coarse = given[..., head: head + n_coarse * COARSE, :]
        coarse = coarse.reshape(*coarse.shape[:-2], n_coarse, COARSE, coarse.shape[-1]).sum(-2)
        blocks = [(1, given[..., t, :]) for t in range(head)]
        blocks += [(COARSE, coarse[..., b, :]) for b in range(n_coarse)]
        blocks += [(1, given[..., t, :]) for t in range(length - fine, length)]
        decays = {}
        for n, amount in blocks:
            h = self.h * n
            if h not in decays:
                decays[h] = self._decays(theta, tau, h)
            s1, s2, x, _ = self._step(theta, tau, s1, s2, x, amount, h, decays[h])
        return {"s1": s1[..., 0], "s2": s2[..., 0], "x": x, "q1": s1[..., 1], "q2": s2[..., 1]}

    @staticmethod
    def _taus(theta) -> torch.Tensor:
        """The insulin and gut chains' time constants, side by side: one set of tensor operations
        steps both."""
        return torch.stack([theta["tau_i"], theta["tau_c"]], dim=-1)

    @staticmethod
    def _decays(theta, tau: torch.Tensor, h: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's decay factors, computed once per step length (not per step)."""
        return torch.exp(-h / tau), torch.exp(-theta["p2"] * h)

    def _step(self, theta, tau, s1, s2, x, given, h, decays):
        """``h`` minutes of every compartment under the amounts ``given`` (``[..., 2]``: insulin
        and carbohydrate, spread evenly); returns the depots, the action, and the step's mean
        action and glucose appearance."""
        e_chain, e_x = decays
        s1, s2, absorbed = chain_step(s1, s2, given / h, tau, h, e_chain)
        x_new = x * e_x + theta["si"] * (absorbed[..., 0] / h - theta["basal"] / 60.0) * (1 - e_x)
        ra = theta["cf"] * absorbed[..., 1] / h
        return s1, s2, x_new, (0.5 * (x + x_new), ra)

    def forward(self, theta: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                g0: torch.Tensor, insulin: torch.Tensor, carbs: torch.Tensor, *,
                carry: bool = False):
        """Glucose ``[..., K]`` (mg/dL) at the end of each future step, from the warmed-up
        ``state``, the last reading ``g0`` and the planned amounts ``[..., K]``. ``carry``: also
        return the compartments at the end (a state like :meth:`warmup`'s), so a forecast can
        be continued exactly (a trial's roll-forward)."""
        h = self.h
        tau = self._taus(theta)
        s1 = torch.stack([state["s1"], state["q1"]], -1)
        s2 = torch.stack([state["s2"], state["q2"]], -1)
        x = state["x"]
        given = torch.stack([insulin, carbs], dim=-1)
        decays = self._decays(theta, tau, h)
        inflow_base = theta["sg"] * theta["gb"]
        g = g0
        out = []
        for t in range(given.shape[-2]):
            s1, s2, x, (x_mean, ra) = self._step(theta, tau, s1, s2, x, given[..., t, :], h, decays)
            c = (theta["sg"] + x_mean).clamp(min=1e-5)
            g = g * torch.exp(-c * h) + (inflow_base + ra) * (-torch.expm1(-c * h)) / c
            g = g.clamp(G_FLOOR, G_CEIL)
            out.append(g)
        path = torch.stack(out, dim=-1)
        if not carry:
            return path
        return path, {"s1": s1[..., 0], "s2": s2[..., 0], "x": x, "q1": s1[..., 1], "q2": s2[..., 1]}

    @staticmethod
    def clinical(theta: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                 g_ref: float = 140.0) -> dict[str, torch.Tensor]:
        """The parameters in a clinician's terms at the forecast origin."""
        isf = theta["si"] * g_ref  # mg/dL a unit lowers glucose by, near g_ref (integral of X x G)
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
        }
