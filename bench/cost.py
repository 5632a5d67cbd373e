"""Section 3: what privacy costs in time, and what secure aggregation's quantisation costs.

- DP-SGD step vs the same step without DP: the node's own step (a Poisson-sampled batch of
  patients from the node's data pipeline, forward, backward, then clip + noise + Adam), same
  model, expected batch and thread count, timed interleaved so that load from other processes
  falls on both alike; CPU time of this process, median over repetitions. Every Opacus
  per-sample-gradient mode that handles the surrogate is timed, after a check that one step of it
  (noise off) moves the weights exactly as the default mode does. The figure with the target is
  the mode privacy/dp.py uses; the others show what switching would give.
- Round time with SecAgg+ vs the same study without it, 10 sites as large as the accuracy
  study's, median over rounds after the first (the first adds engine start-up). With tiny sites
  the round is mostly overhead; the scale section reports that case.
- Quantisation error of the securely aggregated update against the DP noise in it: each site's
  real round update goes through Flower's own SecAgg+ quantiser (the plan's clipping range,
  2^22 levels); the DP noise is the spread of the same update across independent DP runs.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable

import numpy as np

from bench.accuracy import reference_epsilon
from bench.report import figure
from bench.sizes import Sizes
from bench.studies import Workspace, default_plan, plan_conditions

TARGET_DP_STEP = 1.5
TARGET_SECAGG = 1.25
MODES = ("hooks", "ew", "functorch", "ghost")


def run(ws: Workspace, sizes: Sizes) -> dict:
    out: dict = {}
    out.update(dp_step(ws, sizes))
    out.update(secagg_round(ws, sizes))
    out.update(quantisation(ws, sizes))
    return out


# -- DP step vs plain step -----------------------------------------------------------------------

def product_mode() -> str:
    """The per-sample gradient mode privacy/dp.py trains with (Opacus's default unless it says)."""
    from twinfed.privacy import dp

    return str(getattr(dp, "GRAD_SAMPLE_MODE", "hooks"))


class PatientMSE:
    """Each patient's loss (the mean over their windows and outputs), as Opacus's ghost clipping
    needs it: per example with ``reduction="none"``, their mean otherwise; the same loss as
    ``nn.MSELoss()`` over a batch of patients with equally many windows."""

    reduction = "mean"

    def __call__(self, pred, target):
        per_patient = ((pred - target) ** 2).flatten(1).mean(dim=1)
        return per_patient if self.reduction == "none" else per_patient.mean()


def _private(mode: str, model, loader, *, noise: float, clip: float, lr: float, sgd: bool = False,
             poisson: bool = True):
    """(module, optimizer, criterion, loader) as privacy/dp.py builds them, in ``mode``."""
    import torch
    from opacus import PrivacyEngine

    opt = (torch.optim.SGD if sgd else torch.optim.Adam)(model.parameters(), lr=lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = PrivacyEngine(accountant="rdp", secure_mode=False)
        kw = dict(module=model, optimizer=opt, data_loader=loader, noise_multiplier=noise,
                  max_grad_norm=clip, poisson_sampling=poisson, grad_sample_mode=mode,
                  noise_generator=torch.Generator().manual_seed(1))
        if mode == "ghost":
            module, opt, crit, loader = engine.make_private(criterion=PatientMSE(), **kw)
        else:
            module, opt, loader = engine.make_private(**kw)
            crit = torch.nn.MSELoss()
    return module, opt, crit, loader


def _matches_default(mode: str, spec, plan, x, y) -> float:
    """Largest weight difference after one noise-free DP step (SGD, fixed batch) in ``mode``
    against Opacus's default mode: 0 up to float rounding when ``mode`` clips the same way."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from twinfed.models.surrogate import build_surrogate

    def one_step(m: str) -> list:
        net = build_surrogate(spec, plan.model, seed=0)
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():  # away from the zero init, so every layer gets a gradient
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        loader = DataLoader(TensorDataset(x, y), batch_size=len(x))
        module, opt, crit, loader = _private(m, net, loader, noise=0.0, clip=plan.privacy.clipping_norm,
                                             lr=1.0, sgd=True, poisson=False)
        xb, yb = next(iter(loader))
        opt.zero_grad(set_to_none=True)
        crit(module(xb), yb).backward()
        opt.step()
        return [p.detach().clone() for p in net.parameters()]

    ref, got = one_step("hooks"), one_step(mode)
    return max(float((a - b).abs().max()) for a, b in zip(ref, got))


def dp_step(ws: Workspace, sizes: Sizes) -> dict:
    import torch
    from torch import nn

    from twinfed.governance.consent import granted, site_consent
    from twinfed.models.site_data import load_site
    from twinfed.models.surrogate import build_surrogate
    from twinfed.models.train import PatientWindows, make_loader

    torch.set_num_threads(1)  # as the node trains
    cohort = ws.cohort("glucose", sites=sizes.sites, patients=sizes.patients["glucose"],
                       days=sizes.days, holdout=sizes.holdout["glucose"])
    spec = ws.spec(cohort)
    site_name = ws.site_names(cohort)[0]
    site = load_site(cohort / site_name, spec)
    site = site.subset(granted(site_consent(cohort / site_name), spec.purpose))
    plan = default_plan(spec, sizes.rounds)
    cfg = plan.training
    data = PatientWindows(site, seed=1, windows_per_patient=cfg.windows_per_patient)
    fixed_x, fixed_y = data.draw(np.arange(min(cfg.batch_size, len(data))))

    def cycle(loader):
        while True:
            yield from loader

    def plain_step(fixed: bool) -> Callable[[], None]:
        net = build_surrogate(spec, plan.model, seed=0)
        opt = torch.optim.Adam(net.parameters(), lr=cfg.learning_rate)
        batches = cycle(make_loader(data, cfg.batch_size, seed=2))
        loss_fn = nn.MSELoss()

        def step():
            x, y = (fixed_x, fixed_y) if fixed else next(batches)
            opt.zero_grad(set_to_none=True)
            loss_fn(net(x), y).backward()
            opt.step()
        return step

    def private_step(mode: str, fixed: bool) -> Callable[[], None]:
        net = build_surrogate(spec, plan.model, seed=0)
        module, opt, crit, loader = _private(mode, net, make_loader(data, cfg.batch_size, seed=3),
                                             noise=1.0, clip=plan.privacy.clipping_norm,
                                             lr=cfg.learning_rate)
        batches = cycle(loader)

        def step():
            x, y = (fixed_x, fixed_y) if fixed else next(batches)
            if len(x):
                opt.zero_grad(set_to_none=True)
                crit(module(x), y).backward()
                opt.step()
        return step

    checks: dict[str, float] = {}
    steps: dict[str, Callable[[], None]] = {"plain": plain_step(False), "plain.compute": plain_step(True)}
    for mode in MODES:
        try:
            checks[mode] = _matches_default(mode, spec, plan, fixed_x[:8], fixed_y[:8])
            steps[mode] = private_step(mode, False)
            steps[f"{mode}.compute"] = private_step(mode, True)
        except Exception as exc:  # a mode Opacus cannot apply to this model is reported, not fatal
            ws.progress(f"  grad_sample_mode {mode}: unusable ({type(exc).__name__}: {str(exc)[:120]})")
            checks[mode] = float("nan")
    for fn in steps.values():
        for _ in range(3):
            fn()
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    wall: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(sizes.step_repeats):
        for name, fn in steps.items():  # interleaved: other load hits every variant alike
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    ms = {k: statistics.median(v) * 1e3 for k, v in cpu.items()}
    wall_ms = {k: statistics.median(v) * 1e3 for k, v in wall.items()}

    base = {"model": plan.model.model_dump(mode="json"), "expected_batch_patients": cfg.batch_size,
            "windows_per_patient": cfg.windows_per_patient, "site_patients": len(data),
            "sample_rate": min(cfg.batch_size, len(data)) / len(data), "torch_threads": 1,
            "repeats": sizes.step_repeats, "timing": "median CPU time of this process per step, "
            "variants interleaved", "optimizer": "Adam", "clipping_norm": plan.privacy.clipping_norm}
    usable = [m for m in MODES if m in ms and abs(checks[m]) < 1e-5]
    out: dict = {
        "dp_step.plain_ms": figure(ms["plain"], "ms", conditions=base | {"wall_ms": wall_ms["plain"]}),
        "dp_step.plain_compute_ms": figure(ms["plain.compute"], "ms", conditions=base | {
            "scope": "fixed batch: forward, backward, optimiser; no data drawing"}),
    }
    for mode in MODES:
        if mode not in ms:
            continue
        cond = base | {"grad_sample_mode": mode, "wall_ms": wall_ms[mode],
                       "max_weight_difference_vs_hooks_one_step": checks[mode],
                       "clips_like_default": mode in usable}
        out[f"dp_step.{mode}_ms"] = figure(ms[mode], "ms", conditions=cond)
        out[f"dp_step.ratio.{mode}"] = figure(ms[mode] / ms["plain"], "x", conditions=cond)
        out[f"dp_step.ratio_compute_only.{mode}"] = figure(
            ms[f"{mode}.compute"] / ms["plain.compute"], "x",
            conditions=cond | {"scope": "fixed batch: forward, backward, clip, noise, optimiser; "
                                        "no data drawing (the same in both)"})
    mode = product_mode()
    if mode in ms:
        out["dp_step.ratio"] = figure(ms[mode] / ms["plain"], "x", target=TARGET_DP_STEP,
                                      conditions=base | {"grad_sample_mode": mode,
                                                         "dp_ms": ms[mode], "plain_ms": ms["plain"],
                                                         "note": "the mode privacy/dp.py uses"})
    if usable:
        best = min(usable, key=lambda m: ms[m])
        out["dp_step.ratio_best_mode"] = figure(ms[best] / ms["plain"], "x", conditions=base | {
            "grad_sample_mode": best, "modes_tried": list(MODES), "modes_clipping_like_default": usable})
    return out


# -- SecAgg+ vs plain round ----------------------------------------------------------------------

def precalibrate(plan) -> Callable:
    """A ``prepare`` hook that puts each node's noise calibration in its state beforehand.

    Calibration is a one-off per study (not part of a round) and identical for equally sized
    sites; doing it once here keeps a many-site benchmark from repeating it at every node. A
    node without the file calibrates itself, so this only ever saves time."""
    def prepare(run_dir, refs) -> None:
        import shutil
        import tempfile
        from pathlib import Path

        from twinfed.governance.consent import granted, site_consent
        from twinfed.models.site_data import load_site
        from twinfed.privacy.dp import patient_examples
        from twinfed.privacy.study import open_ledger, study_path, study_privacy

        if not plan.privacy.enabled:
            return
        by_n: dict[int, Path] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for ref in refs:
                site = load_site(ref.data_dir, plan.spec)
                used = site.subset(granted(site_consent(ref.data_dir), plan.purpose))
                n = len(patient_examples(used, plan.training))
                if n not in by_n:
                    state = Path(tmp) / str(n)
                    study_privacy(state, plan, open_ledger(state, plan, n), n)
                    by_n[n] = study_path(state, plan)
                target = study_path(Path(run_dir) / "nodes" / ref.name, plan)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(by_n[n], target)
    return prepare


def steady_round_seconds(study) -> float:
    """Median round time after the first round."""
    rounds = study.round_seconds()
    return statistics.median(rounds[1:] if len(rounds) > 1 else rounds)


def secagg_round(ws: Workspace, sizes: Sizes) -> dict:
    cohort = ws.cohort("glucose", sites=sizes.secagg_sites, patients=sizes.secagg_patients,
                       days=sizes.secagg_days)
    spec = ws.spec(cohort)
    seconds, rounds, fastest = {}, {}, {}
    for secagg in (False, True):
        plan = default_plan(spec, sizes.secagg_rounds, secure_aggregation=secagg)
        study = ws.federated(plan, cohort, f"cost-secagg-{'on' if secagg else 'off'}",
                             prepare=precalibrate(plan))
        seconds[secagg] = steady_round_seconds(study)
        rounds[secagg] = study.round_seconds()
        fastest[secagg] = min(rounds[secagg][1:] or rounds[secagg])
    cond = plan_conditions(plan) | {
        "sites": sizes.secagg_sites, "patients_per_site": sizes.secagg_patients, "days": sizes.secagg_days,
        "engine": "Flower simulation (Ray), 2 CPUs", "round_seconds_with_secagg": rounds[True],
        "round_seconds_without_secagg": rounds[False],
        "timing": "median of rounds 2.. (round 1 adds engine start-up)",
        "ratio_of_fastest_rounds": fastest[True] / fastest[False]}
    return {
        "secagg.round_seconds_with": figure(seconds[True], "s", conditions=cond),
        "secagg.round_seconds_without": figure(seconds[False], "s", conditions=cond),
        "secagg.ratio": figure(seconds[True] / seconds[False], "x", target=TARGET_SECAGG, conditions=cond),
    }


# -- quantisation vs DP noise --------------------------------------------------------------------

def quantisation(ws: Workspace, sizes: Sizes) -> dict:

    import torch
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    from twinfed.governance.consent import granted, site_consent
    from twinfed.models.site_data import load_site
    from twinfed.models.surrogate import build_surrogate, get_weights, set_weights
    from twinfed.models.twin import Twin
    from twinfed.privacy.dp import DPSettings, patient_examples, train_private
    from twinfed.privacy.secagg import QUANTIZATION_RANGE
    from twinfed.privacy.study import calibrate, count_segment

    torch.set_num_threads(1)
    eps = reference_epsilon()
    cohort = ws.cohort("glucose", sites=sizes.sites, patients=sizes.patients["glucose"],
                       days=sizes.days, holdout=sizes.holdout["glucose"])
    spec = ws.spec(cohort)
    plan = default_plan(spec, sizes.rounds, dp=True, epsilon=eps)
    trained = ws.models.get(("glucose", "federated_dp", eps))
    if trained is not None:  # late in training, where updates are smallest
        start = get_weights(Twin.load(trained).surrogate)
        where = "the trained federated DP twin's weights (end of the study)"
    else:
        start = get_weights(build_surrogate(spec, plan.model, seed=plan.seed))
        where = "the initial weights"
    clip = plan.privacy.update_clip

    def update(data, settings) -> list[np.ndarray]:
        net = build_surrogate(spec, plan.model, seed=plan.seed)
        set_weights(net, start)
        train_private(net, data, plan.training, settings, steps=plan.training.local_steps)
        return [np.clip(a - b, -clip, clip) for a, b in zip(get_weights(net), start)]

    runs: list[list[list[np.ndarray]]] = [[], []]  # two independent DP runs, one update per site
    noise = {}
    for name in ws.site_names(cohort):
        site = load_site(cohort / name, spec)
        used = site.subset(granted(site_consent(cohort / name), spec.purpose))
        data = patient_examples(used, plan.training)
        # As a node calibrates: from its count (here exact: no release), after the counts' release.
        cal = calibrate(plan, len(data), history=[count_segment(plan)])
        settings = DPSettings(cal.noise_multiplier, plan.privacy.clipping_norm, cal.sample_rate,
                              cal.expected_batch)
        noise[name] = cal.noise_multiplier
        for r in runs:
            r.append(update(data, settings))
    n = len(runs[0])

    def mean(updates):
        return np.concatenate([np.mean([u[i] for u in updates], axis=0).ravel() for i in range(len(start))])

    def quantised_mean(updates):
        deq = [dequantize(quantize(u, clip, QUANTIZATION_RANGE), clip, QUANTIZATION_RANGE) for u in updates]
        return mean(deq)

    exact = mean(runs[0])
    q_err = quantised_mean(runs[0]) - exact
    dp_spread = (mean(runs[1]) - exact) / np.sqrt(2)
    q_rms, dp_rms = float(np.sqrt(np.mean(q_err ** 2))), float(np.sqrt(np.mean(dp_spread ** 2)))
    step = 2 * clip / QUANTIZATION_RANGE
    cond = {"sites": n, "epsilon": eps, "noise_multiplier": noise, "update_clip": clip,
            "quantization_levels": QUANTIZATION_RANGE, "quantization_step": step,
            "start": where, "entries": int(exact.size),
            "quantiser": "Flower's SecAgg+ quantize/dequantize (stochastic rounding)",
            "dp_noise": "spread of the mean update over the sites between two independent DP runs "
                        "from the same weights (Gaussian noise and Poisson sampling), rms per entry"}
    return {
        "quantisation.error_rms": figure(q_rms, "weight units", conditions=cond),
        "quantisation.dp_noise_rms": figure(dp_rms, "weight units", conditions=cond),
        "quantisation.error_vs_dp_noise": figure(q_rms / dp_rms, "x", conditions=cond | {
            "meaning": "rms quantisation error of the aggregate / rms DP noise in it"}),
    }
