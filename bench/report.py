"""The benchmark's output: figures with their targets, the JSON file, the table and the plots.

A *figure* is one measured number: ``{"value", "unit", "conditions"}`` and, when DESIGN.md
section 6 (or the issue that set it) has a goal for it, ``"target"``, ``"target_bound"`` and
``"meets_target"``. Most targets are upper bounds (a ratio "within 1.15x", "1.5x or less", "under
5 s": ``target_bound`` ``"upper"``, met when ``value <= target``); agreement with the truth is a
lower bound ("95% or more": ``"lower"``, met when ``value >= target``); a coverage is a range
("93-97%": ``"range"``, ``target`` is ``[lo, hi]``, met when ``lo <= value <= hi``). Results
written before targets had a bound are read as upper bounds. The results file groups figures by section, each
section a flat mapping from a dotted figure name to a figure, beside ``"run"`` (the machine, the
commit, the sizes).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

SECTIONS = ("accuracy", "whatif", "trial", "trial_validation", "cost", "scale", "deployed", "capacity", "audit",
            "soak")


def figure(value: float, unit: str, *, conditions: dict | None = None,
           target: float | None = None, at_least: bool = False,
           target_range: tuple[float, float] | None = None) -> dict:
    """One measured figure; ``target`` is an upper bound (the value must not exceed it), or with
    ``at_least`` a lower bound (the value must reach it); ``target_range`` ``(lo, hi)`` instead:
    the value must lie within it, both ends included."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"a figure's value must be a number, not {type(value).__name__}")
    if target_range is not None and (target is not None or at_least):
        raise ValueError("a figure has either a target (with at_least) or a target_range, not both")
    fig: dict = {"value": float(value), "unit": unit}
    # NaN (a measurement that failed) never meets a target: every comparison with it is false.
    if target is not None:
        fig["target"] = float(target)
        fig["target_bound"] = "lower" if at_least else "upper"
        fig["meets_target"] = bool(math.isfinite(value) and (value >= target if at_least else value <= target))
    if target_range is not None:
        lo, hi = (float(v) for v in target_range)
        if not lo <= hi:
            raise ValueError(f"a target range is (lo, hi) with lo <= hi, not ({lo:g}, {hi:g})")
        fig["target"] = [lo, hi]
        fig["target_bound"] = "range"
        fig["meets_target"] = bool(math.isfinite(value) and lo <= value <= hi)
    fig["conditions"] = dict(conditions or {})
    return fig


def target_text(fig: dict, suffix: str = "") -> str:
    """``<= 1.15x``, ``>= 0.95`` or ``93-97%``: the target with its direction (a range of
    fractions in percent)."""
    if fig.get("target_bound") == "range":
        lo, hi = fig["target"]
        if fig["unit"] == "fraction":
            return f"{100 * lo:g}-{100 * hi:g}%"
        return f"{format_value(lo)}-{format_value(hi)}{suffix}"
    sign = ">=" if fig.get("target_bound") == "lower" else "<="
    return f"{sign} {format_value(fig['target'])}{suffix}"


def is_figure(obj: object) -> bool:
    return isinstance(obj, dict) and "value" in obj and "unit" in obj


def figures(results: dict) -> Iterator[tuple[str, str, dict]]:
    """``(section, name, figure)`` for every figure, sections in the benchmark's order."""
    for section in (*SECTIONS, *sorted(set(results) - set(SECTIONS))):
        group = results.get(section)
        if not isinstance(group, dict):
            continue
        for name, fig in group.items():
            if is_figure(fig):
                yield section, name, fig


def missed(results: dict) -> list[tuple[str, str, dict]]:
    return [(s, n, f) for s, n, f in figures(results) if f.get("meets_target") is False]


def format_value(value: float) -> str:
    if not math.isfinite(value):
        return "n/a"
    a = abs(value)
    if a == 0:
        return "0"
    if a < 1:
        return f"{value:.3g}"
    if a < 100:
        return f"{value:.2f}"
    if a < 10_000:
        return f"{value:.1f}"
    return f"{value:.0f}"


def format_table(results: dict, *, only_targets: bool = False) -> str:
    """One line per figure: section, name, value and unit, target, and whether it is met."""
    rows = []
    for section, name, fig in figures(results):
        if only_targets and "target" not in fig:
            continue
        target = target_text(fig) if "target" in fig else ""
        verdict = "" if "target" not in fig else ("ok" if fig["meets_target"] else "MISSED")
        rows.append([section, name, format_value(fig["value"]), fig["unit"], target, verdict])
    headers = ["section", "figure", "value", "unit", "target", "meets"]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    right = {2, 4}

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def markdown_table(results: dict) -> str:
    """The figures that have a target, as a Markdown table (for the README's Results)."""
    lines = ["| section | figure | value | target | met |", "| --- | --- | ---: | ---: | :---: |"]
    for section, name, fig in figures(results):
        if "target" in fig:
            suffix = "x" if fig["unit"] == "x" else f" {fig['unit']}"
            lines.append(f"| {section} | `{name}` | {format_value(fig['value'])}{suffix} | "
                         f"{target_text(fig, suffix)} | {'yes' if fig['meets_target'] else '**no**'} |")
    return "\n".join(lines)


def merge(previous: dict, fresh: dict) -> dict:
    """``fresh`` sections replace ``previous`` ones (an ``--only`` run updates its sections)."""
    out = {k: v for k, v in previous.items() if k != "run"}
    runs = dict(previous.get("run", {}).get("sections", {}))
    out.update({k: v for k, v in fresh.items() if k != "run"})
    runs.update(fresh.get("run", {}).get("sections", {}))
    out["run"] = {**fresh.get("run", {}), "sections": runs}
    return out


def write_json(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False,
                                     encoding="utf-8") as fh:
        json.dump(results, fh, indent=2, sort_keys=False, allow_nan=True)
        fh.write("\n")
    os.replace(fh.name, path)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


# -- plots ---------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(curves: dict[str, dict], path: Path) -> None:
    """RMSE against epsilon, one panel per twin, world and state.

    ``curves[label] = {"unit", "epsilons", "federated_dp", "federated_nodp", "central",
    "site_alone": {site: [rmse per epsilon or None]}, "persistence"}`` and optionally
    ``"linear_arx"`` (a line) and ``"federated_dp_pretrained"`` (a point at
    ``"reference_epsilon"``).
    """
    plt = _pyplot()
    from matplotlib.ticker import NullLocator

    n = len(curves)
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.0), squeeze=False)
    for ax, (label, c) in zip(axes[0], curves.items()):
        eps = c["epsilons"]
        ax.plot(eps, c["federated_dp"], marker="o", color="C0", label="federated, DP")
        ax.axhline(c["federated_nodp"], color="C0", linestyle="--", label="federated, no DP")
        ax.axhline(c["central"], color="black", linestyle="-.", label="centralised, no DP")
        if c.get("persistence") is not None:
            ax.axhline(c["persistence"], color="grey", linestyle=":", label="persistence")
        if c.get("linear_arx") is not None:
            ax.axhline(c["linear_arx"], color="C2", linestyle=":", label="linear ARX, pooled, no DP")
        if c.get("federated_dp_pretrained") is not None:
            ax.plot([c["reference_epsilon"]], [c["federated_dp_pretrained"]], linestyle="none", marker="*",
                    markersize=11, color="C1", label="federated, DP, pretrained")
        markers = "s^vD"
        for i, (site, vals) in enumerate(sorted(c["site_alone"].items())):
            pts = [(e, v) for e, v in zip(eps, vals) if v is not None]
            if pts:
                ax.plot(*zip(*pts), linestyle="none", marker=markers[i % len(markers)],
                        color="C3", alpha=0.75, label=f"{site} alone, DP" if i < 4 else None)
        ax.set_xscale("log")
        ax.set_xticks(eps)
        ax.set_xticklabels([f"{e:g}" for e in eps])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlim(min(eps) / 1.5, max(eps) * 1.5)
        ax.set_xlabel("epsilon per site (delta <= 1e-5)")
        ax.set_ylabel(f"RMSE at +60 min ({c['unit']})")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Twin accuracy vs privacy budget (held-out patients; hybrid twins personalised)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_whatif_case(case: dict, path: Path) -> None:
    """One patient's what-if: history, then each scenario's twin forecast (solid) beside the
    simulator's truth for the same treatment (dashed), same colour."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(case["history_minutes"], case["history"], color="black", label="history (CGM)")
    for i, (name, sc) in enumerate(case["scenarios"].items()):
        color = f"C{i}"
        ax.plot([0, *case["minutes"]], [case["history"][-1], *sc["twin"]], color=color,
                marker=".", label=f"{name}: twin")
        ax.plot(case["minutes"], sc["truth"], color=color, linestyle="--", label=f"{name}: truth")
    lo, hi = case.get("band", (None, None))
    if lo is not None:
        ax.axhspan(lo, hi, color="green", alpha=0.06, label="target range")
    ax.axvline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("minutes from the decision")
    ax.set_ylabel(f"{case['state']} ({case['unit']})")
    ax.set_title(case["title"])
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_trial_contrasts(world: dict, path: Path) -> None:
    """One in-silico trial checked against the truth: per outcome, the contrast (arm minus the
    reference) of the "real" parallel-group trial and of the twins' federated trial, each with
    its 95% interval, and the paired truth of each trial's patients as markers.

    ``world = {"title", "contrast", "real_label", "twins_label", "outcomes": [{"name", "unit",
    "real": [mean, lo, hi], "twins": [mean, lo, hi], "paired_real", "paired_twins"}]}``.
    """
    plt = _pyplot()
    outcomes = world["outcomes"]
    fig, axes = plt.subplots(1, len(outcomes), figsize=(max(4.2 * len(outcomes), 10.0), 3.4), squeeze=False)
    rows = [("real", world["real_label"], "C3", "paired_real"), ("twins", world["twins_label"], "C0", "paired_twins")]
    for ax, o in zip(axes[0], outcomes):
        for y, (key, label, color, paired) in enumerate(rows):
            m, lo, hi = o[key]
            ax.errorbar([m], [y], xerr=[[m - lo], [hi - m]], fmt="o", color=color, capsize=4,
                        label=f"{label}, 95% CI")
            ax.plot([o[paired]], [y], linestyle="none", marker="x", markersize=9, color="black",
                    label="paired truth of these patients" if y == 0 else None)
        ax.axvline(0, color="grey", linewidth=0.8)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(["real trial", "twins"])
        ax.set_ylim(-0.7, len(rows) - 0.3)
        ax.set_xlabel(f"{world['contrast']} ({o['unit']})")
        ax.set_title(o["name"])
        ax.grid(alpha=0.3, axis="x")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7)
    fig.suptitle(world["title"], fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
