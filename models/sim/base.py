"""What every built-in virtual-patient simulator returns, and how sites differ.

A simulator is two pure functions over patients (numpy arrays, one row per patient):
``generate`` draws a population's parameters, covariates and open-loop treatment, then calls
``simulate``; ``simulate`` maps parameters and controls to state trajectories. Because the
treatment policy is open-loop, a what-if's mechanistic truth is simply ``simulate`` again with
the changed controls.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class SiteProfile:
    """A hospital's population and treatment habits (what makes sites non-IID)."""

    name: str
    description: str
    settings: dict[str, float] = field(default_factory=dict)


@dataclass
class SimCohort:
    """One site's virtual patients.

    ``states`` hold what the hospital would export (sensor noise included, clipped to the spec's
    range); ``params`` hold everything ``simulate`` needs to replay a patient without noise.
    """

    patient_ids: list[str]
    covariates: dict[str, np.ndarray]  # column -> [P]
    params: dict[str, np.ndarray]  # parameter -> [P]
    states: dict[str, np.ndarray]  # state column -> [P, T]
    controls: dict[str, np.ndarray]  # control column -> [P, T]

    @property
    def n_patients(self) -> int:
        return len(self.patient_ids)

    @property
    def n_steps(self) -> int:
        return next(iter(self.states.values())).shape[1]


def lognormal(rng: np.random.Generator, median: float, cv: float, n: int, *,
              within_sd: float | None = None) -> np.ndarray:
    """``n`` log-normal draws with the given median and log-scale spread (physiological rates);
    ``within_sd`` keeps every draw that many log-scale spreads of the median (no absurd patient)."""
    z = rng.normal(0.0, cv, n)
    if within_sd is not None:
        z = np.clip(z, -within_sd * cv, within_sd * cv)
    return median * np.exp(z)
