"""Coordinators' entry points under bad input: one line, exit 1, nothing written or overwritten."""

import json

import pytest

from builders import write_site
from twinfed.cli.main import main


def _err(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.fixture
def sites(tmp_path):
    return [write_site(tmp_path / "data" / n, n_patients=4, n_steps=60, seed=i) for i, n in enumerate("abc")]


@pytest.mark.parametrize("name", ["../../x", "/abs/path", "../coordinator", "a b", "x" * 65])
def test_a_site_name_that_is_not_a_plain_name_is_refused_before_anything_is_written(sites, tmp_path, capsys, name):
    code = main(["simulate", "--spec", "glucose", "--site", f"{name}={sites[0]}", "--site", f"b={sites[1]}",
                 "--site", f"c={sites[2]}", "--out", str(tmp_path / "run")])
    err = _err(capsys)
    assert code == 1 and len(err) == 1 and "plain name" in err[0]
    assert not (tmp_path / "run").exists() and not (tmp_path / "x").exists() and not (tmp_path.parent / "x").exists()


def test_a_run_is_never_overwritten(sites, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "summary.json").write_text('{"rounds": 7}')
    args = [a for i, d in enumerate(sites) for a in ("--site", f"{'abc'[i]}={d}")]
    assert main(["simulate", "--spec", "glucose", *args, "--out", str(run)]) == 1
    err = _err(capsys)
    assert len(err) == 1 and "never overwritten" in err[0]
    assert json.loads((run / "summary.json").read_text()) == {"rounds": 7}


@pytest.mark.parametrize("command", [["simulate"], ["cohort", "generate", "--twin", "glucose"]])
def test_an_output_that_is_a_file_is_refused(tmp_path, capsys, command):
    target = tmp_path / "taken"
    target.write_text("keep me")
    assert main([*command, "--out", str(target)]) == 1
    assert len(_err(capsys)) == 1 and target.read_text() == "keep me"


@pytest.mark.parametrize("flag, value", [("--clip", "inf"), ("--epsilon", "nan"), ("--delta", "nan"),
                                         ("--lr", "nan"), ("--lr", "inf")])
def test_every_numeric_setting_must_be_finite(tmp_path, capsys, flag, value):
    assert main(["simulate", flag, value, "--out", str(tmp_path / "run")]) == 1
    err = _err(capsys)
    assert len(err) == 1 and f"{flag}: must be a finite number" in err[0]
    assert not (tmp_path / "run").exists()  # checked before any cohort is generated


@pytest.mark.parametrize("args, words", [(["--seed", "-1"], "--seed"), (["--days", "1e-9"], "shorter than one step"),
                                         (["--days", "inf"], "--days"), (["--days", "1e15"], "--days"),
                                         (["--sites", "0"], "--sites"), (["--patients", "-3"], "--patients")])
def test_cohort_sizes_out_of_range_are_one_line(tmp_path, capsys, args, words):
    assert main(["cohort", "generate", "--twin", "glucose", *args, "--out", str(tmp_path / "c")]) == 1
    err = _err(capsys)
    assert len(err) == 1 and words in err[0] and not (tmp_path / "c").exists()


def test_a_cohort_is_never_overwritten_unless_forced_and_force_replaces_only_a_cohort(tmp_path, capsys):
    out = tmp_path / "c"
    small = ["cohort", "generate", "--twin", "glucose", "--sites", "1", "--patients", "2", "--days", "0.5"]
    assert main([*small, "--seed", "1", "--out", str(out)]) == 0
    before = (out / "site-a" / "timeseries.csv").read_bytes()
    capsys.readouterr()
    assert main([*small, "--seed", "2", "--out", str(out)]) == 1
    assert "never overwritten" in _err(capsys)[0] and (out / "site-a" / "timeseries.csv").read_bytes() == before
    assert main([*small, "--seed", "2", "--out", str(out), "--force"]) == 0
    assert (out / "site-a" / "timeseries.csv").read_bytes() != before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial or old copy left
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("x")
    capsys.readouterr()
    assert main([*small, "--out", str(other), "--force"]) == 1
    assert (other / "mine.txt").read_text() == "x"


def test_a_cohort_that_cannot_be_written_leaves_nothing(tmp_path, capsys, monkeypatch):
    import errno

    import twinfed.models.cohort as cohort

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cohort, "write_truth", full)
    assert main(["cohort", "generate", "--twin", "glucose", "--sites", "1", "--patients", "2", "--days", "0.5",
                 "--out", str(tmp_path / "c")]) == 1
    err = _err(capsys)
    assert len(err) == 1 and "No space left" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_approving_a_plan_without_dp_or_secagg_says_so_loudly(tmp_path, capsys):
    from twinfed.governance.node_state import init_node
    from twinfed.models.plan import PrivacyConfig, TrainingPlan
    from twinfed.models.spec import load_spec

    init_node(tmp_path / "state", site_name="a")
    plan = TrainingPlan(spec=load_spec("glucose"), rounds=2,
                        privacy=PrivacyConfig(enabled=False, secure_aggregation=False))
    (tmp_path / "plan.json").write_text(plan.model_dump_json())
    capsys.readouterr()
    assert main(["plan", "approve", "--state", str(tmp_path / "state"), "--plan", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert "NO differential privacy" in out
    assert "WARNING: DIFFERENTIAL PRIVACY IS OFF" in out and "WARNING: SECURE AGGREGATION IS OFF" in out
