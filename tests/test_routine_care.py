"""Routine care as real records hold it, in the built-in simulators (issue 21 item 4).

Real records hold care that reacts to the patient: correction boluses after high readings (insulin
with no meal), fast carbohydrate after low ones, temporary and lasting basal changes, late and
missed boluses; antihypertensive doses taken late, missed, doubled and titrated. ``care="routine"``
(the default) simulates that care; ``care="plain"`` reproduces the cohorts made before it, byte
for byte.
"""

import hashlib

import numpy as np
import pytest

from twinfed.models.sim import cardio_sim, glucose_sim, hovorka_sim

DAY = 288  # 5-minute steps
SIMS = {"bergman": glucose_sim, "hovorka": hovorka_sim, "baroreflex": cardio_sim}
GLUCOSE_SIMS = pytest.mark.parametrize("gsim", [glucose_sim, hovorka_sim], ids=["bergman", "hovorka"])

# sha256 (first 16 hex digits) of a 3-patient, 1-day cohort per site profile, seed 11, computed
# from the simulators before routine care existed (commit 6603110).
PLAIN_FINGERPRINTS = {
    "bergman": ["1d003dd0ba2ed4aa", "4f4d71aa2d9dc52e", "e4cfd02fbbf714dd"],
    "hovorka": ["2d25c0e91190989e", "981b3cca6734fb14", "1f8a539b2115f4ce"],
    "baroreflex": ["508a6de7bafa4c27", "acf2b92320c20b6b", "af5f3fe539fffd51"],
}
# sha256 of site-a/timeseries.csv of generate_cohort(twin, sites=1, patients=3, days=0.25, seed=3),
# from the same commit.
PLAIN_CSV_FINGERPRINTS = {
    ("glucose", "bergman"): "13b3239baed2f7ae",
    ("glucose", "hovorka"): "5618b8b994d3941a",
    ("cardio", "baroreflex"): "8481a14970f953c8",
}


def _fingerprint(cohort) -> str:
    h = hashlib.sha256()
    h.update("|".join(cohort.patient_ids).encode())
    for part in (cohort.covariates, cohort.params, cohort.states, cohort.controls):
        for k in sorted(part):
            h.update(k.encode())
            h.update(np.ascontiguousarray(part[k], dtype=np.float64).tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("name", list(SIMS))
def test_plain_care_reproduces_the_cohorts_made_before_routine_care(name):
    sim = SIMS[name]
    got = [_fingerprint(sim.generate(p, 3, DAY, rng=np.random.default_rng(11), care="plain"))
           for p in sim.SITE_PROFILES]
    assert got == PLAIN_FINGERPRINTS[name]


@pytest.mark.parametrize("twin, name", list(PLAIN_CSV_FINGERPRINTS))
def test_a_plain_cohort_on_disk_is_byte_for_byte_the_old_one(tmp_path, twin, name):
    from twinfed.models.cohort import generate_cohort

    generate_cohort(twin, sites=1, patients=3, days=0.25, seed=3, out=tmp_path / "c", simulator=name,
                    care="plain")
    digest = hashlib.sha256((tmp_path / "c" / "site-a" / "timeseries.csv").read_bytes()).hexdigest()[:16]
    assert digest == PLAIN_CSV_FINGERPRINTS[(twin, name)]
