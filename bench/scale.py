"""Section 4: how a study scales with the number of sites, and one node's peak memory.

- Time per round per site at each number of simulated sites (tiny cohorts, so the round is
  mostly the federation's own work: messages, secure aggregation, the governance gate), the
  default plan (DP and SecAgg+), median over rounds after the first, on Flower's simulation
  engine with 2 CPUs. Target: the largest consortium within 1.5x of the smallest, per site.
  The same at the smallest and largest size without SecAgg+ shows what secure aggregation adds.
- SecAgg+ work per site and the coordinator's per round at 10, 100 and 1,000 sites, Flower's
  own functions for the neighbourhood chosen at each size (:mod:`bench.secagg_cost`).
- Peak memory of one node running one real round of the default plan on 10,000 patients x 7
  days at 5-minute steps, in a child process (``bench.node_probe``). Target: under 1.5 GiB.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from bench import secagg_cost
from bench.cost import steady_round_seconds
from bench.report import figure
from bench.sizes import Sizes
from bench.studies import Workspace, default_plan, plan_conditions
from twinfed.models.spec import load_spec

TARGET_PER_SITE = 1.5
TARGET_MEMORY_GIB = 1.5


def run(ws: Workspace, sizes: Sizes) -> dict:
    out = rounds_per_site(ws, sizes)
    out.update(secret_sharing(sizes))
    out.update(secagg_cost.run(default_plan(load_spec("glucose"), sizes.scale_rounds),
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

    plan = default_plan(load_spec("glucose"), sizes.scale_rounds)
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
        plan = default_plan(ws.spec(cohort), sizes.scale_rounds, secure_aggregation=secagg)
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
    cohort = ws.cohort("glucose", sites=1, patients=sizes.memory_patients, days=sizes.memory_days)
    site_dir = cohort / ws.site_names(cohort)[0]
    state = ws.runs / "memory-node"
    shutil.rmtree(state, ignore_errors=True)
    ws.progress(f"  one node's round on {sizes.memory_patients} patients x {sizes.memory_days:g} days")
    round_ = _probe("round", site_dir, state, cohort / "spec.toml")
    load = _probe("load", site_dir, state, cohort / "spec.toml")
    size = sum(f.stat().st_size for f in site_dir.iterdir())
    cond = {"patients": sizes.memory_patients, "days": sizes.memory_days, "step_minutes": ws.spec(cohort).step_minutes,
            "rows": load["rows"], "export": "CSV", "export_megabytes": round(size / 1e6, 1),
            "round": "governance gate, load + validate, consent, calibrate, ledger, DP training "
                     "(default plan), audit; SecAgg+ masking of the small update not included",
            "measure": "peak resident set size of the node's own process (VmHWM), interpreter "
                       "and libraries included",
            "baseline_gib_after_imports": round(round_["baseline_gib"], 3),
            "peak_gib_loading_the_site_only": round(load["peak_gib"], 3),
            "round_seconds": round_["seconds"], "steps": round_["steps"]}
    return {"node_peak_memory": figure(round_["peak_gib"], "GiB", target=TARGET_MEMORY_GIB, conditions=cond)}
