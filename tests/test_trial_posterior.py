"""A trial's quality figures carry what the twins do not know (issue 21 item 1): how many
patients' records leave the key core parameter unidentified (counted, never named)."""

import pytest

from twinfed.models.arms import parse_design
from twinfed.models.calibration import identify_patients
from twinfed.models.cohort import generate_cohort
from twinfed.models.personalise import parameter_spread
from twinfed.models.plan import ModelConfig, TrainingPlan
from twinfed.models.site_data import load_site
from twinfed.models.spec import load_spec
from twinfed.models.surrogate import build_surrogate, get_weights
from twinfed.models.trial import run_site_trial, trial_windows
from twinfed.models.twin import Twin

SPEC = load_spec("glucose")
pytestmark = pytest.mark.usefixtures("one_torch_thread")
DESIGN = parse_design("""
[trial]
name = "t"
purpose = "in-silico-trial"
reference = "usual-care"
start_hours = 36
duration_days = 1
outcomes = ["mean_glucose"]
draws = 2
seed = 7

[[trial.arms]]
name = "usual-care"
scenario = "recorded"

[[trial.arms]]
name = "more"
scenario = "insulin_u*1.1"
""", SPEC, source="arms.toml")


def _twin(kind: str) -> Twin:
    plan = TrainingPlan(spec=SPEC, rounds=1, model=ModelConfig(kind=kind))
    return Twin.from_weights(plan, get_weights(build_surrogate(SPEC, plan.model, seed=0)))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("trial-posterior") / "cohort"
    generate_cohort("glucose", sites=1, patients=4, days=3, seed=5, out=out)
    return load_site(out / "site-a", SPEC)


def test_a_hybrid_trial_counts_the_patients_whose_insulin_sensitivity_the_record_does_not_identify(cohort):
    twin = _twin("hybrid")
    outcomes = run_site_trial(twin, cohort, DESIGN)
    win = trial_windows(cohort, DESIGN)
    fitted = identify_patients(twin, cohort, win.patients, cohort.steps[win.origins], seed=DESIGN.seed,
                               posterior=True)
    spread = parameter_spread(twin.surrogate, cohort, fitted, "si")
    kept = fitted.n_windows > 0
    assert outcomes.n_patients == int(kept.sum()) > 0
    assert outcomes.n_not_identifiable == int((~spread.identifiable[kept]).sum())


def test_a_twin_without_a_core_has_no_identifiability_count(cohort):
    assert run_site_trial(_twin("mlp-residual"), cohort, DESIGN).n_not_identifiable is None
