"""An ensemble twin (issue 21 item 1): several structurally different cores of one family on the
same roles, each trained and identified on its own, their mean the forecast, and their spread in
every what-if and trial interval."""

import numpy as np
import pytest
import torch

from twinfed.errors import SpecError
from twinfed.models.cores import MEMBER, EnsembleBinding, core_for
from twinfed.models.hybrid import HybridSurrogate
from twinfed.models.plan import ModelConfig, TrainingPlan
from twinfed.models.spec import CORE_STRUCTURES, load_spec, parse_spec
from twinfed.models.trial import (
    contributions, layout, plan_structures, sensitivity, summarise,
)

from test_trial_engine import Z, _arms, _design

GLUCOSE = load_spec("glucose")
CARDIO = load_spec("cardio")


def with_structures(spec, structures) -> object:
    """``spec`` with its core's ``structures`` declared (None: the key left out)."""
    line = f'name = "{spec.core.name}"\n'
    listed = "" if structures is None else "structures = [" + ", ".join(f'"{s}"' for s in structures) + "]\n"
    return parse_spec(spec.to_toml().replace(line, line + listed, 1))


ENSEMBLE = with_structures(GLUCOSE, CORE_STRUCTURES["glucose-insulin"])


# -- the spec ------------------------------------------------------------------------------------

def test_a_spec_without_structures_runs_its_familys_default_alone_and_keeps_its_text():
    assert GLUCOSE.core.structures is None and GLUCOSE.core.members == ("minimal",)
    assert CARDIO.core.members == ("effect-compartment",)
    assert "structures" not in GLUCOSE.to_toml()  # existing specs (and plans' hashes) unchanged


def test_declared_structures_round_trip_through_the_specs_text():
    assert ENSEMBLE.core.members == ("minimal", "two-compartment")
    assert parse_spec(ENSEMBLE.to_toml()) == ENSEMBLE


@pytest.mark.parametrize("structures, message", [
    (["minimal", "hovorka"], "no structure 'hovorka'; its structures are minimal, two-compartment"),
    (["minimal", "minimal"], "structures must not repeat"),
    ([], "at least 1"),
])
def test_an_unknown_repeated_or_empty_structure_list_is_a_one_line_error(structures, message):
    with pytest.raises(SpecError, match=message) as err:
        with_structures(GLUCOSE, structures)
    assert "\n" not in str(err.value)


# -- the trial's release and summary -------------------------------------------------------------

TWO_ARMS = _design(_arms(("usual-care", "recorded"), ("more", "insulin_u*1.2")),
                   outcomes='["mean_glucose", "time_in_range"]')
STRUCTURES = ("minimal", "two-compartment")


def _structure_values(n=40, gap=6.0, seed=0):
    """[P, M, A, O]: the second structure's effect of ``more`` is ``gap`` mg/dL stronger."""
    rng = np.random.default_rng(seed)
    base = rng.normal(150, 20, n)
    first = np.stack([np.stack([base, rng.uniform(40, 80, n)], -1),
                      np.stack([base - 10 + rng.normal(0, 3, n), rng.uniform(40, 80, n)], -1)], 1)
    second = first.copy()
    second[:, 1, 0] -= gap
    return np.stack([first, second], 1)


def test_an_ensembles_release_adds_each_later_structures_differences_and_stays_within_its_sensitivity():
    names = layout(TWO_ARMS, STRUCTURES)
    extra = [n for n in names if "@" in n[0]]
    assert extra == [("arm@two-compartment", a, o, "sum") for a in ("usual-care", "more")
                     for o in ("mean_glucose", "time_in_range")] + \
        [("contrast@two-compartment", "more", o, "sum") for o in ("mean_glucose", "time_in_range")]
    assert len(names) == len(layout(TWO_ARMS)) + 6 and names[-1][0] == "count"
    sv = _structure_values()
    rows = contributions(sv.mean(1), TWO_ARMS, sv)
    assert rows.shape == (40, len(names))
    assert (np.linalg.norm(rows, axis=1) <= sensitivity(TWO_ARMS, STRUCTURES) * (1 + 1e-12)).all()
    assert np.array_equal(contributions(sv.mean(1), TWO_ARMS), rows[:, [i for i, n in enumerate(names)
                                                                        if "@" not in n[0]]])


def test_the_summary_is_the_structures_mean_and_its_interval_carries_their_spread():
    sv = _structure_values(gap=6.0)
    values = sv.mean(1)
    total = contributions(values, TWO_ARMS, sv).sum(0)
    plain = summarise(contributions(values, TWO_ARMS).sum(0), TWO_ARMS, GLUCOSE)
    both = summarise(total, TWO_ARMS, GLUCOSE, structures=STRUCTURES)
    got, base = both["contrasts"]["more"]["mean_glucose"], plain["contrasts"]["more"]["mean_glucose"]
    per = {s: float(np.mean(sv[:, m, 1, 0] - sv[:, m, 0, 0])) for m, s in enumerate(STRUCTURES)}
    assert got["structures"] == pytest.approx(per, rel=1e-9)
    assert per["two-compartment"] == pytest.approx(per["minimal"] - 6.0)
    assert got["mean"] == pytest.approx(base["mean"], rel=1e-12)  # the structures' mean
    half, base_half = (got["ci95"][1] - got["ci95"][0]) / 2, (base["ci95"][1] - base["ci95"][0]) / 2
    # the variance of the two structures' estimates (6^2 / 2) is added to the mean's
    assert half == pytest.approx(Z * np.sqrt((base_half / Z) ** 2 + 18.0), rel=1e-9)
    assert "2 core structures (minimal, two-compartment)" in both["interval"]
    # where the structures agree (the usual-care arm's time in range is the same), no widening
    arm, arm_base = (r["arms"]["usual-care"]["outcomes"]["time_in_range"] for r in (both, plain))
    assert arm["ci95"] == pytest.approx(arm_base["ci95"], rel=1e-12)


def test_a_trial_plan_knows_its_twins_structures_without_the_weights():
    assert plan_structures(TrainingPlan(spec=ENSEMBLE, rounds=1)) == STRUCTURES
    assert plan_structures(TrainingPlan(spec=GLUCOSE, rounds=1)) == ()
    assert plan_structures(TrainingPlan(spec=ENSEMBLE, rounds=1, model=ModelConfig(kind="mlp-residual"))) == ()
