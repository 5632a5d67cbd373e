"""A hospital node's identity and directories, from Flower's node config.

Node config keys (``flower-supernode --node-config``): ``site-name``, ``site-data`` (the export
directory, read only) and ``state-dir`` (the node's own state: later the privacy ledger, keys,
consent registry, approvals and audit log).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from twinfed.errors import TwinfedError
from twinfed.wire import SiteName


class NodeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    site_name: SiteName
    site_data: Path
    state_dir: Path
    # A simulated node (``twinfed simulate``, ``flwr run`` on the simulation engine) may train
    # plans without DP, for labelled baselines; a deployed node never does.
    simulated: bool = False

    @classmethod
    def from_node_config(cls, cfg: dict) -> NodeConfig:
        missing = [k for k in ("site-name", "site-data", "state-dir") if k not in cfg]
        if missing:
            raise TwinfedError(f"node config lacks {', '.join(missing)}; start the SuperNode with "
                               "--node-config 'site-name=... site-data=... state-dir=...'")
        try:
            return cls(site_name=str(cfg["site-name"]), site_data=Path(str(cfg["site-data"])),
                       state_dir=Path(str(cfg["state-dir"])))
        except ValueError:
            raise TwinfedError("node config: site-name must be a plain name (letters, digits, '.', "
                               "'_' or '-', at most 64 characters)") from None

    def ensure_state_dir(self) -> Path:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        return self.state_dir
