"""Section 3b: a validation of the in-silico trial that can fail (issue 21, item 5): many small
trials in every world of every twin, over several effect sizes, each scored against the truth.

The trial section (:mod:`bench.trial`) runs one real trial and one federated twins' trial per
world and asks whether the twins' mean lies inside the real trial's interval: a twin predicting
no effect at all passes that wherever the real interval contains 0. Here, per world (the worlds
of ``bench.sizes``; the glucose twin's ``hovorka`` world is the mismatch world, of another
structure than its core: nothing is tuned on it) and per effect size:

- **Effects.** Arms files generated from ``examples/trials/*.toml`` with the factor changed,
  each against usual care (``ARMS``): glucose, the meal-bolus rule at 8 / 10 / 12 / 15 g of
  carbohydrate per unit and all insulin x0.8 / x1.2; cardio, a daily 08:00 dose of 10 / 20 / 40 /
  80 mg. Each small trial runs ``sizes.validation_days`` days from the example's start (48 h of
  record identify the twin) with ``sizes.validation_draws`` draws; the files are written to the
  work directory and named in every figure's conditions.
- **Patients.** A pool of ``sizes.validation_pool`` fresh patients of the world's simulator (the
  held-out patients of a cohort of their own, seed ``sizes.validation_seed``: every population
  in equal shares, none of them trained on). Each of ``sizes.validation_repeats`` repetitions
  draws a new small cohort of ``sizes.validation_patients`` patients from the pool at random,
  without replacement (the repetitions' cohorts overlap in about a ``patients / pool`` share of
  their patients: the pool stands for the population; a fresh cohort per repetition would cost
  the identification of ``repeats x patients`` twins per world, and trials small enough for
  that are drowned by the release's DP noise, see below).
- **The truth and the real trial** (:func:`bench.trial.replayed_outcomes`): each pool patient
  replayed by the world's simulator under every arm, with the sensor's noise (the same draw in
  both arms). Per repetition and effect, the small cohort is randomised 1:1 (a new seeded
  randomisation, :func:`bench.trial.randomise`) to usual care or the effect's arm: the real
  trial's contrast and its Welch interval (:func:`bench.trial.welch`). The paired truth: the mean
  over the cohort's patients who take part in the twins' trial of the replayed arm minus usual
  care (:func:`bench.trial.paired`).
- **The twins' trial.** The section's trained twin (the accuracy section's federated DP twin at
  the plan's default budget, with its DP calibration: ``bench.accuracy.trained``) runs every arm
  on every pool patient through the local trial engine
  (:func:`twinfed.models.trial.run_site_trial`, as a node computes it: ``exclude_out_of_range``,
  the design's seed); per repetition and effect, the cohort's patients' contributions of that
  effect's two-arm design are summed, the Gaussian noise a federated release of the trial plan
  would add is drawn (per site of the training study, noise multiplier as the node would
  calibrate it for the trial plan's epsilon on its ledger after training,
  :func:`twinfed.privacy.release.noise_for_epsilon` at :func:`twinfed.privacy.study.trial_delta`,
  std ``multiplier x sensitivity`` of the two-arm design; the sum of the sites' variances on
  every component, drawn from a seeded generator here, the OS CSPRNG at a node), and the release
  is summarised (:func:`twinfed.models.trial.summarise`, whose intervals include the noise). It
  does **not** start Flower and SecAgg+ for each of the repetitions (what :mod:`bench.trial`
  times): the values, the clipping and the noise's distribution are the federated trial's; the
  arms of all effects are rolled forward in one trial (a patient's draws are the same in every
  arm, so each arm's values are those of its own two-arm trial).
- **The release's noise decides what a small trial can show.** At the trial plan's epsilon 1 per
  site after the training's epsilon 3, a node's multiplier is about 1.84; on a two-arm design of
  three outcomes (sensitivity sqrt(19)) over three sites the noise on a contrast's sum has std
  about 14, i.e. ``14 x contrast_bound / n`` on its mean: 115 mg/dL of mean glucose at 12
  patients, 7 at 200 (time in range and time below 70 alike, in points: their bound is 100).
  Hence trials of ``sizes.validation_patients`` = 200 from a pool, and the coverage without the
  release noise beside the released one (the twins' own uncertainty against the truth). A
  repetition whose noisy count falls below 2 (tiny sizes only) has no result, as the
  coordinator would report none: it counts as not covered and not equivalent, and is left out
  of the bias, ratio and slope (conditions say how many).
- **A twin that predicts no effect**, beside it: contrast 0 with the twins' interval width. A
  validation that it passes cannot tell a twin from no twin.

Figures, per world x effect x outcome: the bias against the paired truth (mean over the
repetitions; relative to the mean truth) and the contrast ratio twin / truth (targets: mean
glucose and SBP 0.8-1.25, time below 70 0.67-1.5); the coverage of the twins' 95% interval for
the paired truth (share of repetitions, target >= 0.90); the share of repetitions in which the
twins' contrast is equivalent to the real trial's by two one-sided tests at alpha 0.05 at
margins fixed in advance (``MARGINS``; no target: its power depends on the trial's size); and
the no-effect twin's coverage and equivalence. Per world x outcome: the least-squares slope of
the twins' contrast against the paired truth over every effect and repetition (target
0.8-1.25), the no-effect twin's (0), and the share of the non-zero effects (the paired truth's
interval excludes 0 in at least half the repetitions) at which the no-effect twin's coverage
misses its target (target 1: the validation rejects it). Plots ``trial_validation_{twin}_{world}.png``.
"""

from __future__ import annotations

import math
import time
import tomllib
from pathlib import Path

import numpy as np

from bench.accuracy import reference_epsilon, trained, world_cohort
from bench.report import figure
from bench.sizes import Sizes
from bench.studies import HOLDOUT, Workspace, each_world
from bench.trial import ARMS, paired, randomise, replayed_outcomes, welch

COVERAGE_TARGET = 0.90
SLOPE_TARGET = (0.8, 1.25)
RATIO_TARGETS = {"mean_glucose": (0.8, 1.25), "mean_sbp": (0.8, 1.25), "time_below_70": (0.67, 1.5)}
# Equivalence margins fixed in advance (issue 21), in each outcome's unit
MARGINS = {"time_in_range": 3.0, "time_below_70": 1.0, "mean_glucose": 5.0, "mean_sbp": 2.0}
ALPHA = 0.05
Z95 = 1.959963984540054
COHORT_SEED = 20260121  # which pool patients form each repetition's cohort
RANDOMISATION_SEED = 20260122
NOISE_SEED = 20260123  # the truth's sensor noise
RELEASE_NOISE_SEED = 20260124  # the DP noise of each repetition's release
REFERENCE = "usual-care"


# -- statistics ---------------------------------------------------------------------------------

def tost(diff: float, se: float, margin: float, *, df: float = math.inf, alpha: float = ALPHA) -> dict:
    """Two one-sided tests that a difference estimated as ``diff`` (standard error ``se``, t with
    ``df`` degrees of freedom) lies within ``(-margin, margin)``: ``{"p", "equivalent"}``, ``p``
    the larger of the two one-sided p-values; equivalent when ``p < alpha`` (the ``1 - 2 alpha``
    interval inside the margins)."""
    from scipy.stats import t as student_t

    if not margin > 0:
        raise ValueError(f"an equivalence margin must be positive, not {margin!r}")
    if not se > 0:  # no spread: the difference is known
        p = 0.0 if abs(diff) < margin else 1.0
        return {"p": p, "equivalent": p < alpha}
    p_low = float(student_t.sf((diff + margin) / se, df))  # H0: the difference <= -margin
    p_high = float(student_t.cdf((diff - margin) / se, df))  # H0: the difference >= margin
    p = max(p_low, p_high)
    return {"p": p, "equivalent": bool(p < alpha)}


def combined_df(se1: float, df1: float, se2: float, df2: float) -> float:
    """Welch-Satterthwaite degrees of freedom of a difference of two independent estimates."""
    v1, v2 = se1 ** 2, se2 ** 2
    den = (v1 ** 2 / df1 if math.isfinite(df1) else 0.0) + (v2 ** 2 / df2 if math.isfinite(df2) else 0.0)
    return math.inf if den == 0 else (v1 + v2) ** 2 / den


def coverage(truth: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> float:
    """The share of repetitions whose interval ``[lo, hi]`` holds the truth (ends included); a
    repetition without an interval (NaN: its release gave no result) holds nothing."""
    truth, lo, hi = (np.asarray(a, np.float64) for a in (truth, lo, hi))
    if truth.size == 0:
        return math.nan
    return float(np.mean((lo <= truth) & (truth <= hi)))


def slope(x: np.ndarray, y: np.ndarray) -> float:
    """The least-squares slope of ``y`` on ``x`` (with an intercept) over the pairs where both are
    numbers; NaN when ``x`` does not vary."""
    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 2:
        return math.nan
    dx = x - x.mean()
    sxx = float(dx @ dx)
    return math.nan if sxx <= 1e-12 * max(1.0, float(x @ x)) else float(dx @ (y - y.mean())) / sxx


def no_effect_twin(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A twin that predicts no effect with the real twins' interval widths: ``(mean, lo, hi)``."""
    half = (np.asarray(hi, np.float64) - np.asarray(lo, np.float64)) / 2
    return np.zeros_like(half), -half, half


def score(truth, mean, lo, hi, real_mean=None, real_se=None, real_df=None, *, twin_df=math.inf,
          margin: float | None = None) -> dict:
    """One effect and outcome over the repetitions (arrays ``[R]``): a twin's contrasts ``mean``
    with their 95% intervals ``[lo, hi]`` against the paired truths and, with a ``margin``,
    against the real trials' contrasts (``real_mean``, standard errors ``real_se``, Welch df
    ``real_df``): ``{"bias", "relative_bias", "ratio", "coverage", "equivalent"}``;
    ``equivalent`` is the share of repetitions equivalent by :func:`tost` (the twin's standard
    error its interval's half width over 1.96, ``twin_df`` its degrees of freedom, a number or
    one per repetition; the two standard errors combined, Welch-Satterthwaite df). A repetition
    whose twins' trial gave no result (NaN) is neither covered nor equivalent, and left out of
    the bias and ratio."""
    truth, mean, lo, hi = (np.asarray(a, np.float64) for a in (truth, mean, lo, hi))
    ok = np.isfinite(mean) & np.isfinite(truth)
    t_mean = float(truth[ok].mean()) if ok.any() else math.nan
    bias = float((mean - truth)[ok].mean()) if ok.any() else math.nan
    out = {"bias": bias, "relative_bias": bias / abs(t_mean) if t_mean else math.nan,
           "ratio": float(mean[ok].mean()) / t_mean if t_mean else math.nan,
           "coverage": coverage(truth, lo, hi), "equivalent": math.nan}
    if margin is not None and real_mean is not None and truth.size:
        se = (hi - lo) / (2 * Z95)
        tdf = np.broadcast_to(np.asarray(twin_df, np.float64), se.shape)
        eq = [tost(m - rm, math.hypot(s, rs), margin, df=combined_df(s, d, rs, rdf))["equivalent"]
              for m, s, d, rm, rs, rdf in zip(mean, se, tdf, real_mean, real_se, real_df)]
        out["equivalent"] = float(np.mean(eq))
    return out


def nonzero(truth_lo: np.ndarray, truth_hi: np.ndarray) -> bool:
    """Whether an effect is non-zero: its paired truth's interval excludes 0 in at least half the
    repetitions."""
    lo, hi = np.asarray(truth_lo, np.float64), np.asarray(truth_hi, np.float64)
    return bool(lo.size and np.mean((lo > 0) | (hi < 0)) >= 0.5)


def rejection(nonzero_effects: list[bool], no_effect_coverages: list[float]) -> float:
    """The share of the non-zero effects at which the no-effect twin's coverage misses
    :data:`COVERAGE_TARGET` (1: the validation rejects a twin with no effect wherever there is an
    effect to see); NaN when no effect is non-zero (nothing to reject it on)."""
    missed = [c < COVERAGE_TARGET for flag, c in zip(nonzero_effects, no_effect_coverages, strict=True) if flag]
    return float(np.mean(missed)) if missed else math.nan


# -- the arms files -------------------------------------------------------------------------------

def effects(twin: str) -> dict[str, dict]:
    """Each effect's arm (an ``[[trial.arms]]`` table) from the twin's example arms file, its
    factor changed; ``{effect name: arm table}``."""
    example = tomllib.loads(ARMS[twin].read_text())["trial"]
    other = next(a for a in example["arms"] if a["name"] != example["reference"])
    rule = dict(other["rule"])
    if twin == "glucose":
        out = {f"ratio-{g}": {"name": f"ratio-{g}", "rule": rule | {"grams_per_unit": float(g)}}
               for g in (8, 10, 12, 15)}
        for pct in (80, 120):
            out[f"insulin-{pct}pct"] = {"name": f"insulin-{pct}pct",
                                        "scenario": f"{rule['insulin']}*{pct / 100:g}"}
        return out
    if twin == "cardio":
        return {f"dose-{mg}mg": {"name": f"dose-{mg}mg", "rule": rule | {"amount": float(mg)}}
                for mg in (10, 20, 40, 80)}
    raise ValueError(f"no effect sizes for twin {twin!r}")


def _toml(value) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def arms_text(twin: str, name: str, arms: list[dict], *, duration_days: float, draws: int) -> str:
    """An arms file: the twin's example with ``arms`` after its usual-care arm and the small
    trial's duration and draws."""
    example = tomllib.loads(ARMS[twin].read_text())["trial"]
    usual = next(a for a in example["arms"] if a["name"] == example["reference"])
    trial = {k: v for k, v in example.items() if k != "arms"} | {
        "name": name, "duration_days": float(duration_days), "draws": int(draws)}
    lines = [f"# generated by bench/trial_validation.py from examples/trials/{ARMS[twin].name}", "[trial]"]
    lines += [f"{k} = {_toml(v)}" for k, v in trial.items()]
    for arm in [usual, *arms]:
        lines += ["", "[[trial.arms]]", *(f"{k} = {_toml(v)}" for k, v in arm.items())]
    return "\n".join(lines) + "\n"


def designs(ws: Workspace, sizes: Sizes, twin: str, spec) -> tuple[object, dict, dict[str, Path]]:
    """The combined design (every effect's arm beside usual care), each effect's two-arm design,
    and the arms files written for them."""
    from twinfed.models.arms import load_design

    folder = ws.root / "trial_validation"
    folder.mkdir(parents=True, exist_ok=True)
    arms = effects(twin)
    files = {}
    for effect, arm in arms.items():
        files[effect] = folder / f"{twin}-{effect}.toml"
        files[effect].write_text(arms_text(twin, f"validation-{effect}", [arm], duration_days=sizes.validation_days,
                                           draws=sizes.validation_draws))
    files["all"] = folder / f"{twin}-all.toml"
    files["all"].write_text(arms_text(twin, f"validation-{twin}", list(arms.values()),
                                      duration_days=sizes.validation_days, draws=sizes.validation_draws))
    per_effect = {effect: load_design(files[effect], spec) for effect in arms}
    return load_design(files["all"], spec), per_effect, files


# -- the section -----------------------------------------------------------------------------------

def run(ws: Workspace, sizes: Sizes) -> dict:
    return each_world(ws, sizes, run_world)


def conforming_pool(pool: Path, spec) -> tuple[Path, list[str]]:
    """The pool without the patients whose record leaves the spec's ranges (a site refuses such a
    record whole: ``load_site``'s DataError), and their ids. Such patients are the generator's
    (a bergman pool of 1,500 at seed 21 held an elderly patient bolused 112.6 U for 125 g, above
    the spec's 100 U); the others' files are copied byte for byte, once, beside the pool."""
    import shutil

    import pandas as pd

    cols = [*spec.states, *spec.controls]
    ts = pd.read_csv(pool / HOLDOUT / "timeseries.csv", usecols=["patient_id", *(c.column for c in cols)])
    bad: set[str] = set()
    for c in cols:
        v = ts[c.column]
        bad |= set(ts.loc[(v < c.min) | (v > c.max), "patient_id"].astype(str))
    if not bad:
        return pool, []
    out = pool.parent / f"{pool.name}-conforming"
    if not (out / "cohort.json").is_file():
        tmp = pool.parent / f".{out.name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(pool, tmp)
        for rel in (f"{HOLDOUT}/timeseries.csv", f"{HOLDOUT}/patients.csv", f"{HOLDOUT}/consent.csv",
                    f"truth/{HOLDOUT}.csv"):
            path = tmp / rel
            if path.is_file():
                with path.open(encoding="utf-8") as fh:
                    lines = fh.readlines()
                kept = lines[:1] + [ln for ln in lines[1:] if ln.split(",", 1)[0].strip('"') not in bad]
                path.write_text("".join(kept), encoding="utf-8")
        tmp.rename(out)
    return out, sorted(bad)


def site_noise(run_dir: Path, plan, sites: list[str]) -> dict[str, float]:
    """Each training site's noise multiplier for the trial plan's release, as its node would
    calibrate it on its ledger now (read only: nothing is charged)."""
    from twinfed.ledger_file import read_ledger
    from twinfed.privacy.calibrate import noise_for_budget
    from twinfed.privacy.ledger import PrivacyLedger
    from twinfed.privacy.release import noise_for_epsilon
    from twinfed.privacy.study import trial_delta

    out = {}
    for name in sites:
        state_dir = run_dir / "nodes" / name
        delta = trial_delta(state_dir, plan)
        state = read_ledger(state_dir)
        if state is None:  # a site that released nothing before
            out[name] = noise_for_budget(target_epsilon=plan.privacy.epsilon, delta=delta, sample_rate=1.0,
                                         steps=1, accountant=plan.privacy.accountant)
        else:
            out[name] = noise_for_epsilon(PrivacyLedger(state_dir, state), epsilon=plan.privacy.epsilon,
                                          delta=delta)
    return out


def run_world(ws: Workspace, sizes: Sizes, twin: str, world: str) -> dict:
    import torch

    from twinfed.models.calibration import load_calibration
    from twinfed.models.cohort import cohort_simulator
    from twinfed.models.digest import weights_sha256
    from twinfed.models.site_data import load_site
    from twinfed.models.surrogate import get_weights
    from twinfed.models.trial import _unit as outcome_unit
    from twinfed.models.trial import contributions, run_site_trial, sensitivity, trial_windows
    from twinfed.models.trial_plan import TrialPlan, TrialTwin
    from twinfed.models.twin import Twin

    run_dir = trained(ws, sizes, twin, world, "federated_dp")
    cohort = world_cohort(ws, sizes, twin, world)
    spec = ws.spec(cohort)
    model = Twin.load(run_dir)
    calibration = load_calibration(run_dir)
    if calibration is None:
        raise RuntimeError(f"trial_validation ({twin}, {world}): {run_dir}/model has no calibration.json")
    combined, per_effect, files = designs(ws, sizes, twin, spec)
    names = [a.name for a in combined.arms]
    ref = names.index(REFERENCE)
    outcomes = [o.name for o in combined.outcomes]
    plan = TrialPlan(design=combined, twin=TrialTwin(training_plan_json=model.plan.canonical_json(),
                                                      weights_sha256=weights_sha256(get_weights(model.surrogate)),
                                                      calibration=calibration))
    multipliers = site_noise(run_dir, plan, ws.site_names(cohort))

    days = combined.start_hours / 24 + combined.duration_days
    t0 = time.perf_counter()
    pool = ws.cohort(twin, sites=1, patients=1, days=days, holdout=sizes.validation_pool,
                     seed=sizes.validation_seed, simulator=world)
    pool, refused = conforming_pool(pool, spec)
    t_pool = time.perf_counter() - t0
    ws.progress(f"  trial_validation {twin} ({world}): the truth, {sizes.validation_pool} patients replayed "
                f"under {len(names)} arms")
    t0 = time.perf_counter()
    truth, truth_excluded, replay_rms = replayed_outcomes(pool, HOLDOUT, combined, spec, cohort_simulator(pool),
                                                          noise_seed=(NOISE_SEED, 0))
    t_truth = time.perf_counter() - t0
    site = load_site(pool / HOLDOUT, spec)
    eligible = trial_windows(site, combined).patients  # the rows of ``truth``
    ws.progress(f"  trial_validation {twin} ({world}): the twins of {eligible.size} patients")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a node computes a release (identification's small operations)
    t0 = time.perf_counter()
    try:
        twins = run_site_trial(model, site, combined, calibration=calibration, exclude_out_of_range=True)
    finally:
        torch.set_num_threads(threads)
    t_twins = time.perf_counter() - t0
    twin_row = {int(p): i for i, p in enumerate(twins.patients)}

    R, n = sizes.validation_repeats, min(sizes.validation_patients, eligible.size)
    E, O = len(per_effect), len(outcomes)
    shape = (R, E, O)
    rec = {k: np.full(shape, np.nan) for k in ("truth", "truth_lo", "truth_hi", "twin", "lo", "hi", "exact_lo",
                                               "exact_hi", "exact", "real", "real_se", "real_df", "noise_sd")}
    n_twins = np.zeros(R, dtype=np.int64)
    failed = np.zeros(len(per_effect), dtype=np.int64)  # repetitions whose release gave no result
    t0 = time.perf_counter()
    for r in range(R):
        block = np.sort(np.random.default_rng([COHORT_SEED, r]).choice(eligible.size, size=n, replace=False))
        in_twins = np.array([int(eligible[b]) in twin_row for b in block])
        rows_t = np.array([twin_row[int(eligible[b])] for b in block[in_twins]], dtype=np.int64)
        n_twins[r] = rows_t.size
        for e, (effect, design) in enumerate(per_effect.items()):
            a = names.index(effect)
            assigned = randomise(block.size, 2, RANDOMISATION_SEED + 1000 * r + e)
            values = twins.values[rows_t][:, [ref, a], :]
            sv = None if twins.structure_values is None else twins.structure_values[rows_t][:, :, [ref, a], :]
            exact = contributions(values, design, sv).sum(axis=0)
            sens = sensitivity(design, twins.structures)
            var = float(sum((z * sens) ** 2 for z in multipliers.values()))
            rng = np.random.default_rng([RELEASE_NOISE_SEED, r, e])
            noise = rng.normal(0.0, math.sqrt(var), exact.shape)
            exact_rep = _summary(exact, design, spec, 0.0, twins.structures)
            released = _summary(exact + noise, design, spec, var, twins.structures)
            failed[e] += released is None
            released, exact_rep = released or _no_result(effect, outcomes), exact_rep or _no_result(effect, outcomes)
            for o, name in enumerate(outcomes):
                real = welch(truth[block[assigned == 0], ref, o], truth[block[assigned == 1], a, o])
                tr = paired(truth[block[in_twins], a, o] - truth[block[in_twins], ref, o])
                c, cx = released["contrasts"][effect][name], exact_rep["contrasts"][effect][name]
                bound = design.outcomes[o].contrast_bound
                for key, v in (("truth", tr["mean"]), ("truth_lo", tr["ci95"][0]), ("truth_hi", tr["ci95"][1]),
                               ("twin", c["mean"]), ("lo", c["ci95"][0]), ("hi", c["ci95"][1]),
                               ("exact", cx["mean"]), ("exact_lo", cx["ci95"][0]), ("exact_hi", cx["ci95"][1]),
                               ("real", real["mean"]), ("real_se", real["se"]), ("real_df", real["df"]),
                               ("noise_sd", math.sqrt(var) * bound / max(rows_t.size, 1))):
                    rec[key][r, e, o] = v
    t_reps = time.perf_counter() - t0

    base = {"twin": twin, "world": world, "simulator": world, "mismatch_world": world != sizes.worlds[twin][0],
            "model": f"federated DP, epsilon {reference_epsilon():g} per site (the accuracy section's twin), "
                     "its DP calibration",
            "repetitions": R, "patients_per_trial": n, "pool_patients": int(eligible.size),
            "pool": {"cohort": pool.name, "seed": sizes.validation_seed, "excluded_by_the_record": truth_excluded,
                     "refused_by_the_spec": len(refused),
                     "excluded_by_the_twins_trial": int(eligible.size - twins.n_patients),
                     "replay_check_rms_before_start": replay_rms},
            "patients_in_twins_trial_mean": float(n_twins.mean()),
            "duration_days": combined.duration_days, "start_hours": combined.start_hours,
            "draws": combined.draws, "arms_files": {k: str(v) for k, v in files.items()},
            "engine": "local trial engine (twinfed.models.trial.run_site_trial + summarise), not Flower: "
                      "the federated release's clipping and Gaussian noise (seeded here), no SecAgg+",
            "release_noise": {"trial_epsilon_per_site": plan.privacy.epsilon,
                              "noise_multiplier_per_site": multipliers,
                              "sites": len(multipliers),
                              "note": "each training site's multiplier for the trial plan's epsilon on its "
                                      "ledger as the section read it, std multiplier x the two-arm design's "
                                      "sensitivity; the variances of the sites summed"},
            "real_trial": "1:1 parallel group of each repetition's cohort, Welch 95% interval",
            "paired_truth": "the world's simulator replayed under both arms with the sensor's noise (the same "
                            "draw in both), mean over the cohort's patients in the twins' trial",
            "cohorts": "each repetition a random draw without replacement from the pool",
            "seconds": {"pool": round(t_pool, 1), "truth": round(t_truth, 1), "twins": round(t_twins, 1),
                        "repetitions": round(t_reps, 1)}}
    figs: dict = {}
    units = {o.name: outcome_unit(spec, o) for o in combined.outcomes}
    twin_df = np.maximum(n_twins - 1, 1).astype(np.float64)
    for o, name in enumerate(outcomes):
        unit = units[name]
        margin = MARGINS.get(name)
        flags, no_effect_coverages = [], []
        for e, effect in enumerate(per_effect):
            sel = (slice(None), e, o)
            truth_e = rec["truth"][sel]
            real = (rec["real"][sel], rec["real_se"][sel], rec["real_df"][sel])
            s = score(truth_e, rec["twin"][sel], rec["lo"][sel], rec["hi"][sel], *real, twin_df=twin_df,
                      margin=margin)
            sx = score(truth_e, rec["exact"][sel], rec["exact_lo"][sel], rec["exact_hi"][sel])
            z_mean, z_lo, z_hi = no_effect_twin(rec["lo"][sel], rec["hi"][sel])
            s0 = score(truth_e, z_mean, z_lo, z_hi, *real, twin_df=twin_df, margin=margin)
            effect_nonzero = nonzero(rec["truth_lo"][sel], rec["truth_hi"][sel])
            flags.append(effect_nonzero)
            no_effect_coverages.append(s0["coverage"])
            cond = base | {"outcome": name, "effect": effect, "contrast": f"{effect} - {REFERENCE}",
                           "arms_file": str(files[effect]),
                           "paired_truth_mean": _mean(truth_e),
                           "paired_truth_sd_over_repetitions": float(np.nanstd(truth_e)),
                           "twins_mean": _mean(rec["twin"][sel]),
                           "twins_interval_half_width_mean": _mean((rec["hi"] - rec["lo"])[sel] / 2),
                           "release_noise_sd_on_the_contrast_mean": _mean(rec["noise_sd"][sel]),
                           "real_trial_mean": _mean(rec["real"][sel]),
                           "real_trial_se_mean": _mean(rec["real_se"][sel]),
                           "effect_nonzero": effect_nonzero,
                           "repetitions_without_a_result": int(failed[e]),
                           "without_release_noise": {"bias": sx["bias"], "ratio": sx["ratio"]}}
            k = f"{twin}.{world}.{effect}.{name}"
            figs[f"{k}.bias"] = figure(s["bias"], unit, conditions=cond | {
                "meaning": "mean over the repetitions of the twins' contrast minus the paired truth"})
            figs[f"{k}.relative_bias"] = figure(s["relative_bias"], "fraction", conditions=cond | {
                "meaning": "the bias over the absolute mean paired truth"})
            figs[f"{k}.contrast_ratio"] = figure(s["ratio"], "x", target_range=RATIO_TARGETS.get(name),
                                                 conditions=cond | {
                "meaning": "mean twins' contrast over the mean paired truth"})
            figs[f"{k}.coverage_95"] = figure(s["coverage"], "fraction", target=COVERAGE_TARGET, at_least=True,
                                              conditions=cond | {
                "meaning": "share of repetitions whose twins' 95% interval holds the paired truth"})
            if margin:
                figs[f"{k}.tost_equivalent"] = figure(s["equivalent"], "fraction", conditions=cond | {
                    "margin": margin, "alpha": ALPHA,
                    "meaning": "share of repetitions in which two one-sided tests at alpha 0.05 find the "
                               f"twins' contrast within +-{margin:g} {unit} of the real trial's (standard "
                               "errors combined, Welch-Satterthwaite df); no target: its power depends on "
                               "the trial's size and the release noise"})
                figs[f"{k}.no_effect.tost_equivalent"] = figure(s0["equivalent"], "fraction", conditions=cond | {
                    "margin": margin, "meaning": "the same for the no-effect twin"})
            figs[f"{k}.coverage_95_without_release_noise"] = figure(sx["coverage"], "fraction", conditions=cond | {
                "meaning": "the same coverage had the sites released their exact sums (no DP noise): "
                           "the twins' own uncertainty against the truth"})
            figs[f"{k}.no_effect.coverage_95"] = figure(s0["coverage"], "fraction", conditions=cond | {
                "target_of_a_valid_twin": COVERAGE_TARGET,
                "meaning": "share of repetitions in which a twin predicting no effect, with the twins' "
                           "interval widths, holds the paired truth: must miss 0.90 where the effect is "
                           "non-zero"})
        sel = (slice(None), slice(None), o)
        cond = base | {"outcome": name, "effects": list(per_effect)}
        figs[f"{twin}.{world}.{name}.slope"] = figure(slope(rec["truth"][sel], rec["twin"][sel]), "x",
                                                      target_range=SLOPE_TARGET, conditions=cond | {
            "meaning": "least-squares slope of the twins' contrast on the paired truth over every effect "
                       "and repetition", "points": int(np.isfinite(rec["truth"][sel]).sum())})
        figs[f"{twin}.{world}.{name}.no_effect.slope"] = figure(
            slope(rec["truth"][sel], np.zeros_like(rec["truth"][sel])), "x", conditions=cond | {
                "target_of_a_valid_twin": list(SLOPE_TARGET), "meaning": "the no-effect twin's slope"})
        figs[f"{twin}.{world}.{name}.no_effect_rejected"] = figure(
            rejection(flags, no_effect_coverages), "fraction", target=1.0, at_least=True,
            conditions=cond | {"nonzero_effects": int(sum(flags)), "meaning": (
                "share of the non-zero effects (paired truth's 95% interval excludes 0 in at least half "
                "the repetitions) at which the no-effect twin's coverage misses 0.90: 1 when the "
                "validation rejects a twin with no effect (n/a: no non-zero effect)")})
    figs[f"{twin}.{world}.seconds"] = figure(t_pool + t_truth + t_twins + t_reps, "s", conditions=base | {
        "twins_seconds_per_patient": t_twins / max(eligible.size, 1), "cpus": ws.cpus})
    _plot(ws, twin, world, per_effect, outcomes, units, rec, base)
    return figs


def _summary(total: np.ndarray, design, spec, noise_var: float, structures: tuple[str, ...] = ()) -> dict | None:
    """The trial's summary of a released sum, None when it gives no result (the count, noisy in a
    release, below 2: the coordinator reports none)."""
    from twinfed.errors import TrialError
    from twinfed.models.trial import summarise

    try:
        return summarise(total, design, spec, noise_var=noise_var, structures=structures)
    except TrialError:
        return None


def _no_result(effect: str, outcomes: list[str]) -> dict:
    nan = math.nan
    return {"contrasts": {effect: {o: {"mean": nan, "ci95": [nan, nan]} for o in outcomes}}}


def _mean(values: np.ndarray) -> float:
    """The mean of the numbers among ``values`` (NaN: a repetition without a result); NaN if none."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else math.nan


def _plot(ws: Workspace, twin: str, world: str, per_effect: dict, outcomes: list[str], units: dict,
          rec: dict, base: dict) -> None:
    """Per outcome: each repetition's twins' contrast against its paired truth, one colour per
    effect, the identity line and the no-effect twin's line (0)."""
    from bench.report import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(outcomes), figsize=(4.4 * len(outcomes), 4.0), squeeze=False)
    for o, (ax, name) in enumerate(zip(axes[0], outcomes)):
        for e, effect in enumerate(per_effect):
            ax.scatter(rec["truth"][:, e, o], rec["twin"][:, e, o], s=8, alpha=0.5, color=f"C{e}", label=effect)
        t = rec["truth"][:, :, o]
        lim = [float(np.nanmin(t)), float(np.nanmax(t))]
        ax.plot(lim, lim, color="black", linewidth=0.8, label="twin = truth")
        ax.plot(lim, [0, 0], color="grey", linestyle="--", linewidth=0.8, label="no-effect twin")
        ax.set_xlabel(f"paired truth ({units[name]})")
        ax.set_ylabel(f"twins' contrast ({units[name]})")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"{twin}, {world} world: {base['repetitions']} small trials of {base['patients_per_trial']} "
                 f"patients per effect (local engine, DP release noise)", fontsize=9)
    fig.tight_layout()
    path = ws.results / f"trial_validation_{twin}_{world}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    ws.progress(f"  plot: {path}")
