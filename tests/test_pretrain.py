"""Public pretraining: weights learnt on a virtual cohort, named in the plan by their digest."""

import json

import numpy as np
import pytest

from twinfed.cli.main import main
from twinfed.errors import ModelError
from twinfed.models.cohort import generate_cohort
from twinfed.models.digest import weights_sha256
from twinfed.models.plan import ModelConfig, TrainingPlan
from twinfed.models.pretrain import pretrained_config, starting_weights
from twinfed.models.spec import load_spec
from twinfed.models.surrogate import get_weights
from twinfed.models.twin import Twin


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    generate_cohort("glucose", sites=1, patients=12, days=2, seed=9, out=root / "virtual", holdout=2)
    assert main(["pretrain", "--spec", "glucose", "--cohort", str(root / "virtual"), "--out",
                 str(root / "pre"), "--steps", "20"]) == 0
    return root


def test_pretrain_writes_a_model_whose_digest_a_plan_can_name(pretrained, capsys):
    twin = Twin.load(pretrained / "pre")
    digest = weights_sha256(get_weights(twin.surrogate))
    config = pretrained_config(ModelConfig(), pretrained / "pre")
    assert config.pretrained_sha256 == digest and config.kind == "hybrid"
    plan = TrainingPlan(spec=load_spec("glucose"), rounds=2, model=config)
    start = starting_weights(plan, pretrained / "pre")
    assert all(np.array_equal(a, b) for a, b in zip(start, get_weights(twin.surrogate)))


def test_a_plan_naming_pretrained_weights_refuses_other_weights_or_none(pretrained, tmp_path):
    plan = TrainingPlan(spec=load_spec("glucose"), rounds=2,
                        model=pretrained_config(ModelConfig(), pretrained / "pre"))
    with pytest.raises(ModelError, match="--pretrained"):
        starting_weights(plan, None)
    other = Twin.load(pretrained / "pre")
    weights = get_weights(other.surrogate)
    weights[0] = weights[0] + 1.0
    Twin.from_weights(other.plan, weights).save(tmp_path / "other")
    with pytest.raises(ModelError, match="not the ones the plan names"):
        starting_weights(plan, tmp_path / "other")
    fresh = TrainingPlan(spec=load_spec("glucose"), rounds=2)
    with pytest.raises(ModelError, match="plan names none"):
        starting_weights(fresh, pretrained / "pre")


def test_pretrain_never_overwrites(pretrained, capsys):
    capsys.readouterr()
    assert main(["pretrain", "--spec", "glucose", "--cohort", str(pretrained / "virtual"), "--out",
                 str(pretrained / "pre"), "--steps", "1"]) == 1
    assert "never overwritten" in capsys.readouterr().err


@pytest.mark.slow
def test_a_study_started_from_pretrained_weights_says_so(pretrained, tmp_path):
    sites = [a for n in ("site-a",) for a in ("--site", f"{n}={pretrained / 'virtual' / n}")]
    assert main(["simulate", "--spec", "glucose", *sites, "--rounds", "1", "--local-steps", "2",
                 "--batch-size", "4", "--no-secagg", "--pretrained", str(pretrained / "pre"),
                 "--out", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    digest = weights_sha256(get_weights(Twin.load(pretrained / "pre").surrogate))
    assert summary["model"]["pretrained_sha256"] == digest
    assert Twin.load(tmp_path / "run").plan.model.pretrained_sha256 == digest
