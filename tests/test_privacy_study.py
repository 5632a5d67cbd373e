"""Differential privacy and SecAgg+ on the real Flower simulation engine."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import ray.cloudpickle
from opacus.accountants import RDPAccountant

from builders import write_site
from twinfed.cli.main import main
from twinfed.models.plan import ModelConfig, PrivacyConfig, TrainingConfig, TrainingPlan
from twinfed.models.spec import load_spec
from twinfed.models.surrogate import build_surrogate, get_weights
from twinfed.models.twin import Twin
from twinfed.simulate import SiteRef, run_simulated_study

pytestmark = [pytest.mark.slow, pytest.mark.studies]
# The probes below travel to Ray's workers by value, not by module name.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    root = tmp_path_factory.mktemp("sites")
    return [write_site(root / n, n_patients=12, n_steps=100, seed=i) for i, n in enumerate("abcd")]


def _site_args(sites, n=3):
    return [a for i, d in enumerate(sites[:n]) for a in ("--site", f"{'abcd'[i]}={d}")]


def test_a_dp_secagg_study_stays_within_budget_and_a_second_study_is_refused(sites, tmp_path, capsys):
    common = ["simulate", "--spec", "glucose", *_site_args(sites), "--rounds", "2", "--local-steps", "3",
              "--batch-size", "4", "--hidden", "8", "--epsilon", "3", "--no-calibration",
              "--state", str(tmp_path / "nodes")]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert summary["privacy"]["differential_privacy"] and summary["privacy"]["secure_aggregation"]
    for site in summary["sites"].values():
        p = site["privacy"]
        assert 2.95 <= p["epsilon"] <= 3.0
        assert p["delta"] == 1e-5 and p["accountant"] == "rdp" and p["clipping_norm"] == PrivacyConfig().clipping_norm
        assert sum(s["steps"] for s in p["segments"]) == 6 + 1  # 2 rounds x 3 steps, and the counts
        acc = RDPAccountant()  # an independent accountant over the same segments
        acc.history = [(s["noise_multiplier"], s["sample_rate"], s["steps"]) for s in p["segments"]]
        assert acc.get_epsilon(delta=p["delta"]) == pytest.approx(p["epsilon"], rel=1e-9)

    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "two")]) == 1
    assert "no round updated the model" in capsys.readouterr().err
    second = json.loads((tmp_path / "two" / "summary.json").read_text())
    for site in second["sites"].values():
        assert site["rounds_joined"] == 0 and site["rounds_refused"] == 2
        assert site["refusals"][0]["code"] == "budget_exhausted"
    ledger = json.loads((tmp_path / "nodes" / "a" / "privacy_ledger.json").read_text())
    assert len(ledger["segments"]) == 3  # the refused study spent nothing


def _plan(*, secagg: bool, rounds: int = 1) -> TrainingPlan:
    return TrainingPlan(spec=load_spec("glucose"), rounds=rounds, seed=3, model=ModelConfig(hidden=8),
                        training=TrainingConfig(local_steps=3, batch_size=4),
                        privacy=PrivacyConfig(enabled=False, secure_aggregation=secagg))


def _weights(run: Path) -> list[np.ndarray]:
    return get_weights(Twin.load(run).surrogate)


def test_the_secagg_aggregate_equals_the_plain_mean_within_quantisation_error(sites, tmp_path):
    refs = [SiteRef("abc"[i], d) for i, d in enumerate(sites[:3])]
    run_simulated_study(_plan(secagg=True), refs, tmp_path / "masked", progress=lambda m: None)
    run_simulated_study(_plan(secagg=False), refs, tmp_path / "plain", progress=lambda m: None)
    step = 2 * PrivacyConfig().update_clip / 2**22
    for a, b in zip(_weights(tmp_path / "masked"), _weights(tmp_path / "plain")):
        assert np.abs(a - b).max() <= 2 * step + 1e-6
    init = get_weights(build_surrogate(load_spec("glucose"), ModelConfig(hidden=8), seed=3))
    assert max(np.abs(a - b).max() for a, b in zip(_weights(tmp_path / "plain"), init)) > 100 * step


class Probe:
    """Saves what one node's mod layer sees; optionally crashes node ``drop`` when it is sent
    the SecAgg+ stage ``drop_at`` (by default after it shared its keys, before its vector)."""

    def __init__(self, out: Path, kind: str, drop: int | None = None,
                 drop_at: str = "collect_masked_vectors"):
        self.out, self.kind, self.drop, self.drop_at = out, kind, drop, drop_at

    def __call__(self, msg, ctxt, call_next):
        from flwr.common import bytes_to_ndarray, parameters_to_ndarrays
        from flwr.compat.common import recorddict_compat as compat

        pid = int(ctxt.node_config["partition-id"])
        configs = msg.content.config_records.get("secaggplus_configs")
        stage = configs.get("stage") if configs is not None else None
        if self.kind == "outer" and stage == self.drop_at and pid == self.drop:
            raise RuntimeError(f"node lost at SecAgg+ stage {stage}")
        reply = call_next(msg, ctxt)
        if self.kind == "outer" and stage == "collect_masked_vectors":
            masked = reply.content.config_records["secaggplus_configs"]["masked_params"]
            np.savez(self.out / f"masked-{pid}.npz", *[bytes_to_ndarray(b) for b in masked])
        if self.kind == "inner":
            fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
            np.savez(self.out / f"update-{pid}.npz", *parameters_to_ndarrays(fitres.parameters))
        return reply


def _change(run: Path) -> np.ndarray:
    """What a one-round study of :func:`_plan` changed in the initial weights, flat."""
    init = get_weights(build_surrogate(load_spec("glucose"), ModelConfig(hidden=8), seed=3))
    return np.concatenate([(a - b).ravel() for a, b in zip(_weights(run), init)])


def _load(path: Path) -> np.ndarray:
    with np.load(path) as z:
        return np.concatenate([z[k].ravel() for k in sorted(z.files, key=lambda k: int(k.split("_")[1]))])


def test_a_masked_update_reveals_nothing_and_a_round_survives_a_node_lost_after_key_sharing(sites, tmp_path):
    refs = [SiteRef("abcd"[i], d) for i, d in enumerate(sites)]
    probes = tmp_path / "probes"
    probes.mkdir()
    summary = run_simulated_study(_plan(secagg=True), refs, tmp_path / "run", progress=lambda m: None,
                                  outer_mods=[Probe(probes, "outer", drop=3)],
                                  inner_mods=[Probe(probes, "inner")])
    assert summary["history"][0]["sites_trained"] == 3  # node 3 was lost mid-round

    update = _load(probes / "update-0.npz")
    masked = _load(probes / "masked-0.npz").astype(np.float64)[1:]  # [0] is the masked weight
    assert masked.size == update.size
    # The masked vector is uniform over the 2^32 ring and uncorrelated with the update.
    u = masked / 2**32
    # (Fresh masks each run: bounds a uniform vector breaks about once in 10,000 runs.)
    assert abs(u.mean() - 0.5) < 4 * np.sqrt(1 / 12 / u.size) and abs(u.var() - 1 / 12) < 0.01
    counts = np.histogram(u, bins=10, range=(0, 1))[0]
    expected = u.size / 10
    assert ((counts - expected) ** 2 / expected).sum() < 33.72  # chi-square, 9 dof, p = 1e-4
    assert abs(np.corrcoef(u, update)[0, 1]) < 4 / np.sqrt(u.size)  # four standard errors of none

    # What the coordinator got is the mean of the three surviving updates, nothing else.
    mean = np.mean([_load(probes / f"update-{i}.npz") for i in range(3)], axis=0)
    assert np.abs(_change(tmp_path / "run") - mean).max() <= 2 * 2 * 0.5 / 2**22 + 1e-6


def test_a_round_survives_a_node_lost_before_it_shared_its_keys(sites, tmp_path):
    # Its survivors hold no share of its keys and never masked with it: the sum of the three
    # others is unmasked as it is (Flower alone asks them for those shares, and halts the round).
    refs = [SiteRef("abcd"[i], d) for i, d in enumerate(sites)]
    probes = tmp_path / "probes"
    probes.mkdir()
    summary = run_simulated_study(_plan(secagg=True), refs, tmp_path / "run", progress=lambda m: None,
                                  outer_mods=[Probe(probes, "outer", drop=3, drop_at="share_keys")],
                                  inner_mods=[Probe(probes, "inner")])
    assert summary["history"][0]["sites_trained"] == 3
    assert not (probes / "update-3.npz").exists()
    mean = np.mean([_load(probes / f"update-{i}.npz") for i in range(3)], axis=0)
    assert np.abs(mean).max() > 100 * 2 * 0.5 / 2**22
    assert np.abs(_change(tmp_path / "run") - mean).max() <= 2 * 2 * 0.5 / 2**22 + 1e-6


class KeysSeen:
    """Records how many public keys (its neighbourhood, itself included) a node is sent."""

    def __init__(self, out: Path):
        self.out = out

    def __call__(self, msg, ctxt, call_next):
        configs = msg.content.config_records.get("secaggplus_configs")
        if configs is not None and configs.get("stage") == "share_keys":
            pid = int(ctxt.node_config["partition-id"])
            neighbours = [k for k in configs.keys() if k != "stage"]
            (self.out / f"keys-{pid}.txt").write_text(str(len(neighbours)))
        return call_next(msg, ctxt)


def test_eight_sites_share_keys_with_a_neighbourhood_of_five_and_the_sum_is_still_the_mean(tmp_path):
    root = tmp_path / "sites"
    refs = [SiteRef(f"s{i}", write_site(root / f"s{i}", n_patients=6, n_steps=80, seed=10 + i)) for i in range(8)]
    probes = tmp_path / "probes"
    probes.mkdir()
    summary = run_simulated_study(_plan(secagg=True), refs, tmp_path / "run", progress=lambda m: None,
                                  outer_mods=[KeysSeen(probes)], inner_mods=[Probe(probes, "inner")])
    # The default assumptions (10% corrupt, 10% dropping out, rounded up: 1 and 1 of 8) give a
    # ring of 5 with threshold 3, not all-to-all; every node was sent exactly its 5 keys.
    assert summary["history"][0]["sites_trained"] == 8
    assert sorted(int((probes / f"keys-{i}.txt").read_text()) for i in range(8)) == [5] * 8
    mean = np.mean([_load(probes / f"update-{i}.npz") for i in range(8)], axis=0)
    assert np.abs(mean).max() > 100 * 2 * 0.5 / 2**22  # the updates are far above quantisation
    assert np.abs(_change(tmp_path / "run") - mean).max() <= 2 * 2 * 0.5 / 2**22 + 1e-6
    assert summary["history"][0]["secagg"] == {"sampled": 8, "shares": 5, "threshold": 3}
