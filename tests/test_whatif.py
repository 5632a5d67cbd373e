"""What-if scenarios: parsing, applying to the recorded future, and one patient's forecast."""

import numpy as np
import pytest

from builders import write_site
from twinfed.errors import ScenarioError
from twinfed.models.plan import ModelConfig, TrainingPlan
from twinfed.models.site_data import load_site
from twinfed.models.spec import load_spec
from twinfed.models.surrogate import build_surrogate
from twinfed.models.twin import Twin
from twinfed.models.whatif import default_scenarios, parse_scenario, run_whatif

SPEC = load_spec("glucose")
FUTURE = np.tile(np.array([[0.1, 0.0]], np.float32), (12, 1))


def test_recorded_changes_nothing():
    assert (parse_scenario("usual=recorded", SPEC).apply(SPEC, FUTURE) == FUTURE).all()


def test_scale_set_and_add_at_a_minute():
    out = parse_scenario("x=insulin_u*2,carbs_g+30@15,insulin_u=4@0", SPEC).apply(SPEC, FUTURE)
    assert out[0, 0] == 4 and np.allclose(out[1:, 0], 0.2)
    assert out[3, 1] == 30 and out[:, 1].sum() == 30


@pytest.mark.parametrize("text, message", [
    ("x=heparin*2", "not a control of the twin (controls: insulin_u, carbs_g)"),
    ("x=carbs_g+30", "'+' needs a minute"),
    ("x=carbs_g+30@7", "minute 7 must be a multiple of 5"),
    ("x=carbs_g+30@60", "below 60 min"),
    ("x=insulin_u=500", "leaves the spec's range"),
    ("insulin_u*2", "write NAME=OP"),
    ("x=insulin_u/2", "cannot read"),
])
def test_bad_scenarios_say_what_to_write(text, message):
    with pytest.raises(ScenarioError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*").replace("+", r"\+")):
        parse_scenario(text, SPEC).apply(SPEC, FUTURE)


def test_default_scenarios_vary_the_first_control():
    names = [s.name for s in default_scenarios(SPEC)]
    assert names == ["recorded", "insulin_ux0.8", "insulin_ux1.2", "skip-insulin_u"]


def test_run_whatif_forecasts_each_scenario_and_shows_the_observed_future(tmp_path):
    site = load_site(write_site(tmp_path / "s", n_patients=2, n_steps=60), SPEC)
    twin = Twin(TrainingPlan(spec=SPEC, rounds=1, model=ModelConfig(hidden=8)),
                build_surrogate(SPEC, ModelConfig(hidden=8)))
    res = run_whatif(twin, site, "p1", 200.0, default_scenarios(SPEC))
    assert set(res.forecasts) == {"recorded", "insulin_ux0.8", "insulin_ux1.2", "skip-insulin_u"}
    assert res.observed is not None and res.observed.shape == (12, 1)
    assert res.minutes[0] == 5 and res.minutes[-1] == 60
    with pytest.raises(ScenarioError, match="fewer than 24 contiguous steps"):
        run_whatif(twin, site, "p1", 50.0, default_scenarios(SPEC))
    with pytest.raises(ScenarioError, match="no such patient"):
        run_whatif(twin, site, "nobody", 200.0, default_scenarios(SPEC))
