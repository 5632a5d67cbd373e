"""The ``twinfed`` command: one entry point, a sub-command group per task and role.

Errors the user can act on (:class:`TwinfedError`) print as one line on stderr with exit code 1;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys

from twinfed.errors import TwinfedError

DESCRIPTION = """\
Federated, privacy-preserving training of patient digital twins.

hospital IT:       data validate, cohort generate (virtual data for trials),
                   deploy node-key (the node's authentication key for a real consortium),
                   node init, consent import (a node's governance state)
privacy officers:  plan show|approve|revoke|list, consent grant|withdraw|status,
                   audit verify|show|report, ledger show|rebuild|set-budget
coordinators:      simulate (a whole study on one machine), demo,
                   deploy certs (TLS for a real consortium), deploy local (real Flower processes),
                   trial --site (an in-silico trial across hospitals, DP aggregates only)
privacy officers:  plan show|approve of a trial plan (trial --write-plan)
everyone:          evaluate, whatif, calibrate (use a trained twin),
                   trial --data (an in-silico trial on one machine's patients)
"""


def build_parser() -> argparse.ArgumentParser:
    from twinfed.cli import data, deploy, governance, ledger, study, trial, twin

    parser = argparse.ArgumentParser(prog="twinfed", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    data.register(sub)
    study.register(sub)
    twin.register(sub)
    trial.register(sub)
    governance.register(sub)
    ledger.register(sub)
    deploy.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except TwinfedError as exc:
        if args.debug:
            raise
        print(f"twinfed: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("twinfed: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
