"""PNG plots (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

from twinfed.models.spec import TwinSpec
from twinfed.models.whatif import WhatIf


def plot_whatif(res: WhatIf, spec: TwinSpec, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(spec.states)
    # Overlapping scenarios' bands stack: fainter with more scenarios, so their overlap stays pale.
    band_alpha = min(0.15, 0.3 / max(1, len(res.forecasts)))
    fig, axes = plt.subplots(n, 1, figsize=(8, 3.2 * n), squeeze=False)
    for j, col in enumerate(spec.states):
        ax = axes[j][0]
        ax.plot(res.history_minutes, res.history[:, j], color="black", label="history")
        if res.observed is not None:
            ax.plot(res.minutes, res.observed[:, j], color="black", linestyle=":", label="observed")
        for name, fc in res.forecasts.items():
            (line,) = ax.plot([0, *res.minutes], [res.history[-1, j], *fc[:, j]], marker=".", label=name)
            if res.bands is not None:
                # Pale bands in the scenario's colour, the inner one darker where they stack, from
                # the last reading (known exactly): overlapping scenarios stay readable. A band as
                # wide as the spec's range (an infinite quantile) says nothing and would squash
                # the plot: it is left out (the table and --json say so).
                last = res.history[-1, j]
                for lo, hi in reversed(list(res.bands[name].values())):
                    if (lo[:, j] <= col.min).all() and (hi[:, j] >= col.max).all():
                        continue
                    ax.fill_between([0, *res.minutes], [last, *lo[:, j]], [last, *hi[:, j]],
                                    color=line.get_color(), alpha=band_alpha, linewidth=0)
        ax.axvline(0, color="grey", linewidth=0.8)
        ax.set_ylabel(f"{col.column} ({col.unit})")
        ax.legend(fontsize=8)
    axes[-1][0].set_xlabel("minutes from now")
    levels = "" if res.bands is None else (
        " (shaded: " + " and ".join(f"{k}%" for k in next(iter(res.bands.values()))) + " prediction intervals)")
    fig.suptitle(f"{spec.name}: what-if{levels}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_trial(report: dict, path: Path, values=None) -> None:
    """An in-silico trial's outcomes, one panel per outcome. ``values`` ``[P, A, O]`` (a trial on
    one machine): each arm's distribution over patients (violins), its mean and 95% interval.
    Without them (a federated trial: only aggregates left the sites): each arm's mean and 95%
    interval, and the spread over patients as mean +- one standard deviation (DP-released)."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(report["arms"])
    outcomes = list(next(iter(report["arms"].values()))["outcomes"]) if arms else []
    fig, axes = plt.subplots(1, max(1, len(outcomes)), figsize=(3.6 * max(1, len(outcomes)), 3.8),
                             squeeze=False)
    x = list(range(len(arms)))
    for o, name in enumerate(outcomes):
        ax = axes[0][o]
        est = [report["arms"][a]["outcomes"][name] for a in arms]
        if values is not None:
            parts = ax.violinplot([values[:, a, o] for a in range(len(arms))], positions=x, widths=0.8,
                                  showextrema=False)
            for body in parts["bodies"]:
                body.set_alpha(0.35)
        else:
            lo, hi = (0.0, 100.0) if report.get("units", {}).get(name) == "% of time" else (-np.inf, np.inf)
            bottom = [max(e["mean"] - e["sd"], lo) for e in est]
            top = [min(e["mean"] + e["sd"], hi) for e in est]
            ax.bar(x, [t - b for t, b in zip(top, bottom)], bottom=bottom, width=0.6, alpha=0.25,
                   label="mean +- 1 SD over patients")
        ax.errorbar(x, [e["mean"] for e in est],
                    yerr=[[e["mean"] - e["ci95"][0] for e in est], [e["ci95"][1] - e["mean"] for e in est]],
                    fmt="o", color="black", capsize=4, label="mean, 95% interval")
        ax.set_xticks(x, arms, rotation=20, fontsize=8)
        ax.set_title(f"{name} ({report.get('units', {}).get(name, '')})", fontsize=9)
        ref = report.get("reference")
        lines = [f"{a} - {ref}: {c[name]['mean']:+.2f} [{c[name]['ci95'][0]:+.2f}, {c[name]['ci95'][1]:+.2f}]"
                 for a, c in report.get("contrasts", {}).items()]
        ax.set_xlabel("\n".join(lines), fontsize=7)
    axes[0][0].legend(fontsize=7, loc="best")
    where = "federated" if values is None else "one machine"
    fig.suptitle(f"in-silico trial {report['trial']}: {report['n_patients']} patients' twins ({where})",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
