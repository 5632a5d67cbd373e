"""What the benchmark sections share: virtual cohorts, studies and their evaluation.

Cohorts are generated once per size and seed and kept under ``WORK/cohorts`` (the simulators are
deterministic given the seed, so a kept cohort is the cohort the benchmark asked for). Trained
twins live in ``WORK/runs`` and only for the run that trained them: every ratio the benchmark
reports compares twins trained in the same run.

Every study goes through the product: :func:`twinfed.simulate.run_simulated_study` on Flower's
simulation engine, with the plan's own defaults for the model, training and privacy, so a
change to those defaults is what the benchmark measures next time.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from twinfed.models.plan import ModelConfig, PrivacyConfig, TrainingConfig, TrainingPlan
from twinfed.models.spec import TwinSpec, load_spec

HOLDOUT = "holdout"
Progress = Callable[[str], None]


def default_plan(spec: TwinSpec, rounds: int, *, dp: bool = True, epsilon: float | None = None,
                 secure_aggregation: bool = True) -> TrainingPlan:
    """The plan a consortium gets by default, changed only where the benchmark says so."""
    privacy = PrivacyConfig(enabled=dp, secure_aggregation=secure_aggregation,
                            **({"epsilon": epsilon} if epsilon is not None else {}))
    return TrainingPlan(spec=spec, rounds=rounds, privacy=privacy)


def plan_conditions(plan: TrainingPlan) -> dict:
    """The settings a figure was measured under, for its ``conditions``."""
    p = plan.privacy
    return {"rounds": plan.rounds, "model": plan.model.model_dump(mode="json"),
            "training": plan.training.model_dump(mode="json"),
            "privacy": {"differential_privacy": p.enabled, "epsilon_per_site": p.epsilon if p.enabled else None,
                        "delta_max": p.delta, "clipping_norm": p.clipping_norm,
                        "accountant": p.accountant, "secure_aggregation": p.secure_aggregation},
            **{k: v for k, v in plan.model_dump(mode="json").items()
               if k not in ("spec", "model", "training", "privacy", "rounds", "metrics")}}


@dataclass
class StudyRun:
    run_dir: Path
    summary: dict
    seconds: float  # wall time of the whole study, engine start-up included

    def round_seconds(self) -> list[float]:
        return [float(h["seconds"]) for h in self.summary["history"]]

    def noise_multipliers(self) -> dict[str, float]:
        return {name: (s.get("privacy") or {}).get("noise_multiplier")
                for name, s in self.summary["sites"].items()}


@dataclass
class Workspace:
    root: Path  # cohorts and this run's studies
    results: Path  # where sections put their plots
    progress: Progress
    cpus: int = 2
    # Twins trained in this run, by (twin, regime, epsilon) -> run directory.
    models: dict[tuple, Path] = field(default_factory=dict)

    def __post_init__(self):
        self.root = Path(self.root)
        self.results = Path(self.results)
        self.cohorts = self.root / "cohorts"
        self.runs = self.root / "runs"

    def reset_runs(self) -> None:
        shutil.rmtree(self.runs, ignore_errors=True)
        self.runs.mkdir(parents=True, exist_ok=True)

    # -- cohorts --------------------------------------------------------------------------------

    def cohort(self, twin: str, *, sites: int, patients: int, days: float, holdout: int = 0,
               seed: int = 0) -> Path:
        """A generated cohort's directory (``spec.toml``, one directory per site, ``holdout/``,
        ``truth/``). Generation runs in a child process: a large cohort's peak memory stays there."""
        name = f"{twin}-{sites}x{patients}-{days:g}d-h{holdout}-s{seed}"
        out = self.cohorts / name
        if (out / "cohort.json").is_file():
            return out
        self.progress(f"  generating cohort {name}")
        tmp = self.cohorts / f".{name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        code = ("import sys; from twinfed.models.cohort import generate_cohort; "
                "generate_cohort(sys.argv[1], sites=int(sys.argv[2]), patients=int(sys.argv[3]), "
                "days=float(sys.argv[4]), seed=int(sys.argv[5]), holdout=int(sys.argv[6]), out=sys.argv[7])")
        subprocess.run([sys.executable, "-c", code, twin, str(sites), str(patients), str(days),
                        str(seed), str(holdout), str(tmp)], check=True)
        # Renamed only when complete, so an interrupted generation is never taken for a cohort.
        tmp.rename(out)
        return out

    @staticmethod
    def spec(cohort_dir: Path) -> TwinSpec:
        return load_spec(cohort_dir / "spec.toml")

    @staticmethod
    def site_names(cohort_dir: Path) -> list[str]:
        manifest = json.loads((cohort_dir / "cohort.json").read_text())
        return [name for name in manifest["sites"] if name != HOLDOUT]

    # -- studies --------------------------------------------------------------------------------

    def federated(self, plan: TrainingPlan, cohort_dir: Path, label: str, *,
                  sites: list[str] | None = None, cpus: int | None = None,
                  prepare: Callable[[Path, list], None] | None = None) -> StudyRun:
        """One study on Flower's simulation engine over ``sites`` (default: every site).

        ``prepare(run_dir, nodes)`` may set up node state before the engine starts."""
        from twinfed.simulate import SiteRef, run_simulated_study

        names = sites or self.site_names(cohort_dir)
        refs = [SiteRef(n, cohort_dir / n) for n in names]
        run_dir = self.runs / label
        shutil.rmtree(run_dir, ignore_errors=True)
        if prepare is not None:
            prepare(run_dir, refs)
        self.progress(f"  study {label}: {len(refs)} site(s), {plan.rounds} rounds")
        t0 = time.perf_counter()
        summary = run_simulated_study(plan, refs, run_dir, progress=self._round_progress,
                                      cpus=cpus or self.cpus)
        seconds = time.perf_counter() - t0
        if not summary.get("rounds_with_update"):
            raise RuntimeError(f"study {label}: no site trained in any round; see {run_dir}/summary.json")
        self.progress(f"  study {label}: {seconds:.0f} s")
        return StudyRun(run_dir, summary, seconds)

    def _round_progress(self, msg: str) -> None:
        if msg.startswith("round "):
            self.progress(f"    {msg}")

    def central(self, spec: TwinSpec, cohort_dir: Path, label: str, *, steps: int,
                learning_rate: float, seed: int = 0) -> Path:
        """The upper bound: one non-private surrogate trained on all sites' consented patients
        pooled (what no consortium may do), saved as a run directory like a study's."""
        import torch

        from twinfed.governance.consent import granted, site_consent
        from twinfed.models.site_data import SiteData, load_site
        from twinfed.models.surrogate import build_surrogate
        from twinfed.models.train import train_local
        from twinfed.models.twin import Twin

        sites = []
        for name in self.site_names(cohort_dir):
            site = load_site(cohort_dir / name, spec)
            sites.append(site.subset(granted(site_consent(cohort_dir / name), spec.purpose)))
        training = TrainingConfig().model_copy(update={"local_steps": steps, "learning_rate": learning_rate})
        plan = TrainingPlan(spec=spec, rounds=1, seed=seed, training=training,
                            privacy=PrivacyConfig(enabled=False, secure_aggregation=False))
        model = build_surrogate(spec, ModelConfig(), seed=seed)
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        train_local(model, SiteData.pooled(sites), plan.training, seed=seed)
        self.progress(f"  central {label}: {steps} steps, {time.perf_counter() - t0:.0f} s")
        run_dir = self.runs / label
        shutil.rmtree(run_dir, ignore_errors=True)
        Twin(plan, model).save(run_dir)
        return run_dir


def rmse_at(run_dir: Path, cohort_dir: Path, *, minutes: int = 60, stride: int = 1) -> dict:
    """Held-out RMSE at ``minutes`` ahead for each state, and persistence's, via the product's
    ``twinfed evaluate``; ``{"states": {col: {"model", "persistence"}}, "n_patients", "n_windows"}``."""
    from twinfed.cli.twin import evaluate

    spec = load_spec(cohort_dir / "spec.toml")
    if minutes % spec.step_minutes or minutes > spec.horizon_minutes:
        raise ValueError(f"{minutes} min is not a forecast step of the {spec.name} twin")
    i = minutes // spec.step_minutes - 1
    rep = evaluate(run_dir, str(cohort_dir / "spec.toml"), cohort_dir / HOLDOUT, stride=stride)
    return {"n_patients": rep["n_patients"], "n_windows": rep["n_windows"],
            "states": {col: {"model": m["rmse_by_step"][i], "persistence": m["persistence_rmse_by_step"][i]}
                       for col, m in rep["states"].items()}}
