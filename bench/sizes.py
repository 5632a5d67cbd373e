"""How big each benchmark is: the full run (``make bench``; meant for ~25 minutes on 2 cores,
37 minutes on 2026-11-25, most of the excess in the privacy ledger's per-round accounting, see
bench/RESULTS.md) and ``--quick`` (tiny, a smoke test of every code path in ~4 minutes).

Only the benchmark's own choices live here (cohort sizes, rounds, repetitions); the model and its
training and privacy settings are the training plan's defaults, read when the benchmark runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Sizes:
    name: str
    # accuracy vs privacy (per twin): sites x patients x days, held-out patients, rounds
    twins: tuple[str, ...] = ("glucose", "cardio")
    sites: int = 3
    patients: dict[str, int] = field(default_factory=lambda: {"glucose": 1000, "cardio": 600})
    days: float = 7.0
    holdout: dict[str, int] = field(default_factory=lambda: {"glucose": 300, "cardio": 150})
    rounds: int = 20
    epsilons: tuple[float, ...] = (1.0, 3.0, 8.0)
    # each site alone: always at the plan's default epsilon, and at these too (plot points)
    site_alone_epsilons: tuple[float, ...] = ()
    site_alone_sites: int | None = None  # how many sites train alone (None: every site)
    central_steps: int = 3000
    central_learning_rate: float = 3e-3
    eval_stride: int = 2
    # what-if: held-out patients and decision days (each day gives one time per meal)
    whatif_patients: int = 60
    whatif_days: tuple[int, ...] = (1, 2)
    # cost: interleaved step repetitions; SecAgg+ study at 10 sites the size of the accuracy
    # study's (tiny sites, where the round is mostly overhead, are in the scale section)
    step_repeats: int = 40
    secagg_sites: int = 10
    secagg_patients: int = 1000
    secagg_days: float = 7.0
    secagg_rounds: int = 5
    # scale: simulated sites (tiny cohorts), rounds; one node's memory at 10,000 patients
    scale_sites: tuple[int, ...] = (10, 30, 100)
    scale_patients: int = 20
    scale_days: float = 1.0
    scale_rounds: int = 2
    scale_without_secagg: bool = True  # also at the smallest and largest size, for comparison
    memory_patients: int = 10_000
    memory_days: float = 7.0
    # audit
    audit_entries: int = 100_000

    def conditions(self) -> dict:
        return asdict(self)


FULL = Sizes("full")

QUICK = Sizes(
    "quick",
    patients={"glucose": 40, "cardio": 40}, days=1.0, holdout={"glucose": 12, "cardio": 12}, rounds=2, epsilons=(3.0,),
    site_alone_sites=1, central_steps=40, eval_stride=8, whatif_patients=4,
    whatif_days=(0,), step_repeats=5, secagg_sites=3, secagg_patients=20, secagg_days=1.0,
    secagg_rounds=2, scale_sites=(3, 4), scale_patients=10, scale_days=1.0, scale_rounds=2,
    scale_without_secagg=False,
    memory_patients=200, memory_days=1.0, audit_entries=5_000,
)
