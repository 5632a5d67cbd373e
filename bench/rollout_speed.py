"""``python -m bench.rollout_speed``: a site's in-silico trial timed under each way of running the
hybrid twin's encoder and correction, interleaved in one process (the same load for each).

The trial is the built-in glucose twin's carb-ratio design (``examples/trials/glucose-carb-ratio.toml``:
2 arms, 8 draws, 7 days) on one site of ``--patients`` generated patients, with a hybrid twin of the
default size whose weights are moved away from their initialisation, and a calibration to draw errors
from. ``batched``: one matrix product over every patient's rows (the speed before the release was
made per patient, not per patient bit-identical); ``per-patient``: ``personalise.by_group``, a call
per patient; ``current``: the code as it is. Prints wall and CPU (``time.process_time``) seconds of
each run and whether every variant gave the same trial values as ``current``.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import numpy as np

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "trials"


def _twin(spec):
    from twinfed.models.plan import ModelConfig, TrainingPlan
    from twinfed.models.surrogate import build_surrogate, get_weights
    from twinfed.models.twin import Twin

    plan = TrainingPlan(spec=spec, rounds=1, model=ModelConfig(kind="hybrid"))
    rng = np.random.default_rng(0)
    weights = [w + rng.normal(0, 0.3, w.shape).astype(w.dtype)
               for w in get_weights(build_surrogate(spec, plan.model, seed=0))]
    return Twin.from_weights(plan, weights)


def _calibration(spec):
    from twinfed.models.calibration import IntervalCalibration
    from twinfed.models.conformal import n_bins
    from twinfed.models.plan import CalibrationConfig

    bins = n_bins(CalibrationConfig().edges)
    masses = np.append(0.7 ** np.arange(bins - 1), 0.0)
    return IntervalCalibration.from_histogram((40 * masses / masses.sum())[None], spec, CalibrationConfig(),
                                              differential_privacy=False, noise_multiplier=None, sites=1,
                                              source="bench")


@contextlib.contextmanager
def variant(name: str, arms: int, draws: int):
    """The modules' ``by_group`` and the roll's ``row_exact`` replaced for the run: ``batched``
    calls ``fn`` once on every row (MKL), ``per-patient`` calls it on each patient's rows alone
    (the by_group of commit e5ac7b1; a roll's rows are ``arms`` x patients x ``draws``)."""
    from twinfed.models import calibration, personalise, rollout

    if name == "current":
        yield
        return

    def batched(fn, u, groups):
        return fn(u)

    def per_patient(fn, u, groups):
        import torch
        outs = [fn({k: v[torch.from_numpy(g)] for k, v in u.items()}) for g in groups]
        out = outs[0].new_empty((sum(g.size for g in groups), *outs[0].shape[1:]))
        for g, o in zip(groups, outs):
            out[torch.from_numpy(g)] = o
        return out

    def roll_rows(fn, u):
        n = next(iter(u.values())).shape[0]
        with torch.no_grad():
            if name == "batched":
                return fn(u)
            return per_patient(fn, u, rollout._Rows(arms, draws).groups(n // (arms * draws)))

    import torch
    fn = batched if name == "batched" else per_patient
    saved = {m: getattr(m, "by_group") for m in (calibration, personalise, rollout) if hasattr(m, "by_group")}
    saved_row_exact = rollout.row_exact
    try:
        for m in saved:
            m.by_group = fn
        rollout.row_exact = roll_rows
        yield
    finally:
        for m, f in saved.items():
            m.by_group = f
        rollout.row_exact = saved_row_exact


def main(argv=None) -> int:
    import torch

    from twinfed.models.arms import load_design
    from twinfed.models.cohort import generate_cohort
    from twinfed.models.site_data import load_site
    from twinfed.models.spec import load_spec
    from twinfed.models.trial import run_site_trial

    p = argparse.ArgumentParser(prog="python -m bench.rollout_speed")
    p.add_argument("--patients", type=int, default=400)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--variants", default="batched,per-patient,current")
    p.add_argument("--threads", type=int, default=1, help="torch threads (a node computes on one; 0: torch's default)")
    p.add_argument("--cohort", type=Path, help="a cohort directory to reuse (else generated in a temp dir)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = load_spec("glucose")
    with tempfile.TemporaryDirectory() as tmp:
        cohort = args.cohort or Path(tmp) / "cohort"
        if not (cohort / "site-a").exists():
            generate_cohort("glucose", sites=1, patients=args.patients, days=10, seed=3, out=cohort)
        site = load_site(cohort / "site-a", spec)
        design = load_design(EXAMPLES / "glucose-carb-ratio.toml", spec)
        twin, cal = _twin(spec), _calibration(spec)
        patients = np.arange(min(args.patients, len(site.patient_ids)))
        names = args.variants.split(",")
        values = {}
        for r in range(args.repeats):
            for name in names:
                with variant(name, len(design.arms), design.draws):
                    w0, c0 = time.perf_counter(), time.process_time()
                    out = run_site_trial(twin, site, design, calibration=cal, patients=patients)
                    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
                values[name] = out.values
                print(f"repeat {r} {name:12s} wall {wall:6.1f} s  cpu {cpu:6.1f} s  patients {out.n_patients}",
                      flush=True)
        ref = values.get("current")
        for name, v in values.items():
            if ref is not None:
                print(f"{name:12s} same values as current: {np.array_equal(v, ref)}; "
                      f"max |diff| {np.abs(v - ref).max():.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
