"""``twinfed ledger``: the privacy officer's view and repair of a node's privacy ledger."""

from __future__ import annotations

import json
from pathlib import Path

from twinfed.cli.governance import _actor_arg, _officer
from twinfed.ledger_file import DEFAULT_DELTA


def register(sub) -> None:
    ledger = sub.add_parser("ledger", help="privacy officer: a node's privacy ledger (budget and spending)")
    lsub = ledger.add_subparsers(dest="ledger_command", metavar="COMMAND", required=True)
    show = lsub.add_parser("show", help="budget, spending per study, and whether the ledger matches the log",
                           description="The site's budget, an (epsilon, delta) pair, and every DP release "
                                       "it made, with epsilon recomputed at the budget's delta (or at "
                                       "--delta, to inspect), and whether privacy_ledger.json agrees "
                                       "with the signed audit log. Exit 1 when they disagree.")
    show.add_argument("--state", type=Path, required=True, help="the node's state directory")
    show.add_argument("--delta", type=float,
                      help="evaluate epsilon at this delta instead of the budget's (inspection only)")
    show.add_argument("--json", action="store_true", help="print the figures as JSON")
    show.set_defaults(func=cmd_ledger_show)
    rb = lsub.add_parser("rebuild", help="rewrite privacy_ledger.json from the signed audit log",
                         description="After a crash between the log and the ledger, or a lost or "
                                     "edited ledger: the ledger is rebuilt from the log's "
                                     "privacy_budget_set and privacy_spent events; audited.")
    rb.add_argument("--state", type=Path, required=True, help="the node's state directory")
    _actor_arg(rb)
    rb.set_defaults(func=cmd_ledger_rebuild)
    sb = lsub.add_parser("set-budget", help="set the site's privacy budget (never below what it spent)",
                         description="Set the site's budget for all releases, epsilon and delta "
                                     "together, e.g. raise epsilon for a new study; audited before it "
                                     "takes effect. Every release is checked at the budget's delta; "
                                     "a plan asking for a larger delta is refused.")
    sb.add_argument("--state", type=Path, required=True, help="the node's state directory")
    sb.add_argument("--epsilon", type=float, required=True, help="the new budget's epsilon")
    sb.add_argument("--delta", type=float,
                    help="the new budget's delta (default: keep the current one; 1e-5 for a new ledger)")
    _actor_arg(sb)
    sb.set_defaults(func=cmd_ledger_set_budget)


def _delta(args) -> float | None:
    """``--delta``, checked; None when not given."""
    if args.delta is not None:
        from twinfed.errors import TwinfedError

        if not 0 < args.delta < 1:
            raise TwinfedError("--delta must be a number between 0 and 1")
    return args.delta


def cmd_ledger_show(args) -> int:
    from twinfed.cli.table import format_table
    from twinfed.governance.layout import read_info, verified_entries
    from twinfed.ledger_file import LedgerState, disagreement, ledger_from_log, read_ledger
    from twinfed.privacy.ledger import epsilon_of

    read_info(args.state)
    entries = verified_entries(args.state)
    state = read_ledger(args.state)
    why = disagreement(state, ledger_from_log(entries))
    delta_budget = state.delta_budget if isinstance(state, LedgerState) else None
    delta = _delta(args) or delta_budget or (state.delta if state is not None else DEFAULT_DELTA)
    segments = list(state.segments) if state is not None else []
    accountant = state.accountant if state is not None else "rdp"
    studies: dict[str, list] = {}
    for s in segments:
        studies.setdefault(s.plan_sha256, []).append(s)
    data = {
        "state": str(args.state), "matches_audit_log": why is None, "disagreement": why,
        "format": 2 if isinstance(state, LedgerState) else 1 if state else None,
        "epsilon_budget": state.epsilon_budget if state else None, "delta_budget": delta_budget,
        "accountant": accountant, "delta": delta, "epsilon_spent": epsilon_of(segments, delta, accountant),
        "studies": [{"plan_sha256": sha, "releases": len(segs),
                     "rounds": sorted({s.round for s in segs if s.mechanism == "dp-sgd"}),
                     "epsilon": epsilon_of(segs, delta, accountant)} for sha, segs in studies.items()],
    }
    if args.json:
        print(json.dumps(data, indent=2))
        return 0 if why is None else 1
    if state is None:
        print("no privacy ledger: this node has made no DP release")
    else:
        at = f"delta {delta_budget:g}" if delta_budget is not None else "no delta (old format)"
        print(f"budget: epsilon {state.epsilon_budget:g} at {at} ({accountant}); "
              f"spent {data['epsilon_spent']:.3f} at delta {delta:.2g}")
        if studies:
            print(format_table(["plan", "releases", "rounds", "epsilon"],
                               [[st["plan_sha256"][:16], st["releases"], len(st["rounds"]), st["epsilon"]]
                                for st in data["studies"]]))
    print("ledger matches the signed audit log" if why is None else f"MISMATCH: {why}")
    return 0 if why is None else 1


def cmd_ledger_rebuild(args) -> int:
    from twinfed.governance.layout import read_info
    from twinfed.privacy.ledger import rebuild_ledger

    read_info(args.state)
    state = rebuild_ledger(args.state, actor=_officer(args))
    print(f"rebuilt {args.state}/privacy_ledger.json from the audit log: budget epsilon "
          f"{state.epsilon_budget:g} at delta {state.delta_budget:g}, {len(state.segments)} release(s)")
    return 0


def cmd_ledger_set_budget(args) -> int:
    import math

    from twinfed.errors import TwinfedError
    from twinfed.governance.layout import read_info
    from twinfed.privacy.ledger import set_budget

    read_info(args.state)
    if not math.isfinite(args.epsilon) or args.epsilon <= 0:
        raise TwinfedError("--epsilon must be a finite number above 0")
    state = set_budget(args.state, args.epsilon, actor=_officer(args), delta=_delta(args))
    print(f"the site's budget is now epsilon {state.epsilon_budget:g} at delta {state.delta_budget:g} "
          f"({len(state.segments)} release(s) already counted)")
    return 0
