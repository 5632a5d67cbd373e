"""``twinfed deploy``: certificates and node keys for a real consortium, and a local one.

See deploy/README.md for the runbook (coordinator and hospital IT).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from twinfed.errors import TwinfedError


def register(sub) -> None:
    from twinfed.cli.study import _study_flags

    dep = sub.add_parser("deploy", help="coordinator and hospital IT: TLS certificates, node keys, "
                                        "a local consortium of real Flower processes",
                         description="Run a real consortium with Flower's SuperLink and SuperNodes "
                                     "(TLS, node authentication). Runbook: deploy/README.md.")
    dsub = dep.add_subparsers(dest="deploy_command", metavar="COMMAND", required=True)

    certs = dsub.add_parser("certs", help="coordinator: consortium CA and SuperLink certificate",
                            description="Write DIR/ca.crt (give it to every hospital), DIR/ca.key "
                                        "(keep offline), DIR/superlink.crt and DIR/superlink.key "
                                        "(keys 0600). An existing CA in DIR is reused.")
    certs.add_argument("--out", type=Path, required=True, metavar="DIR")
    certs.add_argument("--host", action="append", default=[], metavar="NAME",
                       help="a DNS name or IP address nodes dial to reach the SuperLink; repeat "
                            "(localhost and 127.0.0.1 are always included)")
    certs.add_argument("--force", action="store_true",
                       help="replace an existing SuperLink key and certificate")
    certs.set_defaults(func=cmd_certs)

    key = dsub.add_parser("node-key", help="hospital IT: a SuperNode authentication key pair",
                          description="Write DIR/supernode-auth.key (private, 0600: stays on the "
                                      "node) and DIR/supernode-auth.key.pub (send it to the "
                                      "coordinator to enrol the node).")
    key.add_argument("--out", type=Path, required=True, metavar="DIR")
    key.add_argument("--force", action="store_true", help="replace an existing key (re-enrol after)")
    key.set_defaults(func=cmd_node_key)

    local = dsub.add_parser("local", help="everyone: a study on a real SuperLink and SuperNodes on "
                                          "this machine (loopback, TLS, node authentication)",
                            description="Starts flower-superlink and one flower-supernode per "
                                        "--site as separate processes on free loopback ports, runs "
                                        "the study with flwr run, writes RUN_DIR like `twinfed "
                                        "simulate` (plus RUN_DIR/deploy/: certificates, keys, "
                                        "logs) and stops every process, also on failure or Ctrl-C.")
    local.add_argument("--spec", required=True, help="spec TOML file or built-in twin name")
    local.add_argument("--site", action="append", default=[], required=True, metavar="NAME=DIR",
                       help="a hospital's site directory; repeat per site")
    _study_flags(local)
    local.add_argument("--out", type=Path, required=True, help="run directory RUN_DIR")
    local.add_argument("--state", type=Path,
                       help="node states live in STATE/<site> (default RUN_DIR/nodes)")
    local.add_argument("--app", type=Path, default=None,
                       help="the Flower App directory for flwr run (default: twinfed's source tree)")
    local.add_argument("--timeout", type=float, default=3600.0,
                       help="give up on the study after this many seconds (default 3600)")
    local.add_argument("--approved-only", action="store_true",
                       help="use the node states as their officers left them (twinfed node init, "
                            "plan approve); by default this command initialises each node and "
                            "approves the plan for it, audited as operator:twinfed-deploy-local")
    local.set_defaults(func=cmd_local)


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_certs(args) -> int:
    from twinfed.deploy.certs import make_consortium_certs, verify_server_certificate

    c = make_consortium_certs(args.out, args.host, overwrite=args.force)
    verify_server_certificate(c.ca_cert, c.server_cert)
    print(f"{'new' if c.new_ca else 'existing'} consortium CA: {c.ca_cert} (give to every "
          f"hospital), {c.ca_key} (private: keep offline, back up)")
    print(f"SuperLink certificate for {', '.join(c.hosts)}: {c.server_cert}, key {c.server_key}")
    return 0


def cmd_node_key(args) -> int:
    from twinfed.deploy.certs import make_node_auth_key, public_key_fingerprint

    priv, pub = make_node_auth_key(args.out, overwrite=args.force)
    print(f"private key (stays on this node, 0600): {priv}")
    print(f"public key (send to the coordinator to enrol): {pub}")
    print(f"fingerprint (confirm it with the coordinator): {public_key_fingerprint(pub)}")
    return 0


def cmd_local(args) -> int:
    from twinfed.cli.study import NO_UPDATE, _plan, _print_sites, parse_sites
    from twinfed.deploy.launcher import DEPLOY_OPERATOR, run_deployed_study, site_map
    from twinfed.models.spec import load_spec

    sites = site_map(parse_sites(args.site))
    plan = _plan(load_spec(args.spec), args)  # the same checks as `simulate`, before any process
    t0 = time.perf_counter()
    summary = run_deployed_study(sites, args.out, plan, pretrained=args.pretrained, app_dir=args.app,
                                 state_root=args.state, timeout=args.timeout, progress=_progress,
                                 approve_as=None if args.approved_only else DEPLOY_OPERATOR)
    _print_sites(summary)
    print(f"wrote {args.out}/summary.json and {args.out}/model/ in {time.perf_counter() - t0:.0f} s; "
          f"process logs in {args.out}/deploy/logs/")
    if not summary.get("rounds_with_update"):
        raise TwinfedError(NO_UPDATE)
    return 0
