"""Every report of a site's privacy spend is the site's ledger total (`twinfed ledger show`),
broken down by kind of release: summary.json, the site table `twinfed simulate` prints, and the
privacy officer's report (issue 20, item 9).

One tiny calibrated study (3 sites x 25 patients x 3 days, 2 rounds, then the calibration
release) on the real simulation engine, its node states read with the project's own tools.
"""

from __future__ import annotations

import contextlib
import io
import json
from types import SimpleNamespace

import pytest

from twinfed.cli.main import main

pytestmark = [pytest.mark.slow, pytest.mark.studies]

SITES = ("a", "b", "c")


def _run(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> SimpleNamespace:
    from twinfed.models.cohort import generate_cohort

    root = tmp_path_factory.mktemp("reported-spend")
    cohort = root / "cohort"
    generate_cohort("glucose", sites=3, patients=25, days=3, seed=1, out=cohort)
    run = root / "run"
    sites = [a for n in SITES for a in ("--site", f"{n}={cohort / f'site-{n}'}")]
    code, printed = _run(["simulate", "--spec", str(cohort / "spec.toml"), *sites, "--rounds", "2",
                          "--hidden", "8", "--local-steps", "3", "--out", str(run)])
    assert code == 0
    shown = {}
    for site in SITES:
        code, text = _run(["ledger", "show", "--state", str(run / "nodes" / site), "--json"])
        assert code == 0
        shown[site] = json.loads(text)
    return SimpleNamespace(run=run, printed=printed, shown=shown,
                           summary=json.loads((run / "summary.json").read_text()))


def _kinds(by_kind: list[dict]) -> dict[str, dict]:
    return {p["kind"]: p for p in by_kind}


def test_the_ledger_holds_the_rounds_the_counts_and_the_calibration(study):
    """The premise: the calibration release is part of each site's spend."""
    for site in SITES:
        ledger = json.loads((study.run / "nodes" / site / "privacy_ledger.json").read_text())
        assert [s["mechanism"] for s in ledger["segments"]] == \
            ["gaussian-count", "dp-sgd", "dp-sgd", "gaussian-sum"]
        assert study.shown[site]["epsilon_spent"] > study.summary["sites"][site]["privacy"]["epsilon"]


def test_summary_json_reports_each_sites_ledger_total_broken_down_by_kind(study):
    for site in SITES:
        total = study.shown[site]["epsilon_spent"]
        entry = study.summary["sites"][site]
        assert entry["epsilon_spent"] == pytest.approx(total, rel=1e-9)
        assert entry["release"]["spend"] == "dp-released"
        spend = entry["spend"]
        assert spend["epsilon"] == pytest.approx(total, rel=1e-9)
        assert spend["delta"] == study.shown[site]["delta"]
        assert spend["epsilon_budget"] == study.shown[site]["epsilon_budget"]
        kinds = _kinds(spend["by_kind"])
        assert {k: (p["mechanism"], p["releases"]) for k, p in kinds.items() if p["epsilon"] > 0} == {
            "training": ("dp-sgd", 2), "count": ("gaussian-count", 1), "calibration": ("gaussian-sum", 1)}
        assert sum(p["epsilon"] for p in spend["by_kind"]) == pytest.approx(total, rel=1e-9)
        calibration = study.summary["calibration"]["releases"][site]
        assert kinds["calibration"]["epsilon"] == pytest.approx(calibration["epsilon"], rel=1e-9)
        # the study's own figures are kept as they were: this study's epsilon, before calibration
        assert entry["privacy"]["epsilon"] < total


def test_summary_json_is_the_typed_document_and_keeps_every_field_it_had(study):
    from twinfed.outputs import StudySummary

    typed = StudySummary.model_validate(study.summary)
    assert json.loads(typed.to_json()) == study.summary
    assert {"twin", "plan_sha256", "rounds", "rounds_with_update", "skipped_rounds", "strategy", "privacy",
            "model", "sites", "history", "intervals", "model_dir", "seconds", "calibration",
            "engine"} <= set(study.summary)
    for entry in study.summary["sites"].values():
        assert {"patients_used", "patients_excluded", "rounds_joined", "rounds_refused", "refusals",
                "privacy", "release"} <= set(entry)
    for record in study.summary["history"]:
        assert {"round", "sites_trained", "sites_refused", "failures", "update_norm", "skipped",
                "seconds"} <= set(record)


def test_the_printed_site_table_shows_the_ledger_total(study):
    lines = study.printed.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("site "))
    end = lines[header].index(" epsilon ") + len(" epsilon")  # its cells are right-aligned to here
    rows = {line.split()[0]: line[:end].split()[-1] for line in lines[header + 2: header + 2 + len(SITES)]}
    for site in SITES:
        assert float(rows[site]) == pytest.approx(study.shown[site]["epsilon_spent"], abs=0.005)
    # and its breakdown by kind, one line per site
    for site in SITES:
        kinds = _kinds(study.summary["sites"][site]["spend"]["by_kind"])
        line = next(line for line in lines if line.startswith(f"{site}: epsilon "))
        assert f"calibration {kinds['calibration']['epsilon']:.3f}" in line
        assert f"training {kinds['training']['epsilon']:.3f}" in line


def test_the_officers_report_shows_the_ledger_total_and_its_kinds(study):
    from twinfed.governance.report import build_report

    report = build_report(study.run)
    assert report.verification.ok
    by_site = {s.site: s for s in report.sites}
    assert set(by_site) == set(SITES)
    for site in SITES:
        s = by_site[site]
        shown = study.shown[site]
        assert s.epsilon_spent == shown["epsilon_spent"]  # exactly: the same ledger, the same delta
        assert s.spend is not None
        assert s.spend.epsilon == shown["epsilon_spent"] and s.spend.delta == shown["delta"]
        assert s.epsilon_budget == shown["epsilon_budget"]
        kinds = {p.kind: p for p in s.spend.by_kind}
        assert {k: (p.mechanism, p.releases) for k, p in kinds.items() if p.epsilon > 0} == {
            "training": ("dp-sgd", 2), "count": ("gaussian-count", 1), "calibration": ("gaussian-sum", 1)}
        assert sum(p.epsilon for p in s.spend.by_kind) == pytest.approx(shown["epsilon_spent"], rel=1e-9)
        coordinator = _kinds(study.summary["sites"][site]["spend"]["by_kind"])
        for kind in ("training", "count", "calibration"):
            assert kinds[kind].epsilon == pytest.approx(coordinator[kind]["epsilon"], rel=1e-9)


def test_audit_report_prints_each_sites_ledger_total(study, tmp_path):
    code, printed = _run(["audit", "report", str(study.run), "--out", str(tmp_path / "out")])
    assert code == 0
    for site in SITES:
        line = next(line for line in printed.splitlines() if line.startswith(f"{site}: epsilon "))
        assert line.startswith(f"{site}: epsilon {study.shown[site]['epsilon_spent']:.3f} ")


def test_the_officers_html_report_shows_the_same_total_and_kinds(study, tmp_path):
    from test_audit_report import _Page, _site_rows
    from twinfed.governance.report import write_report

    report = write_report(study.run, tmp_path / "out")
    page = _Page()
    page.feed((tmp_path / "out" / "report.html").read_text())
    rows = {r["site"]: r for r in _site_rows(page)}
    for s in report.sites:
        assert rows[s.site]["epsilon spent"] == f"{study.shown[s.site]['epsilon_spent']:.3f}"
        for p in s.spend.by_kind:
            assert f"{p.kind} {p.epsilon:.3f}" in rows[s.site]["spent by kind"]


# -- a trial on the same hospitals: its own kind of release, and one document ---------------------

TRIAL_EPSILON = 2.0


@pytest.fixture(scope="module")
def trial(study, tmp_path_factory) -> SimpleNamespace:
    """`twinfed trial --json` on the study's own nodes (each officer raises the site's budget by
    the trial's epsilon first), then each site's `ledger show` again."""
    from builders import TINY_ARMS

    root = tmp_path_factory.mktemp("reported-spend-trial")
    arms = root / "arms.toml"
    arms.write_text(TINY_ARMS)
    cohort = study.run.parent / "cohort"
    for site in SITES:
        budget = study.shown[site]["epsilon_budget"]
        assert _run(["ledger", "set-budget", "--state", str(study.run / "nodes" / site), "--epsilon",
                     str(budget + TRIAL_EPSILON + 0.5), "--actor", "officer:test"])[0] == 0
    out = root / "trial"
    sites = [a for n in SITES for a in ("--site", f"{n}={cohort / f'site-{n}'}")]
    code, printed = _run(["trial", "--model", str(study.run), "--arms", str(arms), *sites, "--state",
                          str(study.run / "nodes"), "--epsilon", str(TRIAL_EPSILON), "--out", str(out), "--json"])
    assert code == 0
    shown = {site: json.loads(_run(["ledger", "show", "--state", str(study.run / "nodes" / site), "--json"])[1])
             for site in SITES}
    return SimpleNamespace(out=out, printed=printed, shown=shown)


def test_trial_json_and_trial_json_output_are_one_document(trial):
    written = json.loads((trial.out / "trial.json").read_text())
    assert json.loads(trial.printed) == written
    assert written["model"]["kind"] and len(written["model"]["training_plan_sha256"]) == 64


def test_a_trials_report_gives_each_sites_ledger_total_with_the_trials_part(trial):
    written = json.loads((trial.out / "trial.json").read_text())
    for site in SITES:
        total = trial.shown[site]["epsilon_spent"]
        entry = written["sites"][site]
        assert entry["epsilon_spent"] == pytest.approx(total, rel=1e-9)
        kinds = _kinds(entry["spend"]["by_kind"])
        assert set(kinds) == {"earlier", "trial"} and kinds["trial"]["mechanism"] == "gaussian-sum"
        assert kinds["trial"]["epsilon"] == pytest.approx(written["privacy"]["sites"][site]["epsilon"], rel=1e-9)
        assert sum(p["epsilon"] for p in entry["spend"]["by_kind"]) == pytest.approx(total, rel=1e-9)


def test_the_officers_report_tells_a_trial_from_a_calibration(trial, study):
    from twinfed.governance.report import build_report

    for s in build_report(study.run).sites:
        assert s.epsilon_spent == trial.shown[s.site]["epsilon_spent"]
        kinds = {p.kind: p for p in s.spend.by_kind}
        assert {k: (p.mechanism, p.releases) for k, p in kinds.items()} == {
            "training": ("dp-sgd", 2), "count": ("gaussian-count", 1), "calibration": ("gaussian-sum", 1),
            "trial": ("gaussian-sum", 1)}
        assert sum(p.epsilon for p in s.spend.by_kind) == pytest.approx(s.epsilon_spent, rel=1e-9)
