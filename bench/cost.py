"""Section 3: what privacy costs in time, what secure aggregation's quantisation costs, and how
long a clinician waits for a what-if.

- DP-SGD step vs the same step without DP, on the product's path: the node's patients as DP
  examples of a model, a Poisson-sampled batch at the rate the node calibrates (Opacus's
  ``DPDataLoader``), then forward, backward and Adam (:func:`twinfed.models.train.run_steps`),
  with per-patient clipping and noise (:func:`twinfed.privacy.dp.make_private`: the project's
  per-patient Linear gradients, :mod:`twinfed.privacy.per_patient`, with Opacus's optimizer for
  noise and scaling) or without. Same model, data, rate and thread count, timed interleaved so
  that load from other processes falls on both alike; CPU time of this process, median over
  repetitions. The headline ratio is the plan's default model (the glucose hybrid); the cardio
  hybrid and the glucose mlp-residual surrogate are measured beside it. Opacus's own
  per-sample-gradient modes (``hooks``, the node's path before issue 14, and ``ew``,
  ``functorch``, ``ghost``) are timed too on the default model where they handle it, after a
  check that one step of each (noise off) moves the weights exactly as the product's does.
- Round time with SecAgg+ vs the same study without it, 10 sites as large as the accuracy
  study's, median over rounds after the first (the first adds engine start-up and each node's
  own calibration). With tiny sites the round is mostly overhead; the scale section reports that.
- Quantisation error of the securely aggregated update against the DP noise in it: each site's
  real round update goes through Flower's own SecAgg+ quantiser (the plan's clipping range,
  2^22 levels); the DP noise is the spread of the same update across independent DP runs.
- ``twinfed whatif`` from the shell: wall time of the installed console script (a new process:
  imports, loading the twin and the site, identifying the patient, four scenarios, JSON out).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.accuracy import reference_epsilon, trained, world_cohort
from bench.report import figure
from bench.sizes import Sizes
from bench.studies import HOLDOUT, Workspace, default_plan, plan_conditions
from bench.whatif import DECISION_CLOCK, SCENARIOS

DESIGN_DP_STEP = 1.3  # DESIGN.md section 6's, issue 14's target
TARGET_SECAGG = 1.25
TARGET_WHATIF_SECONDS = 3.0
PRODUCT_MODE = "linear"  # privacy/dp.py's make_private for every twinfed model (per_sample_method)
OTHER_MODES = ("hooks", "ew", "functorch", "ghost")  # Opacus's; hooks was the product's until issue 14
# The models measured: (twin, model kind); the first is the plan's default, the headline figure.
DP_STEP_MODELS = (("glucose", "hybrid"), ("cardio", "hybrid"), ("glucose", "mlp-residual"))


def run(ws: Workspace, sizes: Sizes) -> dict:
    out: dict = {}
    out.update(dp_step(ws, sizes))
    out.update(secagg_round(ws, sizes))
    out.update(quantisation(ws, sizes))
    out.update(shell_whatif(ws, sizes))
    return out


def _glucose_site(ws: Workspace, sizes: Sizes, twin: str = "glucose"):
    """The twin's built-in world's cohort, its spec and its first site's consented patients."""
    from twinfed.governance.consent import granted, site_consent
    from twinfed.models.site_data import load_site

    cohort = world_cohort(ws, sizes, twin, sizes.worlds[twin][0])
    spec = ws.spec(cohort)
    name = ws.site_names(cohort)[0]
    return cohort, spec, load_site(cohort / name, spec).subset(granted(site_consent(cohort / name), spec.purpose))


# -- DP step vs plain step -----------------------------------------------------------------------

class PatientMSE:
    """Each patient's loss (the mean over their windows and outputs), as Opacus's ghost clipping
    needs it: per example with ``reduction="none"``, their mean otherwise; the same loss as
    ``nn.MSELoss()`` over a batch of patients with equally many windows."""

    reduction = "mean"

    def __call__(self, pred, target):
        per_patient = ((pred - target) ** 2).flatten(1).mean(dim=1)
        return per_patient if self.reduction == "none" else per_patient.mean()


def _mse(pred, target):
    """The loss of :func:`twinfed.models.train.run_steps` (every element's mean)."""
    return ((pred - target) ** 2).sum() / max(1, target.numel())


def _engine_private(mode: str, model, loader, *, noise: float, clip: float, lr: float, sgd: bool = False,
                    poisson: bool = True):
    """(module, optimizer, criterion, loader) from Opacus's ``PrivacyEngine`` in ``mode``."""
    import torch
    from opacus import PrivacyEngine

    opt = (torch.optim.SGD if sgd else torch.optim.Adam)(model.parameters(), lr=lr)
    engine = PrivacyEngine(accountant="rdp", secure_mode=False)
    kw = dict(module=model, optimizer=opt, data_loader=loader, noise_multiplier=noise,
              max_grad_norm=clip, poisson_sampling=poisson, grad_sample_mode=mode,
              noise_generator=torch.Generator().manual_seed(1))
    if mode == "ghost":
        module, opt, crit, loader = engine.make_private(criterion=PatientMSE(), **kw)
    else:
        module, opt, loader = engine.make_private(**kw)
        crit = _mse
    return module, opt, crit, loader


def _one_noise_free_step(mode: str, spec, plan, x, y) -> list:
    """The weights after one noise-free DP step (SGD, lr 1, fixed batch) in ``mode``: the
    product's ``make_private`` for :data:`PRODUCT_MODE` and ``hooks``, else Opacus's engine."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from twinfed.models.surrogate import build_surrogate
    from twinfed.privacy.dp import DPSettings, make_private

    net = build_surrogate(spec, plan.model, seed=0)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # away from the zero init, so every layer gets a gradient
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    clip = plan.privacy.clipping_norm
    if mode in (PRODUCT_MODE, "hooks"):
        module, opt = make_private(net, torch.optim.SGD(net.parameters(), lr=1.0),
                                   DPSettings(0.0, clip, 1.0, len(x)), method=mode)
        crit = _mse
    else:
        loader = DataLoader(TensorDataset(x, y), batch_size=len(x))
        module, opt, crit, loader = _engine_private(mode, net, loader, noise=0.0, clip=clip, lr=1.0,
                                                    sgd=True, poisson=False)
        x, y = next(iter(loader))
    opt.zero_grad(set_to_none=True)
    crit(module(x), y).backward()
    opt.step()
    return [p.detach().clone() for p in net.parameters()]


def dp_step(ws: Workspace, sizes: Sizes) -> dict:
    """The DP step's cost on every model of :data:`DP_STEP_MODELS`; ``dp_step.ratio`` is the
    default model's, against :data:`DESIGN_DP_STEP`."""
    out: dict = {}
    ratios = {}
    for i, (twin, kind) in enumerate(DP_STEP_MODELS):
        figures = _dp_step_of(ws, sizes, twin, kind, other_modes=OTHER_MODES if i == 0 else ("hooks",))
        label = f"{twin}-{kind}"
        ratios[label] = figures[f"dp_step.ratio.{PRODUCT_MODE}"]
        if i == 0:
            out.update(figures)
        out.update({k.replace("dp_step.", f"dp_step.by_model.{label}.", 1): v for k, v in figures.items()
                    if k.startswith(("dp_step.ratio.", "dp_step.ratio_compute_only.", "dp_step.plain_ms", f"dp_step.{PRODUCT_MODE}_ms",
                                     "dp_step.hooks_ms"))})
    worst = max(ratios, key=lambda k: ratios[k]["value"])
    out["dp_step.ratio_worst_model"] = figure(ratios[worst]["value"], "x", target=DESIGN_DP_STEP, conditions={
        "model": worst, "ratios": {k: v["value"] for k, v in ratios.items()},
        "path": ratios[worst]["conditions"]["path"]})
    return out


def _dp_step_of(ws: Workspace, sizes: Sizes, twin: str, kind: str, *, other_modes) -> dict:
    import torch
    from opacus.data_loader import DPDataLoader
    from twinfed.models.surrogate import build_surrogate, inputs_for
    from twinfed.models.train import BatchOfPatients, make_adam, make_loader, run_steps
    from twinfed.privacy.dp import DPSettings, make_private, patient_examples, per_sample_method
    from twinfed.privacy.study import calibrate, count_segment

    torch.set_num_threads(1)  # as the node trains
    _, spec, site = _glucose_site(ws, sizes, twin)
    plan = default_plan(spec, sizes.rounds, kind=kind, calibrate=False)
    cfg = plan.training
    data = patient_examples(site, cfg, inputs_for(spec, plan.model))
    # As the node calibrates (here from the exact count: nothing is released).
    cal = calibrate(plan, len(data), history=[count_segment(plan)])
    settings = DPSettings(cal.noise_multiplier, plan.privacy.clipping_norm, cal.sample_rate, cal.expected_batch)
    fixed_x, fixed_y = data.draw(np.arange(min(cal.expected_batch, len(data))))
    chosen = per_sample_method(build_surrogate(spec, plan.model, seed=0))

    def product(method: str | None, seed: int) -> tuple[Callable[[], None], Callable[[], None]]:
        net = build_surrogate(spec, plan.model, seed=0)
        opt = make_adam(net, cfg)
        module, opt = make_private(net, opt, settings, method=method) if method else (net, opt)
        loader = DPDataLoader(BatchOfPatients(data), sample_rate=cal.sample_rate,
                              generator=torch.Generator().manual_seed(seed))
        return (lambda: run_steps(module, opt, loader, 1)), _step(module, opt, _mse, fixed_x, fixed_y)

    steps: dict[str, Callable[[], None]] = {}
    checks: dict[str, float] = {}
    with warnings.catch_warnings():
        # The inputs never require gradients (features are data); Opacus's hooks say so. The
        # engine's modes warn about secure_mode, off as in the product (privacy/dp.py says why).
        warnings.simplefilter("ignore")
        for name, method, seed in (("plain", None, 2), (PRODUCT_MODE, PRODUCT_MODE, 3)):
            steps[name], steps[f"{name}.compute"] = product(method, seed)
        reference = _one_noise_free_step(PRODUCT_MODE, spec, plan, fixed_x[:8], fixed_y[:8])
        for mode in other_modes:
            try:
                got = _one_noise_free_step(mode, spec, plan, fixed_x[:8], fixed_y[:8])
                checks[mode] = max(float((a - b).abs().max()) for a, b in zip(reference, got))
                if mode == "hooks":  # the node's path before issue 14, as it ran
                    steps[mode], steps[f"{mode}.compute"] = product(mode, 4)
                    continue
                net = build_surrogate(spec, plan.model, seed=0)
                module, opt, crit, loader = _engine_private(
                    mode, net, make_loader(data, cal.expected_batch, seed=4), noise=cal.noise_multiplier,
                    clip=plan.privacy.clipping_norm, lr=cfg.learning_rate)
                batches = _cycle(loader)
                drawn = _step(module, opt, crit, None, None, batches)
                fixed = _step(module, opt, crit, fixed_x, fixed_y)
                drawn(), fixed()  # a mode that fails only when it runs is unusable too
                steps[mode], steps[f"{mode}.compute"] = drawn, fixed
            except Exception as exc:  # a mode Opacus cannot apply to this model is reported, not fatal
                ws.progress(f"  {twin} {kind}: grad_sample_mode {mode}: unusable "
                            f"({type(exc).__name__}: {str(exc)[:120]})")
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

    base = {"twin": twin, "model": plan.model.model_dump(mode="json"), "expected_batch_patients": cal.expected_batch,
            "windows_per_patient": cfg.windows_per_patient, "site_patients": len(data),
            "sample_rate": cal.sample_rate, "noise_multiplier": cal.noise_multiplier, "torch_threads": 1,
            "repeats": sizes.step_repeats, "timing": "median CPU time of this process per step, "
            "variants interleaved", "optimizer": "Adam", "clipping_norm": plan.privacy.clipping_norm,
            "per_sample_method_chosen_for_the_model": chosen,
            "path": "privacy/dp.py make_private (per-patient Linear gradients, Opacus's "
                    "DPOptimizerFastGradientClipping for noise) + Opacus DPDataLoader at the calibrated "
                    "rate, models/train.py run_steps; the plain step the same without make_private"}
    out: dict = {
        "dp_step.plain_ms": figure(ms["plain"], "ms", conditions=base | {"wall_ms": wall_ms["plain"]}),
        "dp_step.plain_compute_ms": figure(ms["plain.compute"], "ms", conditions=base | {
            "scope": "fixed batch: forward, backward, optimiser; no data drawing"}),
    }
    usable = [PRODUCT_MODE, *(m for m in other_modes if m in ms and abs(checks[m]) < 1e-5)]
    for mode in (PRODUCT_MODE, *other_modes):
        if mode not in ms:
            continue
        cond = base | {"grad_sample_mode": mode, "wall_ms": wall_ms[mode],
                       "max_weight_difference_vs_product_one_step": checks.get(mode, 0.0),
                       "clips_like_the_product": mode in usable,
                       "how": ("the product's make_private" if mode == PRODUCT_MODE else
                               "make_private(method='hooks'): the product's path before issue 14"
                               if mode == "hooks" else "Opacus PrivacyEngine")}
        out[f"dp_step.{mode}_ms"] = figure(ms[mode], "ms", conditions=cond)
        out[f"dp_step.ratio.{mode}"] = figure(ms[mode] / ms["plain"], "x", conditions=cond)
        out[f"dp_step.ratio_compute_only.{mode}"] = figure(
            ms[f"{mode}.compute"] / ms["plain.compute"], "x",
            conditions=cond | {"scope": "fixed batch: forward, backward, clip, noise, optimiser; "
                                        "no data drawing (the same in both)"})
    ratio = ms[PRODUCT_MODE] / ms["plain"]
    out["dp_step.ratio"] = figure(ratio, "x", target=DESIGN_DP_STEP, conditions=base | {
        "grad_sample_mode": PRODUCT_MODE, "dp_ms": ms[PRODUCT_MODE], "plain_ms": ms["plain"],
        "hooks_ratio": ms["hooks"] / ms["plain"] if "hooks" in ms else None,
        "note": f"target {DESIGN_DP_STEP:g}x: DESIGN.md section 6, issue 14"})
    modes_tried = [PRODUCT_MODE, *other_modes]
    best = min(usable, key=lambda m: ms[m])
    out["dp_step.ratio_best_mode"] = figure(ms[best] / ms["plain"], "x", conditions=base | {
        "grad_sample_mode": best, "modes_tried": modes_tried, "modes_clipping_like_the_product": usable,
        "modes_unusable": [m for m in other_modes if m not in ms]})
    return out


def _cycle(loader):
    while True:
        yield from loader


def _step(module, opt, crit, x, y, batches=None) -> Callable[[], None]:
    """One optimiser step on ``(x, y)``, or on the next of ``batches``."""
    def step():
        bx, by = next(batches) if batches is not None else (x, y)
        if len(bx):
            opt.zero_grad(set_to_none=True)
            crit(module(bx), by).backward()
            opt.step()
    return step


# -- SecAgg+ vs plain round ----------------------------------------------------------------------

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
        plan = default_plan(spec, sizes.secagg_rounds, secure_aggregation=secagg, calibrate=False)
        study = ws.federated(plan, cohort, f"cost-secagg-{'on' if secagg else 'off'}")
        seconds[secagg] = steady_round_seconds(study)
        rounds[secagg] = study.round_seconds()
        fastest[secagg] = min(rounds[secagg][1:] or rounds[secagg])
    cond = plan_conditions(plan) | {
        "sites": sizes.secagg_sites, "patients_per_site": sizes.secagg_patients, "days": sizes.secagg_days,
        "engine": "Flower simulation (Ray), 2 CPUs", "round_seconds_with_secagg": rounds[True],
        "round_seconds_without_secagg": rounds[False],
        "timing": "median of rounds 2.. (round 1 adds engine start-up and each node's calibration)",
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
    from twinfed.models.surrogate import (
        build_surrogate,
        get_weights,
        inputs_for,
        set_weights,
    )
    from twinfed.models.twin import Twin
    from twinfed.privacy.dp import DPSettings, patient_examples, train_private
    from twinfed.privacy.secagg import QUANTIZATION_RANGE
    from twinfed.privacy.study import calibrate, count_segment

    torch.set_num_threads(1)
    eps = reference_epsilon()
    world = sizes.worlds["glucose"][0]
    cohort = world_cohort(ws, sizes, "glucose", world)
    spec = ws.spec(cohort)
    plan = default_plan(spec, sizes.rounds, dp=True, epsilon=eps, calibrate=False)
    run_dir = ws.models.get(("glucose", world, "federated_dp", eps))
    if run_dir is not None:  # late in training, where updates are smallest
        start = get_weights(Twin.load(run_dir).surrogate)
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
        data = patient_examples(used, plan.training, inputs_for(spec, plan.model))
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


# -- twinfed whatif from the shell ---------------------------------------------------------------

def shell_whatif(ws: Workspace, sizes: Sizes) -> dict:
    """Median wall time of ``twinfed whatif --json`` (the venv's console script, a new process
    each time) for one held-out patient of the built-in glucose world on its federated DP twin,
    personalised, with four scenarios."""
    from twinfed.models.cohort import read_truth

    world = sizes.worlds["glucose"][0]
    cohort = world_cohort(ws, sizes, "glucose", world)
    run_dir = trained(ws, sizes, "glucose", world, "federated_dp")
    patient = read_truth(cohort / "truth" / f"{HOLDOUT}.csv")[0][0]
    at = sizes.whatif_days[0] * 1440 + DECISION_CLOCK["glucose"][1]
    scenarios = SCENARIOS["glucose"][:4]
    exe = Path(sys.executable).parent / "twinfed"
    cmd = [str(exe), "whatif", "--model", str(run_dir), "--data", str(cohort / HOLDOUT), "--patient", patient,
           "--at", str(at), "--json", *(arg for sc in scenarios for arg in ("--scenario", sc))]
    seconds = []
    for _ in range(sizes.whatif_shell_runs):
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        seconds.append(time.perf_counter() - t0)
        reply = json.loads(done.stdout)
    params = reply["parameters"] or {}
    if params.get("from") != "personalised":
        raise RuntimeError(f"twinfed whatif did not personalise the patient: {params}")
    return {"whatif.shell_seconds": figure(statistics.median(seconds), "s", target=TARGET_WHATIF_SECONDS, conditions={
        "command": "twinfed whatif --model RUN --data HOLDOUT --patient ID --at MIN --json "
                   + " ".join(f"--scenario {sc}" for sc in scenarios),
        "model": f"the {world} world's federated DP twin, epsilon {reference_epsilon():g} per site",
        "model_kind": reply["model"]["kind"], "identification_windows": params.get("identification_windows"),
        "held_out_patients_in_the_site": sizes.holdout["glucose"], "days": sizes.days, "at_minute": at,
        "runs_seconds": [round(x, 3) for x in seconds], "runs": len(seconds),
        "timing": "wall time of the whole process, median of the runs"})}
