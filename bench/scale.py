"""Section 4: how a study scales with the number of sites, and one node's peak memory.

- Time per round per site at each number of simulated sites (tiny cohorts, so the round is
  mostly the federation's own work: messages, secure aggregation, the governance gate), the
  default plan (DP and SecAgg+), median over rounds after the first, on Flower's simulation
  engine with 2 CPUs. Target: the largest consortium within 1.5x of the smallest, per site.
  The same at the smallest and largest size without SecAgg+ shows what secure aggregation adds.
- SecAgg+ work per site and the coordinator's per round at 10, 100 and 1,000 sites, Flower's
  own functions for the neighbourhood chosen at each size (:mod:`bench.secagg_cost`).
- Peak memory of one node running one real round of the default plan on 10,000 patients x 7
  days at 5-minute steps, in a child process (``bench.node_probe``). Target: 1.2 GiB or less.
  The same, and loading alone, at each size of ``Sizes.memory_curve_patients`` (1k, 10k, 50k),
  with the memory per million rows: the curve that shows growth linear in rows.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from bench import secagg_cost
from bench.cost import steady_round_seconds
from bench.report import figure
from bench.sizes import Sizes
from bench.studies import Workspace, default_plan, plan_conditions
from bench.tile_site import tile_cohort
from twinfed.models.spec import load_spec

TARGET_PER_SITE = 1.5
TARGET_MEMORY_GIB = 1.2  # DESIGN.md section 6, issue 14


def run(ws: Workspace, sizes: Sizes) -> dict:
    out = rounds_per_site(ws, sizes)
    out.update(secret_sharing(sizes))
    out.update(secagg_cost.run(default_plan(load_spec("glucose"), sizes.scale_rounds, calibrate=False),
                               sizes.secagg_cost_sites))
    out.update(node_memory(ws, sizes))
    return out


def secret_sharing(sizes: Sizes) -> dict:
    """SecAgg+'s Shamir secret sharing as twinfed configures it (the default plan's set-up for
    the sampled nodes: a neighbourhood of k, threshold t), per site and
    round: each node splits its two secrets into k shares, the coordinator rebuilds one secret
    per node from a threshold of shares. Flower's own functions, timed alone: the part of a
    round that grows with the number of sites."""
    import os
    import time

    from flwr.common.secure_aggregation.crypto.shamir import (
        combine_shares,
        create_shares,
    )
    from twinfed.models.spec import load_spec
    from twinfed.privacy.secagg import required_setup

    plan = default_plan(load_spec("glucose"), sizes.scale_rounds, calibrate=False)
    out = {}
    for n in sizes.scale_sites:
        num_shares, t = required_setup(n, plan)
        c0 = time.process_time()
        shares = [create_shares(os.urandom(32), t, num_shares) for _ in range(2)]
        created = time.process_time() - c0
        c0 = time.process_time()
        combine_shares(shares[1][:t])
        combined = time.process_time() - c0
        out[f"secagg_secret_sharing_cpu_seconds_per_site.{n}_sites"] = figure(
            created + combined, "s", conditions={
                "sites": n, "num_shares": num_shares, "reconstruction_threshold": t,
                "create_two_secrets_s": created, "combine_one_secret_s": combined,
                "library": "flwr.common.secure_aggregation.crypto.shamir (pycryptodome GF(2^128))"})
    return out


def rounds_per_site(ws: Workspace, sizes: Sizes) -> dict:
    out: dict = {}
    per_site: dict[tuple[int, bool], float] = {}
    small, large = min(sizes.scale_sites), max(sizes.scale_sites)
    runs = [(n, True) for n in sizes.scale_sites]
    if sizes.scale_without_secagg:
        runs += [(n, False) for n in (small, large)]
    for n, secagg in runs:
        cohort = ws.cohort("glucose", sites=n, patients=sizes.scale_patients, days=sizes.scale_days)
        plan = default_plan(ws.spec(cohort), sizes.scale_rounds, secure_aggregation=secagg, calibrate=False)
        label = f"scale-{n}-sites{'' if secagg else '-no-secagg'}"
        study = ws.federated(plan, cohort, label)
        seconds = steady_round_seconds(study)
        per_site[(n, secagg)] = seconds / n
        cond = plan_conditions(plan) | {
            "sites": n, "patients_per_site": sizes.scale_patients, "days": sizes.scale_days,
            "round_seconds": study.round_seconds(), "engine": "Flower simulation (Ray), 2 CPUs",
            "timing": "median round time over rounds 2.., divided by the number of sites"}
        name = f"round_seconds_per_site.{n}_sites" + ("" if secagg else ".without_secagg")
        out[name] = figure(per_site[(n, secagg)], "s", conditions=cond)
    out["round_seconds_per_site.ratio_largest_vs_smallest"] = figure(
        per_site[(large, True)] / per_site[(small, True)], "x", target=TARGET_PER_SITE,
        conditions={"largest": large, "smallest": small, "secure_aggregation": True,
                    "per_site_seconds": {str(n): per_site[(n, True)] for n in sizes.scale_sites}})
    if sizes.scale_without_secagg:
        out["round_seconds_per_site.ratio_largest_vs_smallest.without_secagg"] = figure(
            per_site[(large, False)] / per_site[(small, False)], "x",
            conditions={"largest": large, "smallest": small, "secure_aggregation": False})
    return out


def _probe(mode: str, site_dir, state_dir, spec_path) -> dict:
    done = subprocess.run([sys.executable, "-m", "bench.node_probe", mode, str(site_dir), str(state_dir),
                           str(spec_path)], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def node_memory(ws: Workspace, sizes: Sizes) -> dict:
    base = ws.cohort("glucose", sites=1, patients=sizes.memory_patients, days=sizes.memory_days)
    sites = {}
    for n in sizes.memory_curve_patients:
        if n == sizes.memory_patients:
            cohort = base
        elif n < sizes.memory_patients:
            cohort = ws.cohort("glucose", sites=1, patients=n, days=sizes.memory_days)
        else:
            cohort = ws.cohorts / f"{base.name}-tiled-{n}"
            if not (cohort / "spec.toml").is_file():
                ws.progress(f"  tiling {base.name} to {n} patients")
                tile_cohort(base, cohort, n // sizes.memory_patients)
        sites[n] = (cohort / ws.site_names(base)[0], cohort / "spec.toml")  # tiled: the same names
    ws.progress(f"  one node's memory at {', '.join(map(str, sites))} patients x {sizes.memory_days:g} days")
    return node_memory_curve(sites, state_root=ws.runs, reference=sizes.memory_patients,
                             days=sizes.memory_days)


def node_memory_curve(sites: dict[int, tuple[Path, Path]], *, state_root: Path, reference: int,
                      days: float) -> dict:
    """Peak memory of one node (load only, and a whole round) at each size, ``sites`` mapping
    patients to (site directory, spec); ``reference`` is the size with the target. Linearity:
    the peak above the baseline per million rows at each size (falls towards the true cost per
    row as fixed costs are spread), and the marginal cost per million rows between consecutive
    sizes (the same at every step if growth is linear)."""
    runs: dict[int, dict] = {}
    for n, (site_dir, spec_path) in sorted(sites.items()):
        state = state_root / f"memory-node-{n}"
        shutil.rmtree(state, ignore_errors=True)
        runs[n] = {"round": _probe("round", site_dir, state, spec_path),
                   "load": _probe("load", site_dir, state, spec_path),
                   "export_megabytes": round(sum(f.stat().st_size for f in site_dir.iterdir()) / 1e6, 1)}
        shutil.rmtree(state, ignore_errors=True)
    measure = ("peak resident set size of the node's own process (VmHWM), interpreter and "
               "libraries included")
    round_text = ("governance gate, load + validate, consent, calibrate, ledger, DP training (default "
                  "plan), audit; SecAgg+ masking of the small update not included")
    curve = {str(n): {"rows": r["load"]["rows"], "load_gib": round(r["load"]["peak_gib"], 3),
                      "round_gib": round(r["round"]["peak_gib"], 3)} for n, r in runs.items()}
    ref = runs[reference]
    out = {"node_peak_memory": None}  # first in the table: the figure with the target
    sizes = sorted(runs)
    for mode, label in (("round", "round"), ("load", "load_only")):
        for n in sizes:
            probe, rows = runs[n][mode], runs[n]["load"]["rows"]
            cond = {"patients": n, "days": days, "rows": rows, "export": "CSV",
                    "export_megabytes": runs[n]["export_megabytes"], "measure": measure,
                    "baseline_gib_after_imports": round(probe["baseline_gib"], 3),
                    "seconds": probe["seconds"], "work": round_text if mode == "round" else "load_site only"}
            out[f"node_peak_memory.{label}.{n}_patients"] = figure(probe["peak_gib"], "GiB", conditions=cond)
        for n in sizes:
            probe, rows = runs[n][mode], runs[n]["load"]["rows"]
            out[f"node_memory_per_million_rows.{label}.{n}_patients"] = figure(
                (probe["peak_gib"] - probe["baseline_gib"]) * 1024 / (rows / 1e6), "MiB/Mrows",
                conditions={"patients": n, "rows": rows, "what": "peak minus baseline after imports"})
        for a, b in zip(sizes, sizes[1:]):
            rows = runs[b]["load"]["rows"] - runs[a]["load"]["rows"]
            extra = runs[b][mode]["peak_gib"] - runs[a][mode]["peak_gib"]
            out[f"node_memory_marginal_per_million_rows.{label}.{a}_to_{b}_patients"] = figure(
                extra * 1024 / (rows / 1e6), "MiB/Mrows",
                conditions={"from_patients": a, "to_patients": b, "extra_rows": rows,
                            "what": "growth of the peak per million more rows"})
    out["node_peak_memory"] = figure(ref["round"]["peak_gib"], "GiB", target=TARGET_MEMORY_GIB, conditions={
        "patients": reference, "days": days, "rows": ref["load"]["rows"], "export": "CSV",
        "export_megabytes": ref["export_megabytes"], "round": round_text, "measure": measure,
        "baseline_gib_after_imports": round(ref["round"]["baseline_gib"], 3),
        "peak_gib_loading_the_site_only": round(ref["load"]["peak_gib"], 3),
        "round_seconds": ref["round"]["seconds"], "steps": ref["round"]["steps"], "curve": curve,
        "larger_sizes": "the reference cohort tiled with renamed patient ids (bench.tile_site)"})
    return out
