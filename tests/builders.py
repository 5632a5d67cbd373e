"""Small site directories for tests, written in the data contract's layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from twinfed.models.spec import TwinSpec, load_spec


def write_site(site_dir: Path, spec: TwinSpec | None = None, *, n_patients: int = 5, n_steps: int = 60,
               seed: int = 0, consent: str | None = "granted") -> Path:
    """A site of ``n_patients`` with smooth in-range series; every patient gets ``consent``."""
    spec = spec or load_spec("glucose")
    rng = np.random.default_rng(seed)
    site_dir.mkdir(parents=True, exist_ok=True)
    lines = ["patient_id,time_min," + ",".join(spec.timeseries_columns)]
    for p in range(n_patients):
        # Mean-reverting states pushed by the controls: learnable, unlike a random walk.
        ctrl = np.array([[rng.choice([0.0, 0.0, 0.0, c.max / 20]) for c in spec.controls]
                         for _ in range(n_steps)]).reshape(n_steps, len(spec.controls))
        x = np.array([(c.min + c.max) / 2 for c in spec.states], float)
        rows = []
        for t in range(n_steps):
            rows.append([float(np.clip(v, c.min, c.max)) for v, c in zip(x, spec.states)] + list(ctrl[t]))
            mid = np.array([(c.min + c.max) / 2 for c in spec.states])
            span = np.array([c.max - c.min for c in spec.states])
            push = (ctrl[t].sum() if len(spec.controls) else 0.0) * span * 0.002
            x = x + 0.1 * (mid - x) + push + rng.normal(0, span / 2000)
        for t, vals in enumerate(rows):
            lines.append(f"p{p},{t * spec.step_minutes}," + ",".join(f"{v:.3f}" for v in vals))
    (site_dir / "timeseries.csv").write_text("\n".join(lines) + "\n")
    plines = ["patient_id," + ",".join(spec.covariate_columns)]
    for p in range(n_patients):
        plines.append(f"p{p}," + ",".join(f"{(c.min + c.max) / 3:.1f}" for c in spec.covariates))
    (site_dir / "patients.csv").write_text("\n".join(plines) + "\n")
    if consent is not None:
        clines = ["patient_id,status,purpose,recorded_at"]
        clines += [f"p{p},{consent},{spec.purpose},2026-01-01T00:00:00Z" for p in range(n_patients)]
        (site_dir / "consent.csv").write_text("\n".join(clines) + "\n")
    return site_dir


def edit_csv(path: Path, row: int, column: str, value: str) -> None:
    """Set data row ``row`` (1-based, header excluded) of ``column`` to ``value``."""
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    cells = lines[row].split(",")
    cells[header.index(column)] = value
    lines[row] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")


def own_entries(state_dir: Path) -> list:
    """A state's audit entries, verified against its own key."""
    from twinfed.governance.layout import verified_entries

    return verified_entries(state_dir)


def simulate_from_cli(root: Path, *, patients: int, seed: int, holdout: int, flags: list[str]) -> None:
    """A three-site glucose cohort in ``root/cohort`` and a study on it, ``twinfed simulate
    ... --out root/run``, through the CLI's entry point."""
    from twinfed.cli.main import main
    from twinfed.models.cohort import generate_cohort

    generate_cohort("glucose", sites=3, patients=patients, days=2.5, seed=seed, out=root / "cohort",
                    holdout=holdout)
    sites = [a for n in ("site-a", "site-b", "site-c") for a in ("--site", f"{n}={root / 'cohort' / n}")]
    assert main(["simulate", "--spec", str(root / "cohort" / "spec.toml"), *sites, *flags,
                 "--out", str(root / "run")]) == 0


# A one-day trial of two arms (usual care, a meal-bolus rule) and two outcomes, two draws: the
# smallest trial that exercises a rule, a contrast and propagated uncertainty.
TINY_ARMS = """\
[trial]
name = "tiny-carb-ratio"
purpose = "in-silico-trial"
reference = "usual-care"
start_hours = 48
duration_days = 1
outcomes = ["time_in_range", "mean_glucose"]
draws = 2
seed = 0

[[trial.arms]]
name = "usual-care"
scenario = "recorded"

[[trial.arms]]
name = "ratio-10"
rule = { kind = "meal-bolus", insulin = "insulin_u", carbs = "carbs_g", grams_per_unit = 10.0, basal_u_per_h = "recorded" }
"""
