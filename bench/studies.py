"""What the benchmark sections share: virtual cohorts, studies and their evaluation.

Cohorts are generated once per size and seed and kept under ``WORK/cohorts`` (the simulators are
deterministic given the seed, so a kept cohort is the cohort the benchmark asked for). Trained
twins live in ``WORK/runs`` and only for the run that trained them: every ratio the benchmark
reports compares twins trained in the same run.

Every study goes through the product: :func:`twinfed.simulate.run_simulated_study` on Flower's
simulation engine, with the plan's own defaults for the model, training and privacy, so a
change to those defaults is what the benchmark measures next time. Pretrained starting weights
(:mod:`twinfed.models.pretrain`, on a public virtual cohort) are made once per run and size, in
``WORK/runs`` too: they come from the same code as the twins started from them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from twinfed.models.plan import CalibrationConfig, ModelConfig, PrivacyConfig, TrainingConfig, TrainingPlan
from twinfed.models.spec import CORE_STRUCTURES, TwinSpec, load_spec

HOLDOUT = "holdout"
Progress = Callable[[str], None]
# ``--structures``: "spec" runs each cohort's spec as generated (its core's default structure);
# "all" makes every cohort the benchmark uses declare every structure of its core family (an
# ensemble twin, models.spec.CORE_STRUCTURES) in its spec.toml.
STRUCTURES = ("spec", "all")
ENSEMBLE_SUFFIX = "-all-structures"


def variant(structures: str = "spec", rolled_hours: float = 0.0) -> str:
    """The name of a run's options other than the defaults (``""`` for the plain run): where its
    results and trained twins go, so that they never overwrite the plain run's."""
    parts = (["structures-all"] if structures == "all" else []) + \
        ([f"rolled-{rolled_hours:g}h"] if rolled_hours else [])
    return "-".join(parts)


def ensemble_spec(spec: TwinSpec) -> TwinSpec:
    """``spec`` declaring every structure of its core family (unchanged without a core)."""
    if spec.core is None:
        return spec
    core = spec.core.model_copy(update={"structures": CORE_STRUCTURES[spec.core.name]})
    return TwinSpec.model_validate(spec.model_dump() | {"core": core.model_dump()})


def default_plan(spec: TwinSpec, rounds: int, *, dp: bool = True, epsilon: float | None = None,
                 secure_aggregation: bool = True, kind: str = "auto",
                 pretrained: Path | None = None, calibrate: bool = True,
                 rolled_hours: float = 0.0) -> TrainingPlan:
    """The plan a consortium gets by default (its model ``auto``: the hybrid for a spec with a
    core), changed only where the benchmark says so; ``pretrained``: a model directory whose
    weights the study starts from, named in the plan by their digest; ``rolled_hours``: the
    training's rolled-forward loss (``training.rolled_hours``, 0: off, the default)."""
    from twinfed.models.pretrain import pretrained_config

    privacy = PrivacyConfig(enabled=dp, secure_aggregation=secure_aggregation,
                            **({"epsilon": epsilon} if epsilon is not None else {}))
    model = ModelConfig(kind=kind)
    if pretrained is not None:
        model = pretrained_config(model, pretrained)
    # As the CLI does by default: each site holds patients out to calibrate prediction intervals.
    training = TrainingConfig(rolled_hours=rolled_hours) if rolled_hours else TrainingConfig()
    return TrainingPlan(spec=spec, rounds=rounds, privacy=privacy, model=model, training=training,
                        calibration=CalibrationConfig() if calibrate else None)


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
    # The run's options (``python -m bench --structures/--rolled-hours``): every cohort's spec
    # (STRUCTURES) and the rolled-forward loss of every plan made by :meth:`plan`.
    structures: str = "spec"
    rolled_hours: float = 0.0
    # Where cohorts are kept (default ``root/cohorts``): shared by runs of other options, whose
    # ``root`` (trained twins, trial designs) is their own.
    cohorts_dir: Path | None = None
    # Twins trained in this run, by (twin, world, regime, epsilon) -> run directory.
    models: dict[tuple, Path] = field(default_factory=dict)
    # Their held-out evaluations (rmse_at reports), same keys: a later section reuses them.
    evaluations: dict[tuple, dict] = field(default_factory=dict)

    def __post_init__(self):
        self.root = Path(self.root)
        self.results = Path(self.results)
        self.cohorts = Path(self.cohorts_dir) if self.cohorts_dir is not None else self.root / "cohorts"
        self.runs = self.root / "runs"
        if self.structures not in STRUCTURES:
            raise ValueError(f"structures must be one of {', '.join(STRUCTURES)}, not {self.structures!r}")

    def options(self) -> dict:
        """The run's options, for a figure's conditions and the results' metadata."""
        return {"structures": self.structures, "rolled_hours": self.rolled_hours}

    def plan(self, spec: TwinSpec, rounds: int, **kwargs) -> TrainingPlan:
        """:func:`default_plan` with this run's rolled-forward loss."""
        return default_plan(spec, rounds, rolled_hours=self.rolled_hours, **kwargs)

    def reset_runs(self) -> None:
        shutil.rmtree(self.runs, ignore_errors=True)
        self.runs.mkdir(parents=True, exist_ok=True)

    # -- cohorts --------------------------------------------------------------------------------

    def cohort(self, twin: str, *, sites: int, patients: int, days: float, holdout: int = 0,
               seed: int = 0, simulator: str | None = None) -> Path:
        """A cohort's directory (``spec.toml``, one directory per site, ``holdout/``, ``truth/``)
        made by the twin's ``simulator`` (None: its built-in default). Generation runs in a child
        process: a large cohort's peak memory stays there. With ``structures`` "all", the same
        cohort whose spec declares every structure of its core (:func:`ensemble_cohort`)."""
        from twinfed.models.cohort import simulator_name

        sim = simulator_name(twin, simulator)
        name = f"{twin}-{sim}-{sites}x{patients}-{days:g}d-h{holdout}-s{seed}"
        out = self.cohorts / name
        if not (out / "cohort.json").is_file():
            self._generate(out, twin, sites=sites, patients=patients, days=days, holdout=holdout, seed=seed,
                           simulator=sim)
        return ensemble_cohort(out) if self.structures == "all" else out

    def _generate(self, out: Path, twin: str, *, sites: int, patients: int, days: float, holdout: int,
                  seed: int, simulator: str) -> None:
        name, sim = out.name, simulator
        self.progress(f"  generating cohort {name}")
        tmp = self.cohorts / f".{name}.{os.getpid()}.partial"  # runs of other options may share cohorts
        shutil.rmtree(tmp, ignore_errors=True)
        code = ("import sys; from twinfed.models.cohort import generate_cohort; "
                "generate_cohort(sys.argv[1], sites=int(sys.argv[2]), patients=int(sys.argv[3]), "
                "days=float(sys.argv[4]), seed=int(sys.argv[5]), holdout=int(sys.argv[6]), out=sys.argv[7], "
                "simulator=sys.argv[8])")
        subprocess.run([sys.executable, "-c", code, twin, str(sites), str(patients), str(days),
                        str(seed), str(holdout), str(tmp), sim], check=True)
        # Renamed only when complete, so an interrupted generation is never taken for a cohort.
        _publish(tmp, out)

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
                  pretrained: Path | None = None) -> StudyRun:
        """One study on Flower's simulation engine over ``sites`` (default: every site);
        ``pretrained``: the model directory of the starting weights ``plan`` names."""
        from twinfed.simulate import SiteRef, run_simulated_study

        names = sites or self.site_names(cohort_dir)
        refs = [SiteRef(n, cohort_dir / n) for n in names]
        run_dir = self.runs / label
        shutil.rmtree(run_dir, ignore_errors=True)
        self.progress(f"  study {label}: {len(refs)} site(s), {plan.rounds} rounds")
        t0 = time.perf_counter()
        summary = run_simulated_study(plan, refs, run_dir, progress=self._round_progress,
                                      cpus=cpus or self.cpus, pretrained=pretrained)
        seconds = time.perf_counter() - t0
        if not summary.get("rounds_with_update"):
            raise RuntimeError(f"study {label}: no site trained in any round; see {run_dir}/summary.json")
        self.progress(f"  study {label}: {seconds:.0f} s")
        return StudyRun(run_dir, summary, seconds)

    def _round_progress(self, msg: str) -> None:
        if msg.startswith("round "):
            self.progress(f"    {msg}")

    def central(self, spec: TwinSpec, cohort_dir: Path, label: str, *, steps: int,
                learning_rate: float, kind: str = "auto", seed: int = 0) -> Path:
        """The upper bound: one non-private twin of ``kind`` trained on all sites' patients pooled
        (what no consortium may do), saved as a run directory like a study's. The product's
        pooled trainer (:func:`twinfed.models.pretrain.pretrain`: every patient of every site
        but ``holdout/``; a virtual cohort's patients all consent)."""
        run_dir = self.runs / label
        shutil.rmtree(run_dir, ignore_errors=True)
        seconds = _train_pooled(spec, cohort_dir, run_dir, kind=kind, steps=steps,
                                learning_rate=learning_rate, seed=seed)
        self.progress(f"  central {label}: {steps} steps, {seconds:.0f} s")
        return run_dir

    def pretrained(self, twin: str, *, sites: int, patients: int, days: float, seed: int, steps: int,
                   learning_rate: float, kind: str = "auto") -> Path:
        """Starting weights pretrained on a public virtual cohort of the twin's built-in
        simulator (``seed`` makes its patients, none of them a world's), a model directory made
        once per run and size."""
        cohort = self.cohort(twin, sites=sites, patients=patients, days=days, seed=seed)
        out = self.runs / f"pretrained-{cohort.name}-{kind}-{steps}steps-lr{learning_rate:g}"
        if not (out / "model" / "plan.json").is_file():
            seconds = _train_pooled(self.spec(cohort), cohort, out, kind=kind, steps=steps,
                                    learning_rate=learning_rate, seed=0)
            self.progress(f"  pretrained {out.name}: {seconds:.0f} s")
        return out


def ensemble_cohort(cohort_dir: Path) -> Path:
    """The cohort in ``cohort_dir`` with a spec declaring every structure of its core family
    (:func:`ensemble_spec`), beside it (``<name>-all-structures``): its data files hard links to
    the cohort's (the same patients and truth), its ``spec.toml`` its own."""
    cohort_dir = Path(cohort_dir)
    out = cohort_dir.with_name(cohort_dir.name + ENSEMBLE_SUFFIX)
    if (out / "cohort.json").is_file():
        return out
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(cohort_dir, tmp, copy_function=_link_or_copy)
    spec_path = tmp / "spec.toml"
    text = ensemble_spec(load_spec(spec_path)).to_toml()
    spec_path.unlink()  # a hard link to the plain cohort's spec: never written through
    spec_path.write_text(text)
    _publish(tmp, out)
    return out


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _publish(tmp: Path, out: Path) -> None:
    """Rename a complete ``tmp`` to ``out``; if another run published ``out`` first, keep theirs."""
    try:
        tmp.rename(out)
    except OSError:
        if not (out / "cohort.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _train_pooled(spec: TwinSpec, cohort_dir: Path, run_dir: Path, *, kind: str, steps: int,
                  learning_rate: float, seed: int) -> float:
    """Train non-privately on a cohort's sites pooled and save the twin; the seconds it took."""
    from twinfed.models.pretrain import pretrain
    from twinfed.models.twin import Twin

    t0 = time.perf_counter()
    model, plan = pretrain(spec, cohort_dir, ModelConfig(kind=kind), steps=steps,
                           learning_rate=learning_rate, seed=seed)
    Twin(plan, model).save(run_dir)
    return time.perf_counter() - t0


def rmse_at(run_dir: Path, cohort_dir: Path, *, minutes: int = 60, stride: int = 1, personalise: bool = True,
            extra_forecasters: dict | None = None) -> dict:
    """Held-out RMSE at ``minutes`` ahead, by the product's protocol
    (:func:`twinfed.models.evaluation.evaluate`: windows after each patient's identification
    period; a hybrid personalised unless ``personalise`` is off), for each state and forecaster:
    ``{"states": {col: {"model", "persistence", "population" (hybrid, personalised), and each
    extra forecaster's name}}, "n_patients", "n_windows", "personalised",
    "seconds_per_patient" (of the identification, or None), "identify_hours", "kind",
    "trained_weights", "seconds", "intervals"}``; ``"intervals"``: the prediction intervals'
    figures (None without a calibration): ``{"label", "states": {col: {"coverage",
    "coverage_windows", "coverage_by_step", "coverage_windows_by_step", "interval_width_by_step"}}}``,
    each by level key (``"95"``), and ``"intervals_note"``: why there are none."""
    from twinfed.models.evaluation import evaluate

    spec = load_spec(cohort_dir / "spec.toml")
    if minutes % spec.step_minutes or minutes > spec.horizon_minutes:
        raise ValueError(f"{minutes} min is not a forecast step of the {spec.name} twin")
    i = minutes // spec.step_minutes - 1
    t0 = time.perf_counter()
    rep = evaluate(run_dir, str(cohort_dir / "spec.toml"), cohort_dir / HOLDOUT, stride=stride,
                   personalise=personalise, extra_forecasters=extra_forecasters)
    # evaluate's keys: "rmse_by_step" (the twin), "<forecaster>_rmse_by_step" (the others)
    states = {col: {key.removesuffix("rmse_by_step").rstrip("_") or "model": by_step[i]
                    for key, by_step in m.items() if key.endswith("rmse_by_step")}
              for col, m in rep["states"].items()}
    info = rep["personalisation"]
    intervals = None
    if rep.get("intervals") is not None:
        keys = ("coverage", "coverage_windows", "coverage_by_step", "coverage_windows_by_step",
                "interval_width_by_step")
        intervals = {"label": rep["intervals"],
                     "states": {col: {k: m[k] for k in keys} for col, m in rep["states"].items()}}
    return {"n_patients": rep["n_patients"], "n_windows": rep["n_windows"], "states": states,
            "personalised": info["personalised"], "seconds_per_patient": info.get("seconds_per_patient"),
            "identify_hours": info["identify_hours"], "kind": rep["model"]["kind"],
            "trained_weights": rep["model"]["trained_weights"], "seconds": time.perf_counter() - t0,
            "intervals": intervals, "intervals_note": rep.get("intervals_note")}


def each_world(ws, sizes, run_world, *, twins=None) -> dict:
    """Every world of every twin (of ``twins``, default all) through
    ``run_world(ws, sizes, twin, world)``, their figures merged: a section's ``run``."""
    out: dict = {}
    for twin in sizes.twins:
        if twins is None or twin in twins:
            for world in sizes.worlds[twin]:
                out.update(run_world(ws, sizes, twin, world))
    return out
