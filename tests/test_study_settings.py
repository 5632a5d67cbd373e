"""The coordinator's run config (``flwr run --run-config``) becomes the study's training plan."""

import pytest

from twinfed.errors import PlanError
from twinfed.models.plan import (CalibrationConfig, ModelConfig, PrivacyConfig, SecAggConfig,
                                 TrainingConfig, TrainingPlan)
from twinfed.models.spec import load_spec
from twinfed.server.settings import StudySettings


def test_privacy_is_on_by_default_under_flwr_run():
    plan = StudySettings.from_run_config({"rounds": 2}).plan()
    assert plan.privacy.enabled and plan.privacy.secure_aggregation
    assert plan.privacy.epsilon == 3.0 and plan.privacy.delta == 1e-5


def test_every_privacy_setting_is_a_run_config_key():
    plan = StudySettings.from_run_config({
        "differential-privacy": False, "epsilon": 8.0, "delta": 1e-6, "clipping-norm": 0.5,
        "accountant": "prv", "secure-aggregation": False, "windows-per-patient": 4}).plan()
    p = plan.privacy
    assert (p.enabled, p.epsilon, p.delta, p.clipping_norm, p.accountant, p.secure_aggregation) == \
        (False, 8.0, 1e-6, 0.5, "prv", False)
    assert plan.training.windows_per_patient == 4


@pytest.mark.parametrize("cfg", [{"epsilom": 3.0}, {"accountant": "gdp"}, {"delta": 2.0}])
def test_a_misspelt_or_invalid_run_config_key_is_an_error(cfg):
    with pytest.raises(PlanError, match="run config key"):
        StudySettings.from_run_config(cfg)


def test_the_pyproject_defaults_are_valid_settings():
    import tomllib
    from pathlib import Path

    cfg = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    defaults = cfg["tool"]["flwr"]["app"]["config"]
    settings = StudySettings.from_run_config(defaults)
    assert settings.plan().privacy.enabled


def test_every_protection_turned_off_is_named_in_the_privacy_label():
    from twinfed.models.plan import PrivacyConfig

    assert "warning" not in PrivacyConfig().label()
    label = PrivacyConfig(enabled=False, secure_aggregation=False).label()
    assert "NO DIFFERENTIAL PRIVACY" in label["warning"] and "NO SECURE AGGREGATION" in label["warning"]
    assert label["epsilon_per_site"] is None and label["differential_privacy"] is False


def _every_field_changed() -> TrainingPlan:
    return TrainingPlan(
        spec=load_spec("cardio"), rounds=6, seed=11, metrics=("patients_used",),
        model=ModelConfig(kind="mlp-residual", hidden=12, layers=3, pretrained_sha256="ab" * 32),
        training=TrainingConfig(local_steps=7, batch_size=33, learning_rate=0.0042,
                                windows_per_patient=5, lr_schedule="constant"),
        privacy=PrivacyConfig(epsilon=2.5, delta=1e-7, clipping_norm=0.3, accountant="prv",
                              update_clip=0.25, count_noise=7.5, secagg=SecAggConfig(
                                  min_sites=4, corrupt_fraction=0.05, dropout_fraction=0.2,
                                  security_bits=48, correctness_bits=24)),
        calibration=CalibrationConfig(holdout_fraction=0.3, noise_multiplier=2.5, levels=(0.5, 0.9, 0.99),
                                      edges=(0.5, 1.0, 2.0, 4.0), identify_hours=24.0))


def _leaves(obj, prefix=""):
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in _leaves(val, f"{prefix}{key}.").items()}
    return {prefix[:-1]: obj}


def test_the_round_trip_plan_changes_every_field_that_has_a_choice():
    changed, default = _leaves(_every_field_changed().model_dump()), _leaves(
        TrainingPlan(spec=load_spec("glucose"), rounds=1).model_dump())
    same = {k for k in changed if not k.startswith("spec.") and changed[k] == default.get(k)}
    # Only fields with a single allowed value (or kept on: DP and SecAgg+ for deployment) remain.
    assert same == {"strategy", "privacy.enabled", "privacy.secure_aggregation"}


def test_every_plan_field_survives_deploy_and_flwr_run_configuration(tmp_path):
    import tomli_w
    from flwr.common.config import get_fused_config_from_dir, parse_config_args

    from twinfed.deploy.launcher import default_app_dir, plan_run_config

    plan = _every_field_changed()
    cfg = plan_run_config(plan, out_dir=tmp_path / "run", min_nodes=3)
    path = tmp_path / "run-config.toml"
    path.write_text(tomli_w.dumps(cfg))  # what `twinfed deploy local` hands to `flwr run`
    fused = get_fused_config_from_dir(default_app_dir(), parse_config_args([str(path)]))
    again = StudySettings.from_run_config(fused).plan()  # what the ServerApp runs
    assert again == plan and again.sha256() == plan.sha256()
    assert again.training.lr_schedule == "constant" and again.privacy.update_clip == 0.25


def test_a_plan_whose_json_does_not_match_its_hash_is_refused():
    plan = _every_field_changed()
    with pytest.raises(PlanError, match="does not hash to plan-sha256"):
        StudySettings.from_run_config({"plan": plan.canonical_json(), "plan-sha256": "0" * 64}).plan()
