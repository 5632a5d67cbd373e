"""Federated in-silico trials and a study's calibration stage on the real Flower simulation engine
(real Opacus accounting, real SecAgg+, real node states): what a trial charges each node, what
leaves a node, the refusals (no approval, other weights, no budget), and the calibration round.

One tiny study (3 sites x 25 patients x 3 days, 1 round, calibrated as `twinfed simulate` does)
is shared by the module; its node states are copied where a test must not change them.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from builders import TINY_ARMS
from twinfed.cli.main import main
from twinfed.errors import TwinfedError
from twinfed.models.surrogate import get_weights
from twinfed.models.trial import layout, sensitivity
from twinfed.models.trial_plan import TrialPlan
from twinfed.models.twin import Twin
from twinfed.simulate import SiteRef, run_simulated_trial
from twinfed.wire import RELEASE, REPLY_KEY, NodeReply, RefusalCode

pytestmark = [pytest.mark.slow, pytest.mark.studies]

SITES = ("a", "b", "c")
EPSILON = 8.0  # the trial's spend per site: enough noise to widen every interval, little enough to
# keep the noisy count far from zero (its std is about 4 patients of 75)
ARMS = TINY_ARMS


def _quiet(_msg: str) -> None:
    pass


def _events(state_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (state_dir / "audit.jsonl").read_text().splitlines() if line.strip()]


def _ledger(state_dir: Path) -> dict:
    return json.loads((state_dir / "privacy_ledger.json").read_text())


def _rdp_epsilon(segments: list[dict], delta: float) -> float:
    """The site's epsilon by an accountant of our own, one history entry per segment."""
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(s["noise_multiplier"], s["sample_rate"], s["steps"]) for s in segments]
    return float(acc.get_epsilon(delta=delta))


def _site_args(cohort: Path) -> list[str]:
    return [a for n in SITES for a in ("--site", f"{n}={cohort / f'site-{n}'}")]


def _site_refs(cohort: Path) -> list[SiteRef]:
    return [SiteRef(n, cohort / f"site-{n}") for n in SITES]


def _consented(site_dir: Path, purpose: str) -> list[str]:
    from twinfed.governance.consent import granted, site_consent

    return sorted(granted(site_consent(site_dir), purpose))


# -- the shared study, the trial plan and the two trials ------------------------------------

@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    from twinfed.models.cohort import generate_cohort

    out = tmp_path_factory.mktemp("trial-cohort") / "cohort"
    generate_cohort("glucose", sites=3, patients=25, days=3, seed=1, out=out)
    return out


@pytest.fixture(scope="module")
def arms(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("arms") / "arms.toml"
    path.write_text(ARMS)
    return path


@pytest.fixture(scope="module")
def study(cohort, tmp_path_factory) -> Path:
    """`twinfed simulate`, calibrated by default: 1 round, then the calibration round."""
    run = tmp_path_factory.mktemp("trial-study") / "run"
    assert main(["simulate", "--spec", str(cohort / "spec.toml"), *_site_args(cohort), "--rounds", "1",
                 "--hidden", "8", "--local-steps", "5", "--out", str(run)]) == 0
    return run


@pytest.fixture(scope="module")
def plan(study, cohort, arms, tmp_path_factory) -> TrialPlan:
    """The trial plan exactly as `twinfed trial --site ... --write-plan` makes it for the officers."""
    path = tmp_path_factory.mktemp("trial-plan") / "plan.json"
    assert main(["trial", "--model", str(study), "--arms", str(arms), *_site_args(cohort),
                 "--epsilon", str(EPSILON), "--write-plan", str(path)]) == 0
    return TrialPlan.model_validate_json(path.read_text())


@pytest.fixture(scope="module")
def weights(study) -> list[np.ndarray]:
    return get_weights(Twin.load(study).surrogate)


class ReplyProbe:
    """An outer mod: writes down every record of every reply as it leaves the node (byte arrays,
    the masked vectors, only as their kind)."""

    def __init__(self, out: Path):
        self.out = out

    def __call__(self, msg, ctxt, call_next):
        reply = call_next(msg, ctxt)
        pid = int(ctxt.node_config["partition-id"])
        seen: dict = {}
        if reply.has_content():
            for kind in ("config_records", "metric_records"):
                for name, record in getattr(reply.content, kind).items():
                    seen[f"{kind}/{name}"] = {k: _plain(v) for k, v in record.items()}
            for name, record in reply.content.array_records.items():
                seen[f"array_records/{name}"] = sorted(record.keys())
        n = len(list(self.out.glob(f"reply-{pid}-*.json")))
        (self.out / f"reply-{pid}-{n}.json").write_text(json.dumps(seen))
        return reply


def _plain(value):
    if isinstance(value, bytes):
        return "<bytes>"
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


@pytest.fixture(scope="module")
def federated(plan, weights, cohort, tmp_path_factory):
    """The trial on fresh node states (each node's budget: the trial's epsilon), every reply
    captured as it leaves its node."""
    root = tmp_path_factory.mktemp("trial-federated")
    probes = root / "probes"
    probes.mkdir()
    out = root / "trial"
    report = run_simulated_trial(plan, weights, _site_refs(cohort), out, progress=_quiet,
                                 outer_mods=[ReplyProbe(probes)])
    return SimpleNamespace(out=out, report=report, probes=probes)


@pytest.fixture(scope="module")
def exact(study, cohort, arms, tmp_path_factory) -> dict:
    """The same trial on one machine (`--data` on the same three directories): exact sums."""
    out = tmp_path_factory.mktemp("trial-exact") / "trial"
    data = [a for n in SITES for a in ("--data", str(cohort / f"site-{n}"))]
    assert main(["trial", "--model", str(study), "--arms", str(arms), *data, "--out", str(out), "--json"]) == 0
    return json.loads((out / "trial.json").read_text())


# -- 1. the DP release and its charge ---------------------------------------------------------

def test_each_node_is_charged_one_gaussian_release_of_the_plans_epsilon_before_it_releases(federated, plan):
    assert federated.report["sites_released"] == 3
    for site in SITES:
        state = federated.out / "nodes" / site
        segments = _ledger(state)["segments"]
        mine = [s for s in segments if s["plan_sha256"] == plan.sha256()]
        assert len(mine) == 1 == len(segments)  # a fresh node: the trial is all it ever spent
        assert (mine[0]["mechanism"], mine[0]["sample_rate"], mine[0]["steps"], mine[0]["round"]) == \
            ("gaussian-sum", 1.0, 1, 1)
        epsilon = _rdp_epsilon(segments, plan.privacy.delta)
        assert plan.privacy.epsilon - 0.02 <= epsilon <= plan.privacy.epsilon
        events = [(e["event"], e["details"]) for e in _events(state)
                  if e["details"].get("plan_sha256") == plan.sha256()]
        names = [name for name, _ in events]
        assert names.count("privacy_spent") == 1 and names.count("aggregate_released") == 1
        assert names.index("privacy_spent") < names.index("aggregate_released")
        released = events[names.index("aggregate_released")][1]
        assert released["kind"] == "trial" and released["noise_multiplier"] == mine[0]["noise_multiplier"]
        assert released["components"] == len(layout(plan.design))


def test_the_reported_noise_is_the_noise_multiplier_times_the_designs_sensitivity(federated, plan):
    privacy = federated.report["privacy"]
    figures = privacy["sites"]
    assert sorted(figures) == list(SITES)
    for site, f in figures.items():
        z = _ledger(federated.out / "nodes" / site)["segments"][0]["noise_multiplier"]
        assert f["noise_multiplier"] == z
        assert f["sensitivity"] == pytest.approx(sensitivity(plan.design))
        assert f["noise_std"] == pytest.approx(z * sensitivity(plan.design), rel=1e-12)
    assert privacy["noise_variance_in_sums"] == pytest.approx(sum(f["noise_std"] ** 2 for f in figures.values()))


def test_the_federated_trial_verifies_with_its_nodes(federated):
    assert main(["audit", "verify", str(federated.out)]) == 0
    coordinator = [e["event"] for e in _events(federated.out / "coordinator")]
    assert coordinator[-1] == "trial_finished"


def test_federated_intervals_include_the_noise_and_its_means_are_within_it_of_the_exact_trial(
        federated, exact, plan):
    fed = federated.report
    assert exact["n_patients"] == sum(
        next(e["details"]["patients_used"] for e in _events(federated.out / "nodes" / s)
             if e["event"] == "aggregate_released") for s in SITES)
    noise_sd = math.sqrt(fed["privacy"]["noise_variance_in_sums"])
    n_noisy = fed["n_patients"] - 0.5  # reported rounded
    # mean = (S + e1) / (n + e2): off the exact S / n by (e1 - m e2) / (n + e2), whose std is at
    # most sqrt(2) noise_sd / (n + e2) in the scaled units (m within [-1, 1]); clipping the
    # estimate back into the reachable range only brings it nearer.
    tolerance = 4.5 * math.sqrt(2) * noise_sd / n_noisy
    compared = 0
    for o in plan.design.outcomes:
        width = o.bounds[1] - o.bounds[0]
        for arm in (a.name for a in plan.design.arms):
            f, x = fed["arms"][arm]["outcomes"][o.name], exact["arms"][arm]["outcomes"][o.name]
            assert f["ci95"][1] - f["ci95"][0] > x["ci95"][1] - x["ci95"][0], (arm, o.name)
            assert abs(f["mean"] - x["mean"]) <= tolerance * width, (arm, o.name)
            compared += 1
        for arm in fed["contrasts"]:
            f, x = fed["contrasts"][arm][o.name], exact["contrasts"][arm][o.name]
            assert f["ci95"][1] - f["ci95"][0] > x["ci95"][1] - x["ci95"][0], (arm, o.name)
            assert abs(f["mean"] - x["mean"]) <= tolerance * o.contrast_bound, (arm, o.name)
            compared += 1
    assert compared == 6
    assert "differential-privacy noise" in fed["interval"] and "noise" not in exact["interval"]


# -- 2. what leaves a node --------------------------------------------------------------------

def _leaves(value, prefix=""):
    """Dotted paths of the non-null leaves of a reply's JSON."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, f"{prefix}{k}.")
    elif isinstance(value, list):
        for v in value:
            yield from _leaves(v, prefix)
    elif value is not None:
        yield prefix[:-1]


def test_a_trial_reply_holds_only_allow_listed_figures_and_no_patient_count_id_or_outcome(federated, cohort):
    captured = [json.loads(p.read_text()) for p in sorted(federated.probes.glob("reply-*.json"))]
    texts = [json.dumps(c) for c in captured]
    replies = [NodeReply.model_validate_json(v) for c in captured for record in c.values()
               if isinstance(record, dict) for k, v in record.items() if k == REPLY_KEY]
    assert sorted(r.site for r in replies) == list(SITES)
    for reply in replies:
        assert reply.status == "ok" and reply.released.aggregate.kind == "trial"
        assert reply.released.counts is None and reply.released.privacy is None
        assert set(_leaves(reply.model_dump(mode="json"))) <= set(RELEASE)
    ids = {line.split(",")[0] for n in SITES
           for line in (cohort / f"site-{n}" / "patients.csv").read_text().splitlines()[1:] if line}
    exact_counts = {e["details"]["patients_used"] for n in SITES for e in _events(federated.out / "nodes" / n)
                    if e["event"] == "aggregate_released"}
    for text in texts:
        assert not [i for i in ids if i in text]
        assert "patients_used" not in text and "patients_excluded" not in text
    # The fit result's example count (what FedAvg would weight by) is not the site's patient count.
    for c in captured:
        if "config_records/fitres.metrics" in c:
            site = NodeReply.model_validate_json(c["config_records/fitres.metrics"][REPLY_KEY]).site
            exact = next(e["details"]["patients_used"] for e in _events(federated.out / "nodes" / site)
                         if e["event"] == "aggregate_released")
            assert c["metric_records/fitres.num_examples"]["num_examples"] != exact
    # Besides the reply, nothing but SecAgg+'s protocol: stage names, integers, keys and byte arrays.
    for c in captured:
        for name, record in c.items():
            if isinstance(record, dict):
                for k, v in record.items():
                    if k != REPLY_KEY:
                        assert not isinstance(v, float) and not (isinstance(v, list) and any(
                            isinstance(x, float) for x in v)), (name, k)
    # The exact counts are the node's alone: its own log, never the coordinator's or the results.
    assert exact_counts
    coordinator = (federated.out / "coordinator" / "audit.jsonl").read_text()
    results = (federated.out / "trial.json").read_text()
    for text in (coordinator, results):
        assert "aggregate_released" not in text and "patients_used" not in text
        assert not [i for i in ids if i in text]


# -- 3. refusals ----------------------------------------------------------------------------

def _copy_states(study: Path, dest: Path) -> Path:
    return shutil.copytree(study / "nodes", dest)


def test_a_trial_plan_no_officer_approved_is_refused_at_every_node_and_spends_nothing(
        study, cohort, arms, plan, tmp_path, capsys):
    state = _copy_states(study, tmp_path / "nodes")
    ledgers = {s: (state / s / "privacy_ledger.json").read_bytes() for s in SITES}
    out = tmp_path / "trial"
    code = main(["trial", "--model", str(study), "--arms", str(arms), *_site_args(cohort), "--epsilon",
                 str(EPSILON), "--state", str(state), "--approved-only", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1] == "twinfed: error: no result: too few sites released the trial's aggregates (see sites)"
    report = json.loads((out / "trial.json").read_text())
    assert report["plan_sha256"] == plan.sha256() and report["arms"] == {} and report["sites_released"] == 0
    for site in SITES:
        assert [r["code"] for r in report["sites"][site]["refusals"]] == ["plan_not_approved"]
        assert (state / site / "privacy_ledger.json").read_bytes() == ledgers[site]
        events = [e for e in _events(state / site) if e["details"].get("plan_sha256") == plan.sha256()]
        assert [e["event"] for e in events] == ["model_received", "plan_refused", "round_refused"]
        assert events[-1]["details"]["refusal"] == {"code": "plan_not_approved", "file": None, "row": None,
                                                    "column": None}
    assert main(["audit", "verify", str(out), "--state", str(state)]) == 0


def _other_weights(weights):
    return [w + np.float32(0.01) if i == 0 else w for i, w in enumerate(weights)]


def test_weights_other_than_the_plans_twin_are_refused_by_the_coordinator_in_one_line(
        plan, weights, cohort, tmp_path):
    with pytest.raises(TwinfedError) as err:
        run_simulated_trial(plan, _other_weights(weights), _site_refs(cohort), tmp_path / "trial",
                            progress=_quiet)
    assert str(err.value) == ("the model's weights are not the twin the trial plan names; give the model "
                              "directory the plan was made from")
    assert not (tmp_path / "trial" / "trial.json").exists()
    for site in SITES:  # nothing was sent: no node heard of the trial
        assert not [e for e in _events(tmp_path / "trial" / "nodes" / site) if e["event"] == "model_received"]


def test_a_node_refuses_weights_that_are_not_its_approved_plans_twin_with_model_mismatch(
        plan, weights, cohort, tmp_path):
    from twinfed.client.node import NodeConfig
    from twinfed.client.gate import serve
    from twinfed.governance.provision import provision_simulated_node
    from twinfed.privacy.secagg import SecAggView, required_setup
    from twinfed.wire import TrialInstruction

    node = NodeConfig(site_name="a", site_data=(cohort / "site-a").resolve(), state_dir=tmp_path / "a",
                      simulated=True)
    provision_simulated_node(node.state_dir, site_name="a", site_data=node.site_data, plan=plan,
                             operator="operator:test")
    shares, threshold = required_setup(3, plan)
    config = TrialInstruction(plan_json=plan.canonical_json(), plan_sha256=plan.sha256()).to_config()
    result = serve(node, config, _other_weights(weights),
                           secagg=SecAggView(masked=True, sampled=3, shares=shares, threshold=threshold))
    assert result.reply.status == "refused" and result.reply.refusal.code == RefusalCode.MODEL_MISMATCH
    assert result.reply.released is None
    assert [a.shape for a in result.update] == [(len(layout(plan.design)),)]
    assert not np.any(result.update[0])
    events = [e for e in _events(node.state_dir) if e["details"].get("plan_sha256") == plan.sha256()]
    assert [e["event"] for e in events] == ["plan_approved", "model_received", "round_refused"]
    assert events[-1]["details"]["refusal"]["code"] == "model_mismatch"
    assert not (node.state_dir / "privacy_ledger.json").exists()  # refused before any spend


def test_a_node_whose_budget_cannot_afford_the_trial_refuses_and_spends_nothing(
        study, plan, weights, cohort, tmp_path):
    state = _copy_states(study, tmp_path / "nodes")  # the study spent (almost) its whole budget
    ledgers = {s: (state / s / "privacy_ledger.json").read_bytes() for s in SITES}
    out = tmp_path / "trial"
    report = run_simulated_trial(plan, weights, _site_refs(cohort), out, progress=_quiet, state_root=state)
    assert report["arms"] == {} and report["sites_released"] == 0 and "no result" in report["note"]
    for site in SITES:
        assert [r["code"] for r in report["sites"][site]["refusals"]] == ["budget_exhausted"]
        assert (state / site / "privacy_ledger.json").read_bytes() == ledgers[site]
        events = [e["event"] for e in _events(state / site) if e["details"].get("plan_sha256") == plan.sha256()]
        assert "budget_exhausted" in events and "round_refused" in events
        assert "privacy_spent" not in events and "aggregate_released" not in events
    assert main(["audit", "verify", str(out), "--state", str(state)]) == 0


# -- 4. the calibration stage of a study -------------------------------------------------------

def test_a_calibrated_study_writes_a_dp_calibration_of_three_sites_within_each_sites_epsilon(study):
    calibration = json.loads((study / "model" / "calibration.json").read_text())
    assert calibration["differential_privacy"] is True and calibration["sites"] == 3
    training = json.loads((study / "model" / "plan.json").read_text())
    from twinfed.models.plan import TrainingPlan

    tplan = TrainingPlan.model_validate(training)
    assert tplan.calibration is not None
    for site in SITES:
        segments = _ledger(study / "nodes" / site)["segments"]
        release = [s for s in segments if s["round"] == tplan.rounds + 1]
        assert [(s["mechanism"], s["plan_sha256"], s["noise_multiplier"], s["steps"]) for s in release] == \
            [("gaussian-sum", tplan.sha256(), tplan.calibration.noise_multiplier, 1)]
        assert _rdp_epsilon(segments, tplan.privacy.delta) <= tplan.privacy.epsilon + 1e-9


def test_a_calibrated_study_trains_only_on_the_patients_it_does_not_hold_out(study, cohort):
    from twinfed.models.calibration import held_out
    from twinfed.models.plan import TrainingPlan

    tplan = TrainingPlan.model_validate_json((study / "model" / "plan.json").read_text())
    for site in SITES:
        events = _events(study / "nodes" / site)
        joined = [e["details"] for e in events if e["event"] == "round_joined"]
        released = [e["details"] for e in events if e["event"] == "aggregate_released"]
        assert len(joined) == 1 and [r["kind"] for r in released] == ["calibration"]
        consented = _consented(cohort / f"site-{site}", tplan.spec.purpose)
        trained = joined[0]["patients_used"] + joined[0]["patients_excluded"]
        calibrating = released[0]["patients_used"] + released[0]["patients_excluded"]
        assert trained + calibrating == len(consented)
        assert calibrating == int(held_out(tplan.sha256(), consented, tplan.calibration.holdout_fraction).sum())
        assert 0 < calibrating < len(consented)


def test_audit_verify_catches_an_edited_calibration_file(study, tmp_path, capsys):
    run = shutil.copytree(study, tmp_path / "run")
    assert main(["audit", "verify", str(run)]) == 0
    path = run / "model" / "calibration.json"
    data = json.loads(path.read_text())
    data["noise_multiplier"] = data["noise_multiplier"] * 2
    path.write_text(json.dumps(data, indent=2) + "\n")
    capsys.readouterr()
    assert main(["audit", "verify", str(run)]) != 0
    out = capsys.readouterr().out
    assert "calibration.json" in out and "FAIL" in out
