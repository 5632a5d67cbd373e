"""The compose file and systemd units use the flags `twinfed deploy local` runs and tests.

They cannot be run here (no container runtime, no systemd); this keeps them in step with
twinfed/deploy/flower.py, where the tested command lines are built.
"""

import re
from pathlib import Path

import pytest
import yaml

from twinfed.deploy import flower

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def flags(argv):
    return {a for a in argv if a.startswith("--")}


SUPERLINK_FLAGS = flags(flower.superlink_argv(
    tls=flower.TlsFiles(Path("ca"), Path("crt"), Path("key")), database=Path("db"), host="h",
    port=1))
SUPERNODE_FLAGS = flags(flower.supernode_argv(superlink="l:1", ca_cert=Path("ca"),
                                              auth_key=Path("k"), node_config="c", port=2))


def exec_start(unit: Path) -> str:
    text = unit.read_text().replace("\\\n", " ")
    return re.search(r"^ExecStart=(.*)$", text, re.M).group(1)


@pytest.mark.parametrize("service, expected", [("superlink", SUPERLINK_FLAGS),
                                               ("supernode", SUPERNODE_FLAGS)])
def test_compose_services_use_the_tested_flags(service, expected):
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    command = compose["services"][service]["command"]
    assert command[0] == {"superlink": "flower-superlink", "supernode": "twinfed-supernode"}[service]
    assert flags(command) == expected


@pytest.mark.parametrize("unit, expected", [("twinfed-superlink.service", SUPERLINK_FLAGS),
                                            ("twinfed-supernode@.service", SUPERNODE_FLAGS)])
def test_systemd_units_use_the_tested_flags(unit, expected):
    line = exec_start(DEPLOY / "systemd" / unit)
    assert set(re.findall(r"(?<!\S)--[a-z-]+", line)) == expected


def test_node_config_names_the_keys_the_client_reads():
    for text in [(DEPLOY / "compose.yaml").read_text(),
                 exec_start(DEPLOY / "systemd" / "twinfed-supernode@.service")]:
        assert all(k in text for k in ("site-name=", "site-data=", "state-dir="))


def test_a_missing_flower_binary_is_a_one_line_error(tmp_path):
    from twinfed.deploy.processes import DeployError

    with pytest.raises(DeployError, match=r"flower-superlink.* not found on PATH") as err:
        flower.check_binaries({"PATH": str(tmp_path)})
    assert "\n" not in str(err.value)


def test_every_asset_turns_flower_telemetry_off():
    assert flower.flower_env(Path("/tmp/flwr"), base={})["FLWR_TELEMETRY_ENABLED"] == "0"
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    for service in compose["services"].values():
        assert service["environment"]["FLWR_TELEMETRY_ENABLED"] == "0"
    for unit in (DEPLOY / "systemd").glob("*.service"):
        assert "Environment=FLWR_TELEMETRY_ENABLED=0" in unit.read_text()


def test_every_node_asset_polls_for_messages_promptly():
    """A SecAgg+ round sends four messages to every node; the SuperExec's default 1 s poll
    would add up to a second to each of them."""
    env = flower.flower_env(Path("/tmp/flwr"), base={})
    assert env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == flower.TASK_POLL_INTERVAL_S
    assert float(flower.TASK_POLL_INTERVAL_S) <= 0.1
    assert flower.flower_env(Path("/tmp/flwr"), base={"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "2"})[
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == "2"  # an operator's choice wins
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert compose["services"]["supernode"]["environment"]["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == \
        flower.TASK_POLL_INTERVAL_S
    unit = (DEPLOY / "systemd" / "twinfed-supernode@.service").read_text()
    assert f"Environment=FLWR_SUPEREXEC_TASK_POLL_INTERVAL={flower.TASK_POLL_INTERVAL_S}" in unit
