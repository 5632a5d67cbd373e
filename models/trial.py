"""An in-silico trial on one site's twins, and what it releases: per-arm aggregates.

For each consented patient with enough record, the trial
1. identifies the patient's twin from their record before the start (as a what-if does at its
   decision time, :mod:`twinfed.models.personalise`), and their forecast error scale
   (:mod:`twinfed.models.calibration`) when the twin is calibrated;
2. takes their *usual care* over the trial from the record after the start (the controls of the
   contiguous record; a record shorter than the trial is repeated whole day by whole day, so
   meals stay at their times of day);
3. derives each arm's controls from it (:func:`twinfed.models.arms.arm_controls`) and rolls the
   twin forward under each (:func:`twinfed.models.rollout.roll_forward`: the same error draws in
   every arm), and scores the outcomes of each draw; a patient's outcome under an arm is the mean
   over the draws.

What leaves a site is never a patient's outcome but :func:`contributions` summed over patients:
per arm and outcome the clipped, scaled outcome and its square, per non-reference arm and
outcome the clipped, scaled paired difference with the reference and its square, and a count.
One patient moves that vector by at most :func:`sensitivity` (L2), so a Gaussian release of the
sum is differentially private (:mod:`twinfed.privacy.release`). :func:`summarise` turns a sum of
such vectors (from one machine exactly, or from many sites with noise) into means and 95%
intervals per arm and of each contrast; with noise, the intervals include it.

Every patient's outcomes are their own: their identification windows and their roll-forward's
error draws come from generators keyed by the seed and the patient
(:func:`twinfed.models.personalise.patient_rng`), their fit is their own objective, and no
computation mixes patients; so removing one patient from the site leaves every other patient's
contribution unchanged, whatever the order of the patients or the chunks they are rolled forward
in, and the release moves by that patient's contribution alone, within :func:`sensitivity`
(tests/test_per_patient_release.py). The seed: the design's (public: a local trial is
reproducible), or a node's per-release secret (``twinfed.client.kinds.aggregate``).
Bit for bit: a matrix product (MKL) rounds a row by where it lies in memory, so the twin's
networks read each patient's rows alone (:func:`twinfed.models.personalise.by_group`); batched
they moved the other patients' contributions by up to 7e-8 when one patient was removed from a
200-patient site. Checked on one thread, as a node computes (threads split a batch at places
that depend on its size).

A patient is *excluded* (counted, never named) when their record has no contiguous history of
``history_steps`` ending at the step before the start, no identification window before it, or
less than a day of record (or the whole trial, if shorter) after it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from twinfed.errors import TrialError
from twinfed.models.arms import TrialDesign, arm_controls, outcome_values
from twinfed.models.site_data import SiteData

Z95 = 1.959963984540054  # the normal distribution's 97.5% point
MINUTES_PER_DAY = 1440
CHUNK_PATIENTS = 256  # patients rolled forward together (memory: chunk x draws x steps x states)


@dataclass(frozen=True)
class SiteOutcomes:
    """One site's trial, per patient: ``values`` ``[P, A, O]`` (arms and outcomes in the
    design's order, each the mean over the draws). Stays at the site."""

    values: np.ndarray
    n_excluded: int
    uncertainty: bool  # forecast errors were propagated (the twin had a calibration)
    patients: np.ndarray | None = None  # [P]: each row's patient (index into the site)
    # Of these patients, how many records leave the core's key parameter (the glucose core's
    # insulin sensitivity) unidentified (``personalise.parameter_spread``); None without a core.
    # A count at the site, never released (a node's release carries only its DP sums).
    n_not_identifiable: int | None = None
    # An ensemble twin's structures (``structures``, their names) each alone: ``[P, M, A, O]``,
    # each the mean over the draws that ran it (``values`` is their mean); None for one structure.
    structure_values: np.ndarray | None = None
    structures: tuple[str, ...] = ()

    @property
    def n_patients(self) -> int:
        return int(self.values.shape[0])


@dataclass(frozen=True)
class TrialWindows:
    """The eligible patients of a site and what their trial starts from."""

    patients: np.ndarray  # indices into the site
    origins: np.ndarray  # row of each patient's last step before the start
    usual: np.ndarray  # [P, T, C]: usual care over the trial
    before: np.ndarray  # [P, day, C]: the recorded controls of the day before the start (NaN: none)
    n_excluded: int


def trial_windows(site: SiteData, design: TrialDesign, *, patients: np.ndarray | None = None) -> TrialWindows:
    """The patients of ``site`` (all, or those given) who can take part, and their usual care."""
    spec = site.spec
    start, duration = design.steps(spec)
    h, c, s = spec.history_steps, len(spec.controls), len(spec.states)
    day = MINUTES_PER_DAY // spec.step_minutes
    need_after = min(duration, day)
    chosen = np.arange(site.n_patients) if patients is None else np.asarray(patients, dtype=np.int64)
    keep, origins, usual, before = [], [], [], []
    for p in chosen:
        lo, hi = int(site.offsets[p]), int(site.offsets[p + 1])
        steps = site.steps[lo:hi]
        at = np.searchsorted(steps, steps[0] + start - 1) if hi > lo else 0
        if hi == lo or at >= steps.size or steps[at] != steps[0] + start - 1 or at + 1 < h \
                or steps[at] - steps[at + 1 - h] != h - 1:
            continue
        gaps = np.flatnonzero(steps[at + 1:] - steps[at] != np.arange(1, steps.size - at))
        run = int(gaps[0]) if gaps.size else steps.size - at - 1  # contiguous steps after the origin
        if run < need_after:
            continue
        length = duration if run >= duration else run // day * day  # whole days, repeated
        rows = lo + at + 1 + (np.arange(duration) % length)
        keep.append(p)
        origins.append(lo + at)
        usual.append(site.series[rows, s:])
        prev = np.full((day, c), np.nan, np.float32)
        first_prev = at + 1 - day
        back = np.arange(max(0, first_prev), at + 1)
        contiguous = steps[back] == steps[at] - (at - back)
        prev[back[contiguous] - first_prev] = site.series[lo + back[contiguous], s:]
        before.append(prev)
    n = len(keep)
    return TrialWindows(np.array(keep, dtype=np.int64), np.array(origins, dtype=np.int64),
                        np.array(usual, np.float32).reshape(n, duration, c),
                        np.array(before, np.float32).reshape(n, day, c), int(chosen.size - n))


def run_site_trial(twin, site: SiteData, design: TrialDesign, *, calibration=None,
                   patients: np.ndarray | None = None, seed: int | None = None,
                   chunk_patients: int = CHUNK_PATIENTS, exclude_out_of_range: bool = False,
                   parameter_draws: bool = True) -> SiteOutcomes:
    """Every arm of ``design`` on every eligible patient of ``site`` (or of ``patients``) through
    that patient's personalised twin; ``calibration`` (an ``IntervalCalibration``) propagates
    the twin's forecast uncertainty, else each patient's arm is the twin's expected path.

    ``seed``: an int in [0, 2**128) (None: the design's); it keys every patient's draws with
    the patient, so each patient's values are the same whoever else takes part.
    ``chunk_patients``: patients rolled forward together (memory only: not the values).
    ``exclude_out_of_range``: a patient whose arm controls leave the spec's ranges is excluded
    (counted in ``n_excluded``) instead of failing the trial: a node's release, charged before it
    is computed, must not fail on one patient's data (a refusal after a charge would tell the
    coordinator something about that patient); one patient's exclusion changes no other's values.
    ``parameter_draws`` (with a ``calibration``, a hybrid twin): each path rolls one draw of the
    patient's core parameters from their Laplace posterior (``personalise.posterior_draws``, keyed
    by the seed and the patient), the same draw in every arm; off, every path rolls the fit."""
    from twinfed.models.personalise import check_seed

    from twinfed.models import conformal
    from twinfed.models.calibration import identification_scales, identify_patients
    from twinfed.models.rollout import Origins, Uncertainty, roll_forward

    spec = twin.spec
    base_seed = check_seed(design.seed if seed is None else seed)
    chunk_patients = max(1, int(chunk_patients))
    if calibration is not None:
        calibration.check_twin(twin)
    win = trial_windows(site, design, patients=patients)
    if win.patients.size:
        identified = identify_patients(twin, site, win.patients, site.steps[win.origins], seed=base_seed,
                                       posterior=True)
        ok = identified.n_windows > 0
    else:
        ok = np.zeros(0, dtype=bool)
    if exclude_out_of_range and ok.any():
        ok = ok & _arms_in_range(design, spec, win)
    n_excluded = win.n_excluded + int((~ok).sum())
    keep = np.flatnonzero(ok)
    values = np.zeros((keep.size, len(design.arms), len(design.outcomes)))
    n_unidentified = None
    if twin.hybrid:
        from twinfed.models.personalise import key_parameter, parameter_spread

        n_unidentified = 0
        if keep.size:
            spread = parameter_spread(twin.surrogate, site, identified, key_parameter(twin.surrogate.binding))
            n_unidentified = int((~spread.identifiable[keep]).sum())
    if keep.size == 0:
        names = twin_structures(twin)
        return SiteOutcomes(values, n_excluded, calibration is not None, win.patients[keep], n_unidentified,
                            np.zeros((0, len(names), *values.shape[1:])) if names else None, names)
    draws = design.draws if calibration is not None else 1
    names = twin_structures(twin)
    if names:  # an ensemble: draw d runs structure d mod M (rollout), each structure as often
        draws = -(-draws // len(names)) * len(names)
    offset = identified.offset[keep] if twin.hybrid else None
    if offset is not None and calibration is not None and parameter_draws \
            and identified.posterior_cov is not None:
        from twinfed.models.personalise import patient_key, posterior_draws

        keys = [patient_key(site.patient_ids[p]) for p in win.patients[keep]]
        offset = posterior_draws(offset, identified.posterior_cov[keep], keys, draws, seed=base_seed)
    scales = identification_scales(twin, site, identified)[keep] if calibration is not None else None

    def sampler(j: int, rng, size):
        state = calibration.states[spec.state_columns[j]]
        return conformal.sample_scores(np.asarray(state.histogram), calibration.edges, rng, size)

    ref = [arm.name for arm in design.arms].index(design.reference)  # what a hybrid's correction reads
    structure_values = np.zeros((keep.size, len(names), *values.shape[1:])) if names else None
    for c0 in range(0, keep.size, chunk_patients):
        part = keep[c0:c0 + chunk_patients]
        origins = Origins.at(site, win.patients[part], win.origins[part])
        usual, before = win.usual[part], win.before[part]
        unc = None if scales is None else Uncertainty(scales[c0:c0 + chunk_patients], sampler)
        controls = np.stack([arm_controls(design, arm, spec, usual, before, strict=not exclude_out_of_range)
                             for arm in design.arms])
        # The same seed in every chunk: each patient's draws are keyed by the patient.
        states = roll_forward(twin, origins, controls, usual=usual, reference=ref,
                              offset=None if offset is None else offset[c0:c0 + chunk_patients],
                              uncertainty=unc, draws=draws, seed=base_seed)  # [A, P, D, T, S]
        per_draw = outcome_values(design, spec, states)  # [A, P, D, O]
        values[c0:c0 + part.size] = per_draw.mean(axis=2).transpose(1, 0, 2)
        if names:
            by_structure = per_draw.reshape(*per_draw.shape[:2], -1, len(names), per_draw.shape[-1]).mean(axis=2)
            structure_values[c0:c0 + part.size] = by_structure.transpose(1, 2, 0, 3)  # [P, M, A, O]
    return SiteOutcomes(values, n_excluded, calibration is not None, win.patients[keep], n_unidentified,
                        structure_values, names)


def _arms_in_range(design: TrialDesign, spec, win: TrialWindows) -> np.ndarray:
    """``[P]``: whether every arm keeps each eligible patient's controls inside the spec's ranges
    (each patient's own controls decide: per patient, never the site's)."""
    from twinfed.models.arms import controls_in_range

    inside = np.ones(win.patients.size, dtype=bool)
    for c0 in range(0, win.patients.size, CHUNK_PATIENTS):
        part = slice(c0, c0 + CHUNK_PATIENTS)
        controls = np.stack([arm_controls(design, arm, spec, win.usual[part], win.before[part], strict=False)
                             for arm in design.arms])
        inside[part] = controls_in_range(controls, spec)
    return inside


# -- what a site releases ---------------------------------------------------------------------

def twin_structures(twin) -> tuple[str, ...]:
    """The core structures of an ensemble twin (``spec.core.structures``), or ``()`` for a twin
    of one structure or none (a neural twin): what a trial releases per structure."""
    if not getattr(twin, "hybrid", False) or twin.surrogate.n_structures < 2:
        return ()
    return tuple(twin.surrogate.binding.names)


def plan_structures(training_plan) -> tuple[str, ...]:
    """:func:`twin_structures` of the twin a training plan trains (a trial plan's
    ``twin.training_plan()``), known without its weights."""
    spec = training_plan.spec
    if training_plan.model.resolved(spec).kind != "hybrid" or spec.core is None or len(spec.core.members) < 2:
        return ()
    return tuple(spec.core.members)


def layout(design: TrialDesign, structures: tuple[str, ...] = ()) -> list[tuple[str, str, str, str]]:
    """The release vector's components, in order: ``(what, arm, outcome, moment)`` with what
    ``arm`` (an arm's outcome) or ``contrast`` (an arm minus the reference), moment ``sum`` or
    ``square``; for an ensemble twin (``structures``, :func:`twin_structures`) then, per
    structure but the first, ``arm@<structure>`` and ``contrast@<structure>`` sums (its value
    minus the first structure's); and a last ``("count", "", "", "sum")``."""
    out = []
    for arm in design.arms:
        for o in design.outcomes:
            out += [("arm", arm.name, o.name, "sum"), ("arm", arm.name, o.name, "square")]
    for arm in design.arms:
        if arm.name != design.reference:
            for o in design.outcomes:
                out += [("contrast", arm.name, o.name, "sum"), ("contrast", arm.name, o.name, "square")]
    for name in structures[1:]:
        out += [(f"arm@{name}", arm.name, o.name, "sum") for arm in design.arms for o in design.outcomes]
        out += [(f"contrast@{name}", arm.name, o.name, "sum") for arm in design.arms
                if arm.name != design.reference for o in design.outcomes]
    return out + [("count", "", "", "sum")]


def sensitivity(design: TrialDesign, structures: tuple[str, ...] = ()) -> float:
    """The L2 norm one patient's contribution can reach: every component is in [-1, 1]."""
    return math.sqrt(len(layout(design, structures)))


def contributions(values: np.ndarray, design: TrialDesign, structure_values: np.ndarray | None = None) -> np.ndarray:
    """``values`` ``[P, A, O]`` -> ``[P, F]``: each patient's clipped, scaled part of the release
    vector (:func:`layout`). An arm's outcome is clipped to the outcome's ``bounds`` and scaled
    to [0, 1]; a paired difference is clipped to ``[-contrast_bound, contrast_bound]`` and
    scaled to [-1, 1]. ``structure_values`` ``[P, M, A, O]`` (an ensemble's, M >= 2,
    ``SiteOutcomes.structure_values``): per structure but the first, its clipped arm outcomes and
    paired differences minus the first structure's, scaled by the outcome's width and contrast
    bound, clipped to [-1, 1]."""
    main = _contributions(values, design)
    if structure_values is None or structure_values.shape[1] < 2:
        return main
    sv = np.asarray(structure_values, dtype=np.float64)
    lo = np.array([o.bounds[0] for o in design.outcomes])
    width = np.array([o.bounds[1] - o.bounds[0] for o in design.outcomes])
    bound = np.array([o.contrast_bound for o in design.outcomes])
    ref = [a.name for a in design.arms].index(design.reference)
    arm_v = np.clip(sv, lo, lo + width)  # [P, M, A, O]
    con_v = np.clip(sv - sv[:, :, ref:ref + 1], -bound, bound)
    others = [a for a in range(len(design.arms)) if a != ref]
    p = sv.shape[0]
    cols = []
    for m in range(1, sv.shape[1]):
        cols.append(np.clip((arm_v[:, m] - arm_v[:, 0]) / width, -1, 1).reshape(p, -1))
        cols.append(np.clip((con_v[:, m, others] - con_v[:, 0, others]) / bound, -1, 1).reshape(p, -1))
    return np.concatenate([main[:, :-1], *cols, main[:, -1:]], axis=1)


def _contributions(values: np.ndarray, design: TrialDesign) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    p = values.shape[0]
    lo = np.array([o.bounds[0] for o in design.outcomes])
    width = np.array([o.bounds[1] - o.bounds[0] for o in design.outcomes])
    bound = np.array([o.contrast_bound for o in design.outcomes])
    ref = [a.name for a in design.arms].index(design.reference)
    cols = []
    for a in range(len(design.arms)):
        u = (np.clip(values[:, a], lo, lo + width) - lo) / width
        cols += [u, u ** 2]
    for a in range(len(design.arms)):
        if a != ref:
            v = np.clip(values[:, a] - values[:, ref], -bound, bound) / bound
            cols += [v, v ** 2]
    # [P, O] blocks in layout order: interleave sum and square per outcome
    blocks = [np.stack([cols[i], cols[i + 1]], axis=-1).reshape(p, -1) for i in range(0, len(cols), 2)]
    return np.concatenate([*blocks, np.ones((p, 1))], axis=1)


def summarise(total: np.ndarray, design: TrialDesign, spec, *, noise_var: np.ndarray | float = 0.0,
              structures: tuple[str, ...] = ()) -> dict:
    """Means and 95% intervals from a summed release vector ``total`` (``[F]``, :func:`layout`).

    ``noise_var``: the variance of the Gaussian noise on each component of ``total`` (0: an
    exact sum). An interval is the normal approximation over patients, widened by the noise on
    the sum and on the count (delta method); the square's noise affects only the spread.
    ``structures`` (an ensemble twin's, :func:`twin_structures`): each estimate is the
    structures' mean, and its interval is widened by their spread (the variance of the
    structures' estimates, added to the mean's: what the twin does not know about its own
    structure does not average out over patients); each structure's estimate is reported."""
    total = np.asarray(total, dtype=np.float64)
    names = layout(design, structures)
    if total.shape != (len(names),):
        raise TrialError(f"trial {design.name}: an aggregate of {total.size} figures, the design has "
                         f"{len(names)}")
    var = np.broadcast_to(np.asarray(noise_var, dtype=np.float64), total.shape)
    n = float(total[-1])
    if not n >= 2:
        raise TrialError(f"trial {design.name}: fewer than 2 patients took part ({max(n, 0):.0f}, "
                         "counted with noise for a federated trial); no interval can be given")
    index = {key[:3] + (key[3],): i for i, key in enumerate(names)}
    units = {o.name: _unit(spec, o) for o in design.outcomes}

    def estimate(what, arm, o, scale, offset):
        i1, i2 = index[(what, arm, o, "sum")], index[(what, arm, o, "square")]
        lo = 0.0 if what == "arm" else -1.0  # the scaled values' range: [0, 1] or [-1, 1]
        # Noise can carry a sum outside what clipped values can reach: estimates are clipped back
        # (post-processing; a mean time below 70 of -5% would say nothing).
        m = min(max(total[i1] / n, lo), 1.0)
        second = min(max(total[i2] / n, 0.0), 1.0)
        spread = max(second - m * m, 0.0) * n / (n - 1)
        se2 = spread / n + var[i1] / n ** 2 + m * m * var[-1] / n ** 2
        by_structure = {}
        if len(structures) > 1:
            # each structure's mean: the first's is the mean minus the others' mean difference
            # (a structure's difference is in the estimate's scaled units: see contributions)
            diffs = [total[index[(f"{what}@{name}", arm, o, "sum")]] / n for name in structures[1:]]
            first = m - sum(diffs) / len(structures)
            means = [first] + [first + d for d in diffs]
            se2 += float(np.var(means, ddof=1))
            by_structure = {name: offset + scale * v for name, v in zip(structures, means)}
        half = Z95 * math.sqrt(se2)
        ci = [max(m - half, lo), min(m + half, 1.0)]
        out = {"mean": offset + scale * m, "ci95": [offset + scale * ci[0], offset + scale * ci[1]],
               "sd": scale * math.sqrt(spread)}
        if by_structure:
            out["structures"] = by_structure
        return out

    arms = {}
    for arm in design.arms:
        arms[arm.name] = {"outcomes": {o.name: estimate("arm", arm.name, o.name, o.bounds[1] - o.bounds[0],
                                                        o.bounds[0]) for o in design.outcomes}}
    contrasts = {}
    for arm in design.arms:
        if arm.name != design.reference:
            contrasts[arm.name] = {o.name: estimate("contrast", arm.name, o.name, o.contrast_bound, 0.0)
                                   for o in design.outcomes}
    return {"trial": design.name, "n_patients": int(round(n)), "arms": arms, "contrasts": contrasts,
            "reference": design.reference, "units": units,
            "interval": "95%, normal approximation over patients" +
                        (", including the differential-privacy noise" if np.any(var > 0) else "") +
                        (f", widened by the spread between the twin's {len(structures)} core structures "
                         f"({', '.join(structures)})" if len(structures) > 1 else "")}


def _unit(spec, outcome) -> str:
    if outcome.kind == "mean":
        return spec.column(outcome.state).unit
    return "% of time"
