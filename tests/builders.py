"""Small builders for tests: site directories in the data contract's layout, a node and the
rounds it is sent, its ledger, trial designs and cohorts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from twinfed.models.spec import TwinSpec, load_spec
from twinfed.privacy.secagg import SecAggView
from twinfed.wire import LogHead, RoundInstruction


def write_site(site_dir: Path, spec: TwinSpec | None = None, *, n_patients: int = 5, n_steps: int = 60,
               seed: int = 0, consent: str | None = "granted") -> Path:
    """A site of ``n_patients`` with smooth in-range series; every patient gets ``consent``."""
    spec = spec or load_spec("glucose")
    rng = np.random.default_rng(seed)
    site_dir.mkdir(parents=True, exist_ok=True)
    lines = ["patient_id,time_min," + ",".join(spec.timeseries_columns)]
    for p in range(n_patients):
        # Mean-reverting states pushed by the controls: learnable, unlike a random walk.
        ctrl = np.array([[rng.choice([0.0, 0.0, 0.0, c.max / 20]) for c in spec.controls]
                         for _ in range(n_steps)]).reshape(n_steps, len(spec.controls))
        x = np.array([(c.min + c.max) / 2 for c in spec.states], float)
        rows = []
        for t in range(n_steps):
            rows.append([float(np.clip(v, c.min, c.max)) for v, c in zip(x, spec.states)] + list(ctrl[t]))
            mid = np.array([(c.min + c.max) / 2 for c in spec.states])
            span = np.array([c.max - c.min for c in spec.states])
            push = (ctrl[t].sum() if len(spec.controls) else 0.0) * span * 0.002
            x = x + 0.1 * (mid - x) + push + rng.normal(0, span / 2000)
        for t, vals in enumerate(rows):
            lines.append(f"p{p},{t * spec.step_minutes}," + ",".join(f"{v:.3f}" for v in vals))
    (site_dir / "timeseries.csv").write_text("\n".join(lines) + "\n")
    plines = ["patient_id," + ",".join(spec.covariate_columns)]
    for p in range(n_patients):
        plines.append(f"p{p}," + ",".join(f"{(c.min + c.max) / 3:.1f}" for c in spec.covariates))
    (site_dir / "patients.csv").write_text("\n".join(plines) + "\n")
    if consent is not None:
        clines = ["patient_id,status,purpose,recorded_at"]
        clines += [f"p{p},{consent},{spec.purpose},2026-01-01T00:00:00Z" for p in range(n_patients)]
        (site_dir / "consent.csv").write_text("\n".join(clines) + "\n")
    return site_dir


def edit_csv(path: Path, row: int, column: str, value: str) -> None:
    """Set data row ``row`` (1-based, header excluded) of ``column`` to ``value``."""
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    cells = lines[row].split(",")
    cells[header.index(column)] = value
    lines[row] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")


def own_entries(state_dir: Path) -> list:
    """A state's audit entries, verified against its own key."""
    from twinfed.governance.layout import verified_entries

    return verified_entries(state_dir)


def simulate_from_cli(root: Path, *, patients: int, seed: int, holdout: int, flags: list[str]) -> None:
    """A three-site glucose cohort in ``root/cohort`` and a study on it, ``twinfed simulate
    ... --out root/run``, through the CLI's entry point."""
    from twinfed.cli.main import main
    from twinfed.models.cohort import generate_cohort

    generate_cohort("glucose", sites=3, patients=patients, days=2.5, seed=seed, out=root / "cohort",
                    holdout=holdout)
    sites = [a for n in ("site-a", "site-b", "site-c") for a in ("--site", f"{n}={root / 'cohort' / n}")]
    assert main(["simulate", "--spec", str(root / "cohort" / "spec.toml"), *sites, *flags,
                 "--out", str(root / "run")]) == 0


# -- a node and the rounds it is sent ------------------------------------------------------------

# The coordinator's log head a round instruction names, and a masked round of three sites any two
# of which unmask.
COORD = LogHead(seq=4, hash="ab" * 32)
MASKED = SecAggView(masked=True, sampled=3, shares=3, threshold=2)


def small_plan(rounds: int = 2, **privacy):
    """A glucose study small enough for a 5-patient site: an 8-wide surrogate trained two local
    steps of 4 patients a round; ``privacy`` are the plan's PrivacyConfig fields."""
    from twinfed.models.plan import ModelConfig, PrivacyConfig, TrainingConfig, TrainingPlan

    return TrainingPlan(spec=load_spec("glucose"), rounds=rounds, model=ModelConfig(hidden=8),
                        training=TrainingConfig(local_steps=2, batch_size=4),
                        privacy=PrivacyConfig(**privacy))


def new_node(root: Path, *, name: str = "a", simulated: bool = False, n_patients: int = 5,
             budget: tuple[float, float] | None = None):
    """A node named ``name`` over a fresh site of ``n_patients`` in ``root/site``, its state
    initialised in ``root/state``; ``budget``: the (epsilon, delta) its ledger is opened at, as if
    an earlier plan had set it (None: no ledger yet)."""
    from twinfed.client.node import NodeConfig
    from twinfed.governance.node_state import init_node

    site = write_site(root / "site", n_patients=n_patients, n_steps=60)
    init_node(root / "state", site_name=name, site_data=site)
    if budget is not None:
        open_ledger(root / "state", epsilon=budget[0], delta=budget[1])
    return NodeConfig(site_name=name, site_data=site, state_dir=root / "state", simulated=simulated)


def round_config(plan, *, server_round: int = 1, anchor=None) -> dict:
    """The config of the instruction the coordinator sends for round ``server_round`` of ``plan``;
    ``anchor``: the head of the node's log it last anchored (None: it sends none)."""
    extra = {} if anchor is None else {"node_anchor": anchor}
    return RoundInstruction(plan_json=plan.canonical_json(), plan_sha256=plan.sha256(), round=server_round,
                            coordinator=COORD, **extra).to_config()


def start_weights(plan) -> list:
    """The weights a round is sent: the plan's surrogate at its seed."""
    from twinfed.models.surrogate import build_surrogate, get_weights

    return get_weights(build_surrogate(plan.spec, plan.model, seed=plan.seed))


def refusal_code(result) -> str | None:
    """The code of a served round's refusal (None: it was not refused)."""
    return result.reply.refusal.code.value if result.reply.refusal else None


def audit_events(node) -> list[dict]:
    """A node's audit log as it stands on disk, one dict an entry (not verified)."""
    from twinfed.governance.layout import state_paths

    return [json.loads(x) for x in state_paths(node.state_dir).audit.read_text().splitlines()]


def open_ledger(root: Path, *, epsilon: float = 3.0, delta: float = 1e-5):
    """A site's privacy ledger opened as a plan of (``epsilon``, ``delta``) opens it: the first sets
    the budget. A ``root`` that does not exist yet becomes a node's state (site "a") first."""
    from twinfed.governance.layout import open_audit
    from twinfed.governance.node_state import init_node
    from twinfed.privacy.ledger import PrivacyLedger

    if not root.exists():
        init_node(root, site_name="a")
    return PrivacyLedger.open(root, open_audit(root), own_entries(root), epsilon_budget=epsilon,
                              delta_budget=delta)


# -- trials ---------------------------------------------------------------------------------------

def _toml(value) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)


def trial_toml(name: str, arms: dict, **trial) -> str:
    """A trial's arms file: ``[trial]`` with ``name``, purpose in-silico-trial, reference
    usual-care and then ``trial``'s keys in their order, and an ``[[trial.arms]]`` for each of
    ``arms`` (an arm's name: its scenario, or a dict of its keys, e.g. ``{"rule": {...}}``)."""
    head = {"name": name, "purpose": "in-silico-trial", "reference": "usual-care", **trial}
    text = "[trial]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in head.items())
    for arm, keys in arms.items():
        keys = {"scenario": keys} if isinstance(keys, str) else keys
        text += f'\n[[trial.arms]]\nname = "{arm}"\n' + "".join(f"{k} = {_toml(v)}\n" for k, v in keys.items())
    return text


def trial_design(name: str, arms: dict, spec: TwinSpec | None = None, **trial):
    """``trial_toml``'s design, parsed against ``spec`` (glucose unless given)."""
    from twinfed.models.arms import parse_design

    return parse_design(trial_toml(name, arms, **trial), spec or load_spec("glucose"), source="arms.toml")


def trial_plan(delta: float, *, epsilon: float = 0.5):
    """A node's trial of a recorded and a half-insulin arm for a one-round glucose twin (weights
    never read: a plan for the gate's checks and charge), asking (``epsilon``, ``delta``)."""
    from twinfed.models.plan import TrainingPlan
    from twinfed.models.trial_plan import TrialPlan, TrialPrivacy, TrialTwin

    spec = load_spec("glucose")
    design = trial_design("t", {"usual-care": "recorded", "b": "insulin_u*0.5"}, spec, start_hours=36,
                          duration_days=1, outcomes=["mean_glucose", "time_in_range"], draws=4, seed=7)
    return TrialPlan(design=design, twin=TrialTwin(training_plan_json=TrainingPlan(spec=spec, rounds=1)
                                                   .canonical_json(), weights_sha256="0" * 64),
                     privacy=TrialPrivacy(epsilon=epsilon, delta=delta))


def charge_trial(node, plan, *, audit=None):
    """The node's charge of ``plan`` (a trial) as its session makes it, under no lock (the caller
    is alone): ``(noise multiplier, DPAggregate)``; raises what refuses it."""
    from twinfed.client.gate import charge, own_entries
    from twinfed.client.kinds.trial import Trial
    from twinfed.governance.layout import open_audit
    from twinfed.wire import TrialInstruction

    release = Trial(node, plan, TrialInstruction(plan_json=plan.canonical_json(), plan_sha256=plan.sha256()), [])
    charge(release, audit or open_audit(node.state_dir), own_entries(node))
    return release.z, release.aggregate


def one_site_cohort(out: Path, *, patients: int, days: float, seed: int, twin: str = "glucose"):
    """A virtual cohort of one site (``out/site-a``) from ``twin``'s simulator, loaded."""
    from twinfed.models.cohort import generate_cohort
    from twinfed.models.site_data import load_site

    generate_cohort(twin, sites=1, patients=patients, days=days, seed=seed, out=out)
    return load_site(out / "site-a", load_spec(twin))


# A one-day trial of two arms (usual care, a meal-bolus rule) and two outcomes, two draws: the
# smallest trial that exercises a rule, a contrast and propagated uncertainty.
TINY_ARMS = trial_toml("tiny-carb-ratio", {
    "usual-care": "recorded",
    "ratio-10": {"rule": {"kind": "meal-bolus", "insulin": "insulin_u", "carbs": "carbs_g",
                          "grams_per_unit": 10.0, "basal_u_per_h": "recorded"}},
}, start_hours=48, duration_days=1, outcomes=["time_in_range", "mean_glucose"], draws=2, seed=0)
