"""Officers' commands run at once in separate processes: no withdrawal, revocation or approval is lost.

Each command is a real ``twinfed`` process. All of them are started, import everything, and wait
at a barrier; only when every one is ready are they released together, so their
read-modify-writes of the same state really overlap.
"""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from audit_builders import T0
from twinfed.errors import PlanNotApproved
from twinfed.governance.approvals import approve_plan, list_approvals, require_approved
from twinfed.governance.audit_log import read_entries
from twinfed.governance.consent_registry import granted_patients, patient_status
from twinfed.governance.layout import state_paths
from twinfed.governance.node_state import init_node
from twinfed.governance.verify import verify_path
from twinfed.models.plan import TrainingPlan
from twinfed.models.spec import load_spec

PURPOSE = "twin-training"

# Imports first, then the barrier, then one CLI call: the race is the command itself.
_RUNNER = """\
import sys, time
from pathlib import Path
import twinfed.cli.governance, twinfed.governance.approvals, twinfed.governance.consent_registry
from twinfed.cli.main import main
ready, go = Path(sys.argv[1]), Path(sys.argv[2])
ready.touch()
while not go.exists():
    time.sleep(0.002)
sys.exit(main(sys.argv[3:]))
"""


def _run_together(tmp_path: Path, commands: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """Run every ``twinfed`` command in its own process, released at once; their results."""
    go = tmp_path / "go"
    procs = []
    for i, argv in enumerate(commands):
        procs.append((tmp_path / f"ready-{i}", subprocess.Popen(
            [sys.executable, "-c", _RUNNER, str(tmp_path / f"ready-{i}"), str(go), *argv],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    deadline = time.monotonic() + 30
    while not all(ready.exists() for ready, _ in procs):
        assert all(p.poll() is None for _, p in procs), "a command exited before the barrier"
        assert time.monotonic() < deadline, "the commands did not start in time"
        time.sleep(0.01)
    go.touch()
    results = []
    for _, p in procs:
        out, err = p.communicate(timeout=60)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


def _events(state: Path) -> list[str]:
    import json

    lines, _ = read_entries(state_paths(state).audit)
    return [json.loads(line)["event"] for line in lines]


def _node_with_consent(tmp_path: Path, n: int) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    (site / "consent.csv").write_text("patient_id,status,purpose,recorded_at\n" + "".join(
        f"p{i},granted,{PURPOSE},2026-01-01T00:00:00Z\n" for i in range(n)))
    init_node(tmp_path / "state", site_data=site, at=T0)
    return tmp_path / "state"


def test_ten_parallel_withdrawals_all_take_effect(tmp_path):
    state = _node_with_consent(tmp_path, 10)
    results = _run_together(tmp_path, [
        ["consent", "withdraw", "--state", str(state), "--patient", f"p{i}", "--purpose", PURPOSE,
         "--actor", "officer:o"] for i in range(10)])
    assert [r.returncode for r in results] == [0] * 10, [r.stderr for r in results]
    assert granted_patients(state, PURPOSE) == set()
    assert all(patient_status(state, f"p{i}") == {PURPOSE: "withdrawn"} for i in range(10))
    assert _events(state).count("consent_changed") == 10
    assert verify_path(state).ok


def test_seven_parallel_revocations_all_take_effect(tmp_path):
    init_node(tmp_path / "state", site_name="a", at=T0)
    state = tmp_path / "state"
    plans = [TrainingPlan(spec=load_spec("glucose"), rounds=r) for r in range(1, 8)]
    for plan in plans:
        approve_plan(state, plan, actor="officer:o")
    results = _run_together(tmp_path, [
        ["plan", "revoke", "--state", str(state), "--sha", plan.sha256(), "--actor", "officer:o"]
        for plan in plans])
    assert [r.returncode for r in results] == [0] * 7, [r.stderr for r in results]
    assert [a.active for a in list_approvals(state)] == [False] * 7
    for plan in plans:
        with pytest.raises(PlanNotApproved, match="was revoked"):
            require_approved(state, plan.sha256())
    assert _events(state).count("plan_revoked") == 7
    assert verify_path(state).ok


def test_parallel_approvals_grants_and_an_import_all_land(tmp_path):
    state = _node_with_consent(tmp_path, 2)
    plans = [TrainingPlan(spec=load_spec("glucose"), rounds=r) for r in range(1, 4)]
    for i, plan in enumerate(plans):
        (tmp_path / f"plan-{i}.json").write_text(plan.canonical_json())
    (tmp_path / "more.csv").write_text("patient_id,status,purpose,recorded_at\n"
                                       f"q0,granted,{PURPOSE},2026-01-02T00:00:00Z\n")
    results = _run_together(tmp_path, [
        *(["plan", "approve", "--state", str(state), "--plan", str(tmp_path / f"plan-{i}.json"),
           "--actor", "officer:o"] for i in range(3)),
        *(["consent", "grant", "--state", str(state), "--patient", f"n{i}", "--purpose", PURPOSE,
           "--actor", "officer:o"] for i in range(3)),
        ["consent", "import", "--state", str(state), "--site-data", str(tmp_path / "more.csv"),
         "--actor", "officer:o"]])
    assert [r.returncode for r in results] == [0] * 7, [r.stderr for r in results]
    assert {a.sha256 for a in list_approvals(state) if a.active} == {p.sha256() for p in plans}
    assert granted_patients(state, PURPOSE) == {"p0", "p1", "q0", "n0", "n1", "n2"}
    for plan in plans:
        assert require_approved(state, plan.sha256()) == plan
    assert verify_path(state).ok
