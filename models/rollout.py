"""A patient's twin rolled forward over days: the engine of an in-silico trial.

From a patient's last recorded step (the *origin*) the twin forecasts the next horizon under the
planned treatment, its forecast becomes the history of the next one, and so on over the whole
span. Its uncertainty is propagated: each forecast gets an error drawn from the twin's calibrated
forecast errors (:mod:`twinfed.models.calibration`), so the next horizon starts where the patient
might be, not only where the twin expects them; ``draws`` such paths per patient. The draws are
*common random numbers*: every treatment of a patient sees the same error draws, so a paired
contrast between treatments reflects the treatments, not the dice.

A hybrid twin is rolled forward as a simulation of its core, not as a chain of separately
warmed-up forecasts:
- its core parameters are fixed at the origin (the encoder's, plus the patient's identification
  when personalised, or one draw per path from its posterior): a patient's physiology does not
  change because the trial changed their treatment, and every treatment sees the same draw;
- the core's compartments (insulin and carbohydrate on board, drug amounts) carry on exactly from
  one horizon to the next; each horizon starts from the last forecast reading;
- the bounded correction reads the *reference* treatment's rolled-forward readings and the
  patient's *usual* treatment, never another treatment's: every treatment of a patient gets the
  same correction at every horizon, so treatments differ only through the core, as in a what-if,
  whose effects have the right direction by construction.
- an ensemble twin (several core structures, ``spec.core.structures``) runs one structure per
  path, draw ``d`` structure ``d mod M``, the same in every treatment: a patient's paths under
  each structure give that structure's outcomes, and their spread the trial's structural
  uncertainty (:func:`twinfed.models.trial.summarise`).
A neural twin (no core) sees what it always sees: the rolled history and the planned treatment.

The draws are **per patient**: each patient's errors come from their own generator, keyed by the
seed and the patient (:func:`twinfed.models.personalise.patient_rng`), so a patient's paths are
the same whoever is rolled forward with them, in whatever order or chunk. A released trial relies
on it (removing one patient leaves every other patient's outcomes unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from twinfed.models.cores import MEMBER
from twinfed.models.features import DELTA_UNITS
from twinfed.models.personalise import ROLLOUT, by_group, check_seed, patient_key, patient_rng, row_exact
from twinfed.models.site_data import SiteData
from twinfed.models.twin import Twin
from twinfed.models.windows import Batch, context_at

# draw(state j, rng, size) -> |normalised error| samples of state j (a calibration's sampler).
# ``rng`` hands out each patient's own uniforms (:class:`PatientUniforms`): a sampler draws from
# it once, ``rng.random(size)``, and maps each uniform to a score (an inverse CDF, as
# ``twinfed.models.conformal.sample_scores`` does), so every patient's scores are their own.
ScoreSampler = Callable[[int, "PatientUniforms", int], np.ndarray]


@dataclass(frozen=True)
class Origins:
    """Where each patient's roll-forward starts: the window ending at their origin row."""

    history: np.ndarray  # [P, H, S + C]: the recorded steps up to the origin
    context: np.ndarray  # [P, Lc, S + C] and its mask [P, Lc]: what a hybrid's encoder reads
    context_mask: np.ndarray
    covariates: np.ndarray  # [P, V]
    keys: np.ndarray  # [P] uint64: each patient's key (personalise.patient_key), whose draws are theirs

    @classmethod
    def at(cls, site: SiteData, patients: np.ndarray, origin_rows: np.ndarray) -> Origins:
        """``origin_rows``: each patient's origin as a row of ``site`` (its history must be
        ``history_steps`` contiguous rows ending there)."""
        h = site.spec.history_steps
        rows = origin_rows[:, None] + np.arange(-h + 1, 1)[None, :]
        context, mask = context_at(site, origin_rows, patients)
        keys = np.array([patient_key(site.patient_ids[p]) for p in patients], dtype=np.uint64)
        return cls(site.series[rows], context, mask, site.covariates[patients], keys)

    def __len__(self) -> int:
        return len(self.history)


@dataclass(frozen=True)
class Uncertainty:
    """The twin's forecast errors as calibrated: each patient's error scale per step and state
    (``[P, K, S]``, from their identification) and a sampler of the normalised error."""

    scales: np.ndarray
    sample: ScoreSampler


def roll_forward(twin: Twin, origins: Origins, controls: np.ndarray, *, usual: np.ndarray | None = None,
                 offset: torch.Tensor | None = None, uncertainty: Uncertainty | None = None,
                 draws: int = 1, seed: int = 0, reference: int = 0) -> np.ndarray:
    """The twin's states ``[P, draws, T, S]`` over the ``T`` steps after each origin, under the
    planned ``controls`` ``[P, T, C]``; or ``[A, P, draws, T, S]`` under ``A`` treatments at once
    (``controls`` ``[A, P, T, C]``: one pass, and the same error draws in each). ``usual``
    (``[P, T, C]``, default the first treatment): the patients' usual treatment over the same
    steps, what a hybrid's correction reads. ``offset``: the patients' identification (hybrid):
    ``[P, n]``, or ``[P, draws, n]`` for a parameter draw per path (e.g.
    ``personalise.posterior_draws``), the same draw in every treatment.
    Without ``uncertainty`` every draw is the twin's expected path; with it, each horizon's
    forecast gets an error drawn from each patient's own generator under ``seed`` (an int in
    [0, 2**128); the same draws for the same ``seed`` and patient, whatever the controls, the
    other patients or their order: common random numbers). ``reference``: the treatment whose
    rolled-forward readings a hybrid's correction reads, for every treatment (a trial's
    reference arm)."""
    controls = np.asarray(controls, np.float32)
    single = controls.ndim == 3
    if single:
        controls = controls[None]
    usual = controls[0] if usual is None else np.asarray(usual, np.float32)
    arms, p, t = controls.shape[:3]
    if p != len(origins) or usual.shape != controls.shape[1:]:
        raise ValueError("controls, usual and origins must hold the same patients and steps")
    draws = max(1, int(draws))
    if not 0 <= reference < arms:
        raise ValueError(f"reference treatment {reference} is not one of the {arms} treatments")
    if len(origins.keys) != p:
        raise ValueError("origins must hold a key per patient")
    if offset is not None and offset.dim() == 3 and tuple(offset.shape[:2]) != (p, draws):
        raise ValueError(f"per-draw offsets must be [patients, draws, n] = [{p}, {draws}, n], "
                         f"not {list(offset.shape)}")
    check_seed(seed)
    rng = [patient_rng(seed, ROLLOUT, int(key)) for key in origins.keys] if uncertainty is not None else []
    roll = _roll_hybrid if twin.hybrid else _roll_neural
    with torch.no_grad():
        out = roll(twin, origins, controls, usual, offset, uncertainty, _Rows(arms, draws), rng, reference)
    out = out.reshape(arms, p, draws, t, out.shape[-1])
    return out[0] if single else out


@dataclass(frozen=True)
class _Rows:
    """How a roll-forward lays out its rows: treatment-major, then patient, then draw."""

    arms: int
    draws: int

    def of_patients(self, a):
        """Per-patient rows ``[P, ...]`` -> ``[A * P * draws, ...]``."""
        if isinstance(a, torch.Tensor):
            a = a.repeat_interleave(self.draws, dim=0)
            return a.repeat(self.arms, *([1] * (a.dim() - 1)))
        a = np.repeat(a, self.draws, axis=0)
        return np.tile(a, (self.arms,) + (1,) * (a.ndim - 1))

    def of_treatment(self, a: int, patients: int) -> slice:
        """Treatment ``a``'s rows (each patient's draws)."""
        return slice(a * patients * self.draws, (a + 1) * patients * self.draws)

    def groups(self, patients: int) -> list[np.ndarray]:
        """Each patient's rows (every treatment's draws of that patient)."""
        rows = np.arange(self.arms * patients * self.draws).reshape(self.arms, patients, self.draws)
        return [rows[:, i].reshape(-1) for i in range(patients)]

    def of_treatments(self, a):
        """Per-treatment-and-patient rows ``[A, P, ...]`` -> ``[A * P * draws, ...]``."""
        a = a.reshape(-1, *a.shape[2:])
        if isinstance(a, torch.Tensor):
            return a.repeat_interleave(self.draws, dim=0)
        return np.repeat(a, self.draws, axis=0)


class PatientUniforms:
    """What a :data:`ScoreSampler` draws from: ``random(size)`` gives, patient after patient
    (each patient's ``draws`` in a row), uniforms in [0, 1) from that patient's own generator.
    Drawn once per call: a second draw would have to come from somewhere shared."""

    def __init__(self, u: np.ndarray):
        self._u = u

    def random(self, size=None) -> np.ndarray:
        if self._u is None:
            raise RuntimeError("a score sampler draws from a patient's uniforms once per call")
        u, self._u = self._u, None
        if size is not None and int(np.prod(size)) != u.size:
            raise ValueError(f"a score sampler asked for {size} uniforms; the patients' draws are {u.size}")
        return u if size is None else u.reshape(size)


def _errors(uncertainty: Uncertainty | None, rows: _Rows, patients: int, k: int, n_states: int,
            rng: list[np.random.Generator]) -> np.ndarray | None:
    """One horizon's drawn errors ``[A * P * draws, k, S]``: a normalised error per patient, draw
    and state, with a random sign, times the patient's scale at each step; the same for every
    treatment. The error path of a horizon follows the scale's growth over its steps (the
    calibration's score is normalised by it). ``rng``: each patient's generator; every uniform
    of a patient comes from theirs, in the same order whoever else is rolled forward."""
    if uncertainty is None:
        return None
    n = patients * rows.draws
    # Per patient: [2, S, draws] uniforms, for the scores' magnitudes and for the signs.
    u = np.stack([g.random((2, n_states, rows.draws)) for g in rng], axis=2).reshape(2, n_states, n)
    magnitude = np.stack([uncertainty.sample(j, PatientUniforms(u[0, j]), n) for j in range(n_states)], axis=-1)
    sign = np.where(u[1].T < 0.5, -1.0, 1.0)
    scales = np.repeat(uncertainty.scales[:, :k, :], rows.draws, axis=0)
    err = ((sign * magnitude)[:, None, :] * scales).astype(np.float32)
    return np.tile(err, (rows.arms, 1, 1))


def _bounds(spec) -> tuple[np.ndarray, np.ndarray]:
    return (np.array([c.min for c in spec.states], np.float32),
            np.array([c.max for c in spec.states], np.float32))


def _roll_hybrid(twin, origins, controls, usual, offset, uncertainty, rows: _Rows,
                 rng: list[np.random.Generator], reference: int) -> np.ndarray:
    model, spec = twin.surrogate, twin.spec
    binding = model.binding
    h, k_max, s = spec.history_steps, spec.horizon_steps, len(spec.states)
    _, p, t = controls.shape[:3]
    # The encoder and the core's warm-up read the record up to the origin, never the plan.
    start = Batch(history=origins.history, future_controls=np.zeros((p, k_max, len(spec.controls)), np.float32),
                  future_states=np.zeros((p, k_max, s), np.float32), covariates=origins.covariates,
                  context=origins.context, context_mask=origins.context_mask)
    u0 = model.unpack(torch.from_numpy(twin.inputs.batch_features(start)))
    # The encoder sees each patient's rows alone (personalise.by_group), once: a matrix product's
    # rounding would otherwise depend on the other patients in the batch. The correction, run at
    # every horizon, reads every row in one batch with each row rounded alike in any batch
    # (personalise.row_exact): by_group there cost a call per patient per horizon (2.5x the trial).
    z = by_group(model.parameters_of, u0, [np.array([i]) for i in range(p)])
    if offset is not None and offset.dim() == 3:  # a parameter draw per path, alike in every treatment
        per_draw = {name: v.repeat_interleave(rows.draws, dim=0) for name, v in u0.items()}
        z = (z[:, None, :] + offset).reshape(p * rows.draws, -1)
        theta = binding.theta(z, per_draw)
        state = binding.origin(theta, per_draw)
        theta = {name: v.repeat(rows.arms, *([1] * (v.dim() - 1))) for name, v in theta.items()}
        state = {name: v.repeat(rows.arms, *([1] * (v.dim() - 1))) for name, v in state.items()}
    else:
        if offset is not None:
            z = z + offset
        theta = binding.theta(z, u0)
        state = binding.origin(theta, u0)
        theta = {name: rows.of_patients(v) for name, v in theta.items()}
        state = {name: rows.of_patients(v) for name, v in state.items()}
    if binding.n_members > 1:  # an ensemble: draw d runs structure d mod M, in every treatment alike
        n_rows = next(iter(theta.values())).shape[0]
        theta[MEMBER] = (torch.arange(n_rows) % rows.draws) % binding.n_members
    covariates = rows.of_patients(u0["covariates"])
    readings = rows.of_patients(torch.from_numpy(origins.history[:, :, :s].copy()))
    usual_history = rows.of_patients(torch.from_numpy(origins.history[:, :, s:].copy()))
    half = torch.from_numpy(twin.inputs.half)
    lo, hi = (torch.from_numpy(b) for b in _bounds(spec))
    n = readings.shape[0]
    ref = rows.of_treatment(reference, p)  # the reference treatment's rows: what the correction reads
    out = np.empty((n, t, s), np.float32)
    for c0 in range(0, t, k_max):
        k = min(k_max, t - c0)
        planned = rows.of_treatments(torch.from_numpy(np.ascontiguousarray(controls[:, :, c0:c0 + k])))
        core, state = binding.continued(theta, state, {"states": readings, "future": planned,
                                                       "covariates": covariates})
        last = readings[:, -1, :]
        path = torch.where(torch.isfinite(core), core, last[:, None, :])
        correction = row_exact(model.corrections, {"states": readings[ref], "controls": usual_history[ref],
                                                   "covariates": covariates[ref]})
        correction = correction.reshape(-1, k_max, s)[:, :k].repeat(rows.arms, 1, 1)  # every treatment alike
        path = path + correction * half / DELTA_UNITS
        err = _errors(uncertainty, rows, p, k, s, rng)
        if err is not None:
            path = path + torch.from_numpy(err)
        path = torch.maximum(torch.minimum(path, hi), lo)
        out[:, c0:c0 + k] = path.numpy()
        readings = torch.cat([readings, path], dim=1)[:, -h:]
        usual_history = torch.cat([usual_history, rows.of_patients(torch.from_numpy(usual[:, c0:c0 + k]))],
                                  dim=1)[:, -h:]
    return out


def _roll_neural(twin, origins, controls, usual, offset, uncertainty, rows: _Rows,
                 rng: list[np.random.Generator], reference: int) -> np.ndarray:
    spec = twin.spec
    h, k_max, s, c = spec.history_steps, spec.horizon_steps, len(spec.states), len(spec.controls)
    _, p, t = controls.shape[:3]
    history = rows.of_patients(origins.history.astype(np.float32))
    covariates = rows.of_patients(origins.covariates)
    n = history.shape[0]
    groups = rows.groups(p)
    lo, hi = _bounds(spec)
    out = np.empty((n, t, s), np.float32)
    for c0 in range(0, t, k_max):
        k = min(k_max, t - c0)
        planned = np.zeros((n, k_max, c), np.float32)
        planned[:, :k] = rows.of_treatments(controls[:, :, c0:c0 + k])
        path = np.empty((n, k, s), np.float32)
        for g in groups:  # each patient's rows alone (personalise.by_group)
            path[g] = twin.forecast(Batch(history=history[g], future_controls=planned[g],
                                          future_states=np.zeros((g.size, k_max, s), np.float32),
                                          covariates=covariates[g]))[:, :k]
        err = _errors(uncertainty, rows, p, k, s, rng)
        if err is not None:
            path = path + err
        path = np.clip(path, lo, hi).astype(np.float32)
        out[:, c0:c0 + k] = path
        history = np.concatenate([history, np.concatenate([path, planned[:, :k]], axis=-1)], axis=1)[:, -h:]
    return out
