"""Governance needs no torch: a node's gate and the officer's tools start fast in a fresh process."""

import subprocess
import sys


def test_governance_imports_neither_torch_nor_flower_nor_opacus():
    code = ("import sys\n"
            "import twinfed.governance.approvals, twinfed.governance.consent_registry, "
            "twinfed.governance.node_state, twinfed.governance.verify, twinfed.governance.report, "
            "twinfed.cli.governance\n"
            "print(sorted(m for m in ('torch', 'flwr', 'opacus', 'numpy', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
