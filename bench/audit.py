"""Section 5: ``audit verify`` of a 100,000-entry log (target under 5 s).

The measurement is the governance benchmark's own (:mod:`bench.audit_verify`: a realistic log
of signed round events, verified as ``twinfed audit verify`` does: the whole hash chain and the
newest signature); this module only reports it as figures.
"""

from __future__ import annotations

from bench import audit_verify
from bench.report import figure
from bench.sizes import Sizes
from bench.studies import Workspace

TARGET_SECONDS = 5.0


def run(ws: Workspace, sizes: Sizes) -> dict:
    r = audit_verify.run(sizes.audit_entries)
    cond = {"entries": r["entries"], "log_megabytes": r["megabytes"], "cpu_seconds": r["cpu_seconds"],
            "us_per_entry": r["us_per_entry"],
            "verify": "hash chain of every entry + the newest entry's Ed25519 signature"}
    return {
        "verify_seconds": figure(r["seconds"], "s", target=TARGET_SECONDS, conditions=cond),
        "verify_cpu_seconds": figure(r["cpu_seconds"], "s", conditions=cond | {
            "meaning": "CPU time of the verifying process (wall time grows when other work shares the machine)"}),
    }
