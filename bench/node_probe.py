"""One hospital node's round in a process of its own, reporting its peak memory (a child of
``bench.scale``; run as ``python -m bench.node_probe round|load SITE_DIR STATE_DIR SPEC``).

``round``: what a node does for one round of the default plan: the governance gate (state,
approval, audit), load and validate the site, keep consented patients, calibrate the noise, check
the ledger, DP-train, record the spend. ``load``: only load and validate the site, to tell how
much of the peak is the data. Prints one JSON line; the peak is the process's maximum resident
set size (Linux ``VmHWM``: this process's own high-water mark; ``getrusage``'s ``ru_maxrss``
would also count the parent's memory copied at fork), the interpreter and libraries included.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

GIB = 2**30


def _peak_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main(argv: list[str]) -> dict:
    mode, site_dir, state_dir, spec_path = argv
    import numpy as np  # noqa: F401  (the libraries a node loads, before the baseline)
    import opacus  # noqa: F401
    import torch

    from twinfed.client.node import NodeConfig
    from twinfed.models.plan import TrainingPlan
    from twinfed.models.site_data import load_site
    from twinfed.models.spec import load_spec

    torch.set_num_threads(1)
    spec = load_spec(spec_path)
    baseline = _peak_bytes()
    t0 = time.perf_counter()
    out: dict = {"mode": mode}
    if mode == "load":
        site = load_site(Path(site_dir), spec)
        out |= {"patients": site.n_patients, "rows": site.n_rows}
    elif mode == "round":
        from twinfed.client.gate import serve
        from twinfed.governance.provision import provision_simulated_node
        from twinfed.models.surrogate import build_surrogate, get_weights
        from twinfed.privacy.secagg import SecAggView
        from twinfed.wire import RoundInstruction

        plan = TrainingPlan(spec=spec, rounds=20)
        node = NodeConfig(site_name=Path(site_dir).name, site_data=Path(site_dir).resolve(),
                          state_dir=Path(state_dir).resolve())
        provision_simulated_node(node.state_dir, site_name=node.site_name, site_data=node.site_data,
                                 plan=plan, operator="operator:twinfed-bench")
        weights = get_weights(build_surrogate(spec, plan.model, seed=plan.seed))
        instruction = RoundInstruction(plan_json=plan.canonical_json(), plan_sha256=plan.sha256(), round=1)
        t0 = time.perf_counter()
        result = serve(node, instruction.to_config(), weights,
                             secagg=SecAggView(masked=True, sampled=3, shares=3, threshold=2))
        if result.reply.status != "ok":
            raise SystemExit(f"the node refused the round: {result.reply.refusal}")
        out |= {"steps": result.reply.released.steps}
    else:
        raise SystemExit(f"unknown probe {mode!r}")
    out |= {"seconds": round(time.perf_counter() - t0, 2), "baseline_gib": baseline / GIB,
            "peak_gib": _peak_bytes() / GIB}
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
