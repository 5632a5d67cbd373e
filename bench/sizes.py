"""How big each benchmark is: the full run (``make bench``; meant for about 90 minutes on 2 busy
cores) and ``--quick`` (tiny, a smoke test of every code path).

Only the benchmark's own choices live here (worlds, cohort sizes, rounds, repetitions); the model
and its training and privacy settings are the training plan's defaults, read when the benchmark
runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Sizes:
    name: str
    # accuracy vs privacy (per twin): sites x patients x days, held-out patients, rounds
    twins: tuple[str, ...] = ("glucose", "cardio")
    # Each twin's virtual worlds, by models.cohort's simulator names, its built-in simulator
    # first: a world's twins are trained on cohorts that simulator made and scored on its
    # held-out patients. The glucose twin's second world (hovorka) is of another structure than
    # its core: the honest test.
    worlds: dict[str, tuple[str, ...]] = field(default_factory=lambda: {
        "glucose": ("bergman", "hovorka"), "cardio": ("baroreflex",)})
    sites: int = 3
    patients: dict[str, int] = field(default_factory=lambda: {"glucose": 1000, "cardio": 1000})
    days: float = 7.0
    # Each held-out patient's first 48 h identify them (models.evaluation); later windows score.
    holdout: dict[str, int] = field(default_factory=lambda: {"glucose": 300, "cardio": 150})
    rounds: int = 20
    # The curve of accuracy against epsilon: the first world of each twin only; the other worlds
    # are studied at the plan's default epsilon (the reference) alone.
    epsilons: tuple[float, ...] = (1.0, 3.0, 8.0)
    # each site alone: always at the plan's default epsilon, and at these too (plot points)
    site_alone_epsilons: tuple[float, ...] = ()
    site_alone_sites: int | None = None  # how many sites train alone (None: every site)
    # the centralised non-private twins (all sites pooled): the neural one and the hybrid one
    central_steps: int = 3000
    central_hybrid_steps: int = 1000
    central_learning_rate: float = 3e-3
    eval_stride: int = 2
    # Public pretraining (models.pretrain): a separate cohort of the twin's built-in simulator
    # (its own seed, so other patients), never of a world scored as new physiology.
    pretrain_sites: int = 3
    pretrain_patients: int = 1000
    pretrain_days: float = 7.0
    pretrain_seed: int = 1
    pretrain_steps: int = 1000
    pretrain_learning_rate: float = 3e-3
    # what-if: held-out patients and decision days (each day gives one time per meal), after the
    # evaluation's 48 h of identification
    whatif_patients: int = 40
    whatif_days: tuple[int, ...] = (2,)
    # cost: interleaved step repetitions; SecAgg+ study at 10 sites the size of the accuracy
    # study's (tiny sites, where the round is mostly overhead, are in the scale section)
    step_repeats: int = 40
    whatif_shell_runs: int = 3
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
    # SecAgg+ work per site and the coordinator's per round, Flower's functions at these sizes
    secagg_cost_sites: tuple[int, ...] = (10, 100, 1000)
    memory_patients: int = 10_000
    memory_days: float = 7.0
    # deployed vs simulated: the same tiny 3-site study on both engines
    deployed_patients: int = 30
    deployed_days: float = 2.0
    deployed_rounds: int = 5
    # one node's memory against its size (patients, each memory_days long): the curve that shows
    # growth linear in rows. Sizes above memory_patients are that cohort tiled (bench.tile_site),
    # so they must be multiples of it.
    memory_curve_patients: tuple[int, ...] = (1_000, 10_000, 50_000)
    # audit
    audit_entries: int = 100_000
    # in-silico trial (issue 15): the "real" trial's patients, the held-out patients of a cohort
    # of their own (every population mixed, as the training sites together), and that cohort's
    # seed (other patients than the worlds' seed 0 and the pretraining's)
    trial_real_patients: int = 400
    trial_real_seed: int = 15
    # the trial's validation (issue 21, bench.trial_validation): per world, a pool of fresh
    # patients (held-out patients of a cohort of their own seed), from which each repetition
    # draws a small trial's cohort; every effect's trial runs that long, with that many draws.
    # The twins of the pool dominate its time: measured at these sizes (on --quick-trained twins,
    # one torch thread, 2 cores at load about 4), 95 / 106 / 313 s for the bergman / hovorka /
    # baroreflex pools (0.06-0.07 s per patient for the glucose twin's 7 arms, 0.21 s for the
    # cardio twin's 5, over 2 days with 8 draws), the truth's replays 8-10 s, the 200
    # repetitions 1-3 s: 562 s for the section after the twins are trained. 200 patients per
    # trial keep the release's noise on a mean contrast at 6.9 mg/dL or points (2.3 mmHg).
    validation_repeats: int = 200
    validation_patients: int = 200
    validation_pool: int = 1500
    validation_days: float = 2.0
    validation_draws: int = 8
    validation_seed: int = 21

    def conditions(self) -> dict:
        return asdict(self)


FULL = Sizes("full")

# Every world, regime and figure of the full run, at sizes that only exercise the code: three
# days, so that the evaluation has windows after its 48 h of identification.
QUICK = Sizes(
    "quick",
    patients={"glucose": 40, "cardio": 40}, days=3.0, holdout={"glucose": 12, "cardio": 12}, rounds=2,
    epsilons=(3.0,), site_alone_sites=1, central_steps=40, central_hybrid_steps=20, eval_stride=8,
    pretrain_sites=1, pretrain_patients=20, pretrain_days=1.0, pretrain_steps=20,
    whatif_patients=4, step_repeats=5, secagg_sites=3, secagg_patients=20, secagg_days=1.0,
    secagg_rounds=2, scale_sites=(3, 4), scale_patients=10, scale_days=1.0, scale_rounds=2,
    scale_without_secagg=False, secagg_cost_sites=(3, 10),
    memory_patients=200, memory_days=1.0, memory_curve_patients=(100, 200, 400), deployed_patients=10,
    deployed_rounds=2, audit_entries=5_000, trial_real_patients=40,
    validation_repeats=5, validation_patients=24, validation_pool=40, validation_days=1.0,
    validation_draws=2,
)
