"""A federated in-silico trial on a real consortium on loopback: `twinfed trial --engine deployment`
starts a SuperLink and three SuperNodes (TLS, node authentication), runs the trial through
SecAgg+ and stops every process. As in tests/test_deploy_consortium.py, each Flower message
starts a fresh flwr-clientapp process (seconds of imports), so the cohort and the trial are tiny,
and the twin is pretrained (no study) to keep the test to one trial.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from builders import TINY_ARMS
from twinfed.cli.main import main

pytestmark = [pytest.mark.deploy, pytest.mark.slow]

SITES = ("site-a", "site-b", "site-c")
ARMS = TINY_ARMS


def _processes_naming(path: Path) -> list[int]:
    """Processes still running whose command line names ``path``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(path) in cmdline:
            found.append(int(proc.name))
    return found


def test_a_trial_runs_on_a_deployed_consortium_and_its_logs_verify(tmp_path):
    from twinfed.governance.verify import verify_path
    from twinfed.models.cohort import generate_cohort

    cohort = tmp_path / "cohort"
    generate_cohort("glucose", sites=3, patients=20, days=3, seed=2, out=cohort)
    assert main(["pretrain", "--spec", str(cohort / "spec.toml"), "--cohort", str(cohort),
                 "--out", str(tmp_path / "twin"), "--steps", "10", "--hidden", "8"]) == 0
    arms = tmp_path / "arms.toml"
    arms.write_text(ARMS)
    out = (tmp_path / "trial").resolve()
    sites = [a for n in SITES for a in ("--site", f"{n}={cohort / n}")]
    t0 = time.perf_counter()
    code = main(["trial", "--model", str(tmp_path / "twin"), "--arms", str(arms), *sites,
                 "--engine", "deployment", "--out", str(out), "--json"])
    print(f"\n[timing] deployed trial, 3 nodes: {time.perf_counter() - t0:.1f} s")
    assert code == 0

    report = json.loads((out / "trial.json").read_text())
    assert report["sites_released"] == 3 and report["n_patients"] > 0
    assert sorted(report["privacy"]["sites"]) == list(SITES)
    assert set(report["arms"]) == {"usual-care", "ratio-10"} and set(report["contrasts"]) == {"ratio-10"}
    for result in [*(a["outcomes"] for a in report["arms"].values()), *report["contrasts"].values()]:
        for outcome in ("time_in_range", "mean_glucose"):
            lo, hi = result[outcome]["ci95"]
            assert lo <= result[outcome]["mean"] <= hi
    for name in SITES:
        segments = json.loads((out / "nodes" / name / "privacy_ledger.json").read_text())["segments"]
        assert [(s["mechanism"], s["plan_sha256"]) for s in segments] == [("gaussian-sum", report["plan_sha256"])]
    verified = verify_path(out)
    assert verified.ok, verified.issues
    assert verified.anchors_checked > 0
    # The SuperLink's and the SuperNodes' logs name no patient, and no process outlives the trial.
    logs = "\n".join(p.read_text(errors="replace") for p in (out / "deploy" / "logs").glob("*.log"))
    ids = {line.split(",")[0] for n in SITES
           for line in (cohort / n / "patients.csv").read_text().splitlines()[1:] if line}
    assert ids and not [i for i in ids if i in logs]
    assert not _processes_naming(out / "deploy")
