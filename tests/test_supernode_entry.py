"""twinfed-supernode: Flower's own SuperNode, with its idle waits capped, and nothing else."""

from __future__ import annotations

import subprocess
import sys
import time
import types

import pytest

from twinfed.deploy import supernode


def _flower_like(tmp_path, source_waits: str):
    """A module shaped like flwr's start_client_internal (its source holds the waits)."""
    mod = types.ModuleType("fake_start_client_internal")
    code = f"import time\ndef loop():\n    {source_waits}\n"
    path = tmp_path / "fake_start_client_internal.py"
    path.write_text(code)
    mod.__file__ = str(path)
    exec(compile(code, str(path), "exec"), mod.__dict__)
    return mod


def test_the_real_supernode_loops_waits_are_capped_and_nothing_else_changes():
    from flwr.supernode import start_client_internal as sci

    original = sci.time
    try:
        supernode.cap_supernode_waits(0.05)
        t0 = time.monotonic()
        sci.time.sleep(3)  # the loop's idle wait
        assert time.monotonic() - t0 < 1.0
        assert sci.time.time is time.time  # every other use of time is the real one
        supernode.cap_supernode_waits(0.05)  # idempotent
    finally:
        sci.time = original


def test_a_flower_whose_loop_changed_is_refused_with_what_to_run_instead(tmp_path):
    mod = _flower_like(tmp_path, "time.sleep(5)")
    with pytest.raises(supernode.PullIntervalError, match="run flower-supernode instead"):
        supernode.cap_supernode_waits(0.25, module=mod)
    assert mod.time is time


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), 10.0])
def test_the_pull_interval_must_be_sensible(bad, tmp_path):
    with pytest.raises(supernode.PullIntervalError, match="between 0.01 and 3"):
        supernode.cap_supernode_waits(bad, module=_flower_like(tmp_path, "time.sleep(3); time.sleep(0.5)"))


def test_every_other_argument_is_flower_supernodes():
    cap, rest = supernode.parse_args(["--pull-interval", "0.5", "--superlink", "h:1", "--insecure"])
    assert cap == 0.5 and rest == ["--superlink", "h:1", "--insecure"]
    cap, rest = supernode.parse_args(["--superlink", "h:1"])
    assert cap == supernode.DEFAULT_PULL_INTERVAL_S


def test_a_bad_pull_interval_is_one_line_and_exit_2():
    cp = subprocess.run([sys.executable, "-m", "twinfed.deploy.supernode", "--pull-interval", "0"],
                        capture_output=True, text=True, timeout=120)
    assert cp.returncode == 2
    assert cp.stderr.strip().count("\n") == 0 and "--pull-interval" in cp.stderr
