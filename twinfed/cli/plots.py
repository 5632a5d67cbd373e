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
    fig, axes = plt.subplots(n, 1, figsize=(8, 3.2 * n), squeeze=False)
    for j, col in enumerate(spec.states):
        ax = axes[j][0]
        ax.plot(res.history_minutes, res.history[:, j], color="black", label="history")
        if res.observed is not None:
            ax.plot(res.minutes, res.observed[:, j], color="black", linestyle=":", label="observed")
        for name, fc in res.forecasts.items():
            ax.plot([0, *res.minutes], [res.history[-1, j], *fc[:, j]], marker=".", label=name)
        ax.axvline(0, color="grey", linewidth=0.8)
        ax.set_ylabel(f"{col.column} ({col.unit})")
        ax.legend(fontsize=8)
    axes[-1][0].set_xlabel("minutes from now")
    fig.suptitle(f"{spec.name}: what-if")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
