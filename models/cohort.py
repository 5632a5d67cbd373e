"""Virtual cohorts on disk: one site directory per hospital in the data contract's layout.

``DIR/spec.toml``, ``DIR/<site>/{timeseries,patients,consent}.csv`` (every patient granted for
the spec's purpose and for in-silico trials), optionally ``DIR/holdout/`` (patients from every population, for testing
only), and ``DIR/truth/<site>.csv`` with each patient's simulator parameters, outside the site
directories, so what-if forecasts can be checked against the mechanistic truth.

``DIR/cohort.json`` names the simulator that made the cohort (``simulator``, its module path, and
``simulator_name``); whatever replays the truth asks :func:`cohort_simulator` for it, because a
twin may have more than one (the glucose twin: ``bergman``, its default, and ``hovorka``, of a
different structure from the twin's own core). Only the built-in simulators listed here are ever
imported, whatever a cohort.json says.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from types import ModuleType

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from twinfed.errors import DataError, TwinfedError
from twinfed.models.sim.base import SimCohort, SiteProfile, check_care
from twinfed.models.spec import TwinSpec, load_spec

# Each twin's built-in simulators by short name, the default first.
SIMULATORS: dict[str, dict[str, str]] = {
    "glucose": {"bergman": "twinfed.models.sim.glucose_sim", "hovorka": "twinfed.models.sim.hovorka_sim"},
    "cardio": {"baroreflex": "twinfed.models.sim.cardio_sim"},
}
HOLDOUT = "holdout"
CONSENT_TIME = "2026-01-05T09:00:00+00:00"
# Virtual patients consent to the twin's training and to in-silico trials on their twins (the
# purpose of the example arms files): a hospital's real consent records name their own purposes.
TRIAL_PURPOSE = "in-silico-trial"


def simulator_name(twin: str, name: str | None = None) -> str:
    """``name`` if it is one of the twin's simulators, the twin's default if ``name`` is None."""
    choices = list(SIMULATORS[twin])
    if name is None or name in choices:
        return name or choices[0]
    if len(choices) == 1:
        raise TwinfedError(f"the {twin} twin has one built-in simulator, {choices[0]!r}; there is no "
                           f"simulator {name!r} for it")
    raise TwinfedError(f"unknown simulator {name!r} for the {twin} twin; choose one of "
                       f"{', '.join(choices)} (default {choices[0]})")


def simulator(twin: str, name: str | None = None) -> ModuleType:
    return import_module(SIMULATORS[twin][simulator_name(twin, name)])


def cohort_simulator(cohort_dir: str | Path) -> ModuleType:
    """The simulator that made the cohort in ``cohort_dir``, as its cohort.json names it."""
    manifest = json.loads((Path(cohort_dir) / "cohort.json").read_text())
    twin = manifest["twin"]
    name = manifest.get("simulator_name")
    if name is None:  # written before cohorts named their simulator: known by module path
        name = next((n for n, module in SIMULATORS[twin].items() if module == manifest.get("simulator")), None)
        if name is None:
            raise TwinfedError(f"{Path(cohort_dir) / 'cohort.json'}: simulator {manifest.get('simulator')!r} "
                               f"is not one of the {twin} twin's built-in simulators; regenerate the cohort")
    return simulator(twin, name)


def site_names(n: int) -> list[str]:
    return [f"site-{chr(ord('a') + i)}" if n <= 26 else f"site-{i + 1:03d}" for i in range(n)]


@dataclass
class CohortSummary:
    out: Path
    sites: dict[str, dict]
    simulator_name: str


MAX_SITES, MAX_PATIENTS, MAX_DAYS = 10_000, 1_000_000, 366.0


def check_sizes(*, sites: int, patients: int, days: float, seed: int, holdout: int,
                step_minutes: int) -> None:
    """One-line errors for sizes no cohort can have (before anything is written)."""
    if not 1 <= sites <= MAX_SITES:
        raise DataError(f"--sites must be between 1 and {MAX_SITES}")
    if not 1 <= patients <= MAX_PATIENTS or not 0 <= holdout <= MAX_PATIENTS:
        raise DataError(f"--patients must be between 1 and {MAX_PATIENTS}, --holdout between 0 and "
                        f"{MAX_PATIENTS}")
    if not math.isfinite(days) or not 0 < days <= MAX_DAYS:
        raise DataError(f"--days must be a finite number above 0 and at most {MAX_DAYS:g}")
    if round(days * 24 * 60 / step_minutes) < 1:
        raise DataError(f"--days {days:g} is shorter than one step ({step_minutes} min)")
    if not 0 <= seed < 2**63:
        raise DataError("--seed must be a whole number between 0 and 2^63 - 1")


def generate_cohort(twin: str, *, sites: int, patients: int, days: float, seed: int,
                    out: str | Path, holdout: int = 0, simulator: str | None = None,
                    force: bool = False, care: str = "routine") -> CohortSummary:
    """Write a cohort made by the twin's simulator named ``simulator`` (None: its default), under
    ``care``: ``routine`` (care as records hold it, partly reacting to the readings) or ``plain``
    (the open-loop care of cohorts made before routine care, reproduced byte for byte).

    The cohort appears whole or not at all: it is written beside ``out`` and renamed into place.
    An existing ``out`` is refused, unless it is a cohort and ``force`` is set: then it is
    replaced (the new one written first, the old one removed only once the new one is in place).
    """
    spec = load_spec(twin)
    sim_name = simulator_name(twin, simulator)
    check_care(care)
    check_sizes(sites=sites, patients=patients, days=days, seed=seed, holdout=holdout,
                step_minutes=spec.step_minutes)
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise DataError(f"{out} is a file; give a directory for the cohort")
        if any(out.iterdir()) and not (force and (out / "cohort.json").is_file()):
            raise DataError(f"{out} already exists and is not empty; cohorts are never overwritten "
                            "(--force replaces an existing cohort, and only a cohort)")
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        summary = _write_cohort(twin, spec, sim_name, sites=sites, patients=patients, days=days,
                                seed=seed, out=partial, holdout=holdout, care=care)
        if out.exists():
            retired = out.parent / f".{out.name}.replaced-{os.getpid()}"
            out.rename(retired)
            partial.rename(out)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            partial.rename(out)
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise DataError(f"cannot write the cohort to {out} ({exc.strerror or exc}); nothing was "
                        "written: free space or choose another directory") from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return CohortSummary(out, summary.sites, sim_name)


def _write_cohort(twin: str, spec: TwinSpec, sim_name: str, *, sites: int, patients: int, days: float,
                  seed: int, out: Path, holdout: int, care: str = "routine") -> CohortSummary:
    sim = import_module(SIMULATORS[twin][sim_name])
    out.mkdir(parents=True, exist_ok=True)
    n_steps = int(round(days * 24 * 60 / spec.step_minutes))
    rng = np.random.default_rng(seed)
    manifest: dict[str, dict] = {}
    profiles = sim.SITE_PROFILES
    plan = [(name, [profiles[i % len(profiles)]], patients) for i, name in enumerate(site_names(sites))]
    if holdout:
        plan.append((HOLDOUT, list(profiles), holdout))
    for name, profs, n in plan:
        cohorts = []
        shares = np.array_split(np.arange(n), len(profs))
        for prof, share in zip(profs, shares):
            if share.size:
                cohorts.append(sim.generate(prof, int(share.size), n_steps, step_minutes=spec.step_minutes,
                                            rng=np.random.default_rng(rng.integers(2**63)),
                                            id_prefix=f"{name}-{prof.name[:3]}-", care=care))
        cohort = _concat(cohorts)
        write_site(out / name, spec, cohort)
        write_truth(out / "truth" / f"{name}.csv", cohort)
        manifest[name] = {"profiles": [p.name for p in profs], "patients": cohort.n_patients,
                          "rows": cohort.n_patients * cohort.n_steps}
    (out / "spec.toml").write_text(spec.to_toml(), encoding="utf-8")
    (out / "cohort.json").write_text(json.dumps(
        {"twin": twin, "seed": seed, "days": days, "step_minutes": spec.step_minutes,
         "sites": manifest, "simulator": SIMULATORS[twin][sim_name], "simulator_name": sim_name,
         "care": care},
        indent=2), encoding="utf-8")
    return CohortSummary(out, manifest, sim_name)


def _concat(parts: list[SimCohort]) -> SimCohort:
    if len(parts) == 1:
        return parts[0]
    return SimCohort(
        patient_ids=[p for c in parts for p in c.patient_ids],
        covariates={k: np.concatenate([c.covariates[k] for c in parts]) for k in parts[0].covariates},
        params={k: np.concatenate([c.params[k] for c in parts]) for k in parts[0].params},
        states={k: np.concatenate([c.states[k] for c in parts]) for k in parts[0].states},
        controls={k: np.concatenate([c.controls[k] for c in parts]) for k in parts[0].controls},
    )


def _decimals(spec: TwinSpec, col: str) -> int:
    # Round like the devices that export them: states to 0.1, amounts to 0.001.
    return 1 if col in spec.state_columns else 3


def write_site(site_dir: Path, spec: TwinSpec, cohort: SimCohort) -> None:
    site_dir.mkdir(parents=True, exist_ok=True)
    p, t = cohort.n_patients, cohort.n_steps
    ids = pa.array(np.repeat(np.array(cohort.patient_ids, dtype=object), t).tolist(), pa.string())
    cols = {"patient_id": ids,
            "time_min": pa.array(np.tile(np.arange(t, dtype=np.int64) * spec.step_minutes, p))}
    for col in spec.timeseries_columns:
        src = cohort.states[col] if col in cohort.states else cohort.controls[col]
        cols[col] = pa.array(np.round(src.reshape(-1), _decimals(spec, col)))
    pacsv.write_csv(pa.table(cols), site_dir / "timeseries.csv")
    pcols = {"patient_id": pa.array(cohort.patient_ids, pa.string())}
    for col in spec.covariate_columns:
        pcols[col] = pa.array(np.round(cohort.covariates[col], 1))
    pacsv.write_csv(pa.table(pcols), site_dir / "patients.csv")
    lines = ["patient_id,status,purpose,recorded_at"]
    for purpose in dict.fromkeys((spec.purpose, TRIAL_PURPOSE)):
        lines += [f"{pid},granted,{purpose},{CONSENT_TIME}" for pid in cohort.patient_ids]
    (site_dir / "consent.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_truth(path: Path, cohort: SimCohort) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = {"patient_id": pa.array(cohort.patient_ids, pa.string())}
    cols |= {k: pa.array(np.asarray(v, dtype=np.float64)) for k, v in cohort.params.items()}
    pacsv.write_csv(pa.table(cols), path)


def read_truth(path: str | Path) -> tuple[list[str], dict[str, np.ndarray]]:
    table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types={"patient_id": pa.string()}))
    ids = table.column("patient_id").to_pylist()
    return ids, {c: table.column(c).to_numpy() for c in table.column_names if c != "patient_id"}


__all__ = ["generate_cohort", "read_truth", "simulator", "cohort_simulator", "site_names", "SiteProfile", "HOLDOUT"]


def replay_truth(cohort_dir: str | Path, site: str, patient_id: str,
                 controls: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The simulator's noise-free states for one patient of a generated cohort under ``controls``

    (full series, one array per control column): the mechanistic truth of a what-if.
    """
    cohort_dir = Path(cohort_dir)
    ids, params = read_truth(cohort_dir / "truth" / f"{site}.csv")
    i = ids.index(patient_id)
    one = {k: v[i: i + 1] for k, v in params.items()}
    states = cohort_simulator(cohort_dir).simulate(one, {k: np.asarray(v)[None, :] for k, v in controls.items()})
    return {k: v[0] for k, v in states.items()}
