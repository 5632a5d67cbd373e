"""The coordinator's run config (``flwr run --run-config``) becomes the study's training plan."""

import pytest
from pydantic import ValidationError

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
    with pytest.raises(ValidationError):
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
