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
