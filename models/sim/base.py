"""What every built-in virtual-patient simulator returns, and how sites differ.

A simulator is two pure functions over patients (numpy arrays, one row per patient):
``generate`` draws a population's parameters, covariates and treatment, then calls ``simulate``;
``simulate`` maps parameters and controls to state trajectories.

Care comes in two policies (``CARE_POLICIES``). ``"routine"`` (the default) is care as real
records hold it: part of it reacts to the readings as they are simulated (a correction bolus
after a high glucose, fast carbohydrate after a low one, a dose titrated when pressure stays
high), so ``simulate(params, plan, care=policy)`` asks the policy once per step and returns the
controls actually given with the states. ``"plain"`` is the open-loop care of the cohorts made
before routine care existed, reproduced byte for byte. Either way the controls a cohort records
are the ones given, so a what-if's mechanistic truth is ``simulate`` again (open loop, no care)
with the changed controls: replaying the recorded controls gives the recorded states' truth.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from twinfed.errors import DataError

CARE_POLICIES: tuple[str, ...] = ("routine", "plain")

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
    # What routine care did, per patient (event name -> [P] counts); empty under plain care.
    care_log: dict[str, np.ndarray] = field(default_factory=dict)

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


def check_care(care: str) -> str:
    """``care`` if it is one of the care policies (one-line error otherwise)."""
    if care not in CARE_POLICIES:
        raise DataError(f"unknown care {care!r}; choose {' or '.join(CARE_POLICIES)} "
                        f"(default {CARE_POLICIES[0]})")
    return care


def child_rng(rng: np.random.Generator) -> np.random.Generator:
    """An independent generator for routine care's own draws that leaves ``rng``'s stream as it
    was: the same seed then gives routine and plain cohorts the same patients, meals and sensor
    noise, and the two differ only by the care."""
    return rng.spawn(1)[0]
