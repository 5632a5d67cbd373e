"""A site's spend broken down by kind of release: each kind's part is what its releases added to
the site's total in ledger order, so the parts sum to the total (twinfed.outputs.attribute), and
the officer's report names a Gaussian sum a calibration or a trial from the node's own entries."""

from types import SimpleNamespace

import pytest

from twinfed.governance.report import _kind, _release_kinds
from twinfed.ledger_file import Segment
from twinfed.outputs import attribute
from twinfed.privacy.ledger import epsilon_of

STUDY, TRIAL = "a" * 64, "b" * 64


def _segments():
    return [
        ("count", Segment(sample_rate=1.0, noise_multiplier=20.0, steps=1, plan_sha256=STUDY, round=0,
                          mechanism="gaussian-count")),
        *[("training", Segment(sample_rate=0.1, noise_multiplier=1.2, steps=5, plan_sha256=STUDY, round=r,
                               mechanism="dp-sgd")) for r in (1, 2, 3)],
        ("calibration", Segment(sample_rate=1.0, noise_multiplier=3.0, steps=1, plan_sha256=STUDY, round=4,
                                mechanism="gaussian-sum")),
        ("trial", Segment(sample_rate=1.0, noise_multiplier=2.0, steps=1, plan_sha256=TRIAL, round=1,
                          mechanism="gaussian-sum")),
    ]


def test_the_parts_by_kind_sum_to_the_total_and_each_is_what_its_releases_added():
    labelled = _segments()
    eps = lambda segs: epsilon_of(segs, 1e-5)  # noqa: E731
    parts = {p.kind: p for p in attribute(labelled, eps)}
    total = eps([s for _k, s in labelled])
    assert sum(p.epsilon for p in parts.values()) == pytest.approx(total, rel=1e-12)
    assert [(k, parts[k].mechanism, parts[k].releases) for k in parts] == [
        ("training", "dp-sgd", 3), ("count", "gaussian-count", 1), ("calibration", "gaussian-sum", 1),
        ("trial", "gaussian-sum", 1)]
    segs = [s for _k, s in labelled]
    assert parts["count"].epsilon == pytest.approx(eps(segs[:1]), rel=1e-12)
    assert parts["trial"].epsilon == pytest.approx(total - eps(segs[:-1]), rel=1e-12)
    assert all(p.epsilon > 0 for p in parts.values())


def test_a_kind_released_twice_apart_is_counted_once_with_both_parts():
    a, b = Segment(sample_rate=1.0, noise_multiplier=3.0, steps=1, mechanism="gaussian-sum"), \
        Segment(sample_rate=0.2, noise_multiplier=1.0, steps=4)
    eps = lambda segs: epsilon_of(segs, 1e-5)  # noqa: E731
    parts = {p.kind: p for p in attribute([("trial", a), ("training", b), ("trial", a)], eps)}
    assert parts["trial"].releases == 2
    assert parts["trial"].epsilon + parts["training"].epsilon == pytest.approx(eps([a, b, a]), rel=1e-12)


def test_the_report_tells_a_calibration_from_a_trial_by_the_nodes_entries():
    def entry(event, **details):
        return SimpleNamespace(event=event, details=details)

    segs = dict((k, s) for k, s in _segments())
    released = _release_kinds([entry("study_calibrated", plan_sha256=STUDY),
                               entry("aggregate_released", plan_sha256=TRIAL, round=1, kind="trial"),
                               entry("aggregate_released", plan_sha256=STUDY, round=4, kind="calibration")])
    assert {k: _kind(s, released) for k, s in segs.items()} == {k: k for k in segs}
    # charged but never released (a crash in between): a study's plan still says calibration
    calibrated_only = _release_kinds([entry("study_calibrated", plan_sha256=STUDY)])
    assert _kind(segs["calibration"], calibrated_only) == "calibration"
    assert _kind(segs["trial"], calibrated_only) == "trial"
