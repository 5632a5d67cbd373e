"""Section 8: capacity planning. Time per round and per study of a deployed consortium, against
patients per site (1k, 10k) and sites (3, 10, 100): a table and a plot.

A model built only from parts this run measured (so run after ``scale`` and ``deployed``; it
reads their figures from the results file), for a consortium whose hospitals each run their node
on a machine like this one, in parallel:

    round(sites, patients) = one node's round at that size          (scale: node_probe, a real
                                                                     round of the default plan)
                           + the deployed overhead per round         (deployed: 3 sites, loopback)
                           + the coordinator's SecAgg+ unmasking     (scale: secagg_cost, at the
                                                                     neighbourhood for that many
                                                                     sites; 3 sites use 10's)
    study = rounds x round

Not modelled: the network between hospitals and the coordinator (loopback here), a node slower
than the others (the round waits for the slowest), and the per-message messaging cost growing
with the number of sites at one SuperLink (the scale section's simulated rounds show it).
"""

from __future__ import annotations

from bench.report import figure, read_json
from bench.sizes import Sizes
from bench.studies import Workspace

PATIENTS = (1_000, 10_000)
SITES = (3, 10, 100)


class MissingFigure(RuntimeError):
    pass


def _need(results: dict, section: str, name: str) -> dict:
    fig = results.get(section, {}).get(name)
    if not fig:
        raise MissingFigure(f"capacity needs {section}/{name}: run the {section} section first "
                            f"(python -m bench --only {section} --only capacity)")
    return fig


def run(ws: Workspace, sizes: Sizes) -> dict:
    results = read_json(ws.results / "latest.json")
    node_round = {}
    for p in PATIENTS:
        n = p if sizes.name == "full" else min(sizes.memory_curve_patients, key=lambda m: abs(m - p))
        fig = _need(results, "scale", f"node_peak_memory.round.{n}_patients")
        node_round[p] = float(fig["conditions"]["seconds"])
    overhead = max(0.0, _need(results, "deployed", "deployed.round_overhead_seconds")["value"])
    measured_sites = sorted(sizes.secagg_cost_sites)
    unmask = {}
    for s in SITES:
        at = next((m for m in measured_sites if m >= s), measured_sites[-1])
        unmask[s] = _need(results, "scale", f"secagg_coordinator_cpu_seconds_per_round.{at}_sites")["value"]
    rounds = sizes.rounds
    table = {}
    out = {}
    for p in PATIENTS:
        for s in SITES:
            r = node_round[p] + overhead + unmask[s]
            table[f"{p}x{s}"] = {"round_seconds": round(r, 2), "study_seconds": round(r * rounds, 1)}
            cond = {"patients_per_site": p, "sites": s, "rounds_per_study": rounds,
                    "node_round_seconds": node_round[p], "deployed_overhead_seconds": overhead,
                    "coordinator_unmask_seconds": unmask[s],
                    "model": "node round + deployed overhead + coordinator SecAgg+ unmasking; "
                             "hospitals in parallel, each on a machine like this one"}
            out[f"capacity.round_seconds.{p}_patients.{s}_sites"] = figure(r, "s", conditions=cond)
            out[f"capacity.study_minutes.{p}_patients.{s}_sites"] = figure(r * rounds / 60, "min",
                                                                           conditions=cond)
    plot = ws.results / "capacity.png"
    plot_capacity(table, rounds, plot)
    ws.progress(f"  plot: {plot}")
    return out


def plot_capacity(table: dict, rounds: int, path) -> None:
    from bench.report import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for p in PATIENTS:
        ys = [table[f"{p}x{s}"]["round_seconds"] for s in SITES]
        ax.plot(SITES, ys, marker="o", label=f"{p:,} patients per site")
    ax.set_xscale("log")
    ax.set_xticks(SITES, [str(s) for s in SITES])
    ax.set_xlabel("sites")
    ax.set_ylabel("seconds per round (deployed, modelled)")
    ax.set_title(f"Time per round; a study of {rounds} rounds takes {rounds}x")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
