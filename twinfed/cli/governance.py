"""``twinfed node``, ``consent``, ``plan`` and ``audit``: hospital IT's and the privacy officer's tools.

Status commands print counts, never patient identifiers; one patient's status is shown only when
that patient is named on the command line.
"""

from __future__ import annotations

import argparse
import getpass
import json
from datetime import datetime, timezone
from pathlib import Path

from twinfed.errors import TwinfedError
from twinfed.models.plan import TRIAL_PLAN_KIND


def register(sub) -> None:
    _register_node(sub)
    _register_consent(sub)
    _register_plan(sub)
    _register_audit(sub)


def _actor_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--actor", default=None,
                   help="who is acting, for the audit log (default officer:<login name>)")


def _register_node(sub) -> None:
    node = sub.add_parser("node", help="hospital IT: a node's state directory")
    nsub = node.add_subparsers(dest="node_command", metavar="COMMAND", required=True)
    init = nsub.add_parser("init", help="create a node's state: audit key, audit log, consent registry",
                           description="Create DIR with a fresh Ed25519 audit key (keys/, mode 0600), "
                                       "the audit log (its first entry pins the key's fingerprint) and, "
                                       "with --site-data, the consent registry imported from the site's "
                                       "consent.csv. DIR is private to this account (directories 0700, "
                                       "files 0600). The site name and consent.csv are checked before "
                                       "anything is created, and a failed init leaves nothing behind. An "
                                       "initialised DIR is never changed: a second init is an error.")
    init.add_argument("--state", type=Path, required=True, help="the node's state directory DIR")
    init.add_argument("--site-data", type=Path, help="the site's export directory (for consent.csv)")
    init.add_argument("--site-name", help="the site's name in the consortium: letters, digits, '.', '_' "
                                          "and '-', at most 64 (default: the site directory's name, else "
                                          "the state directory's)")
    init.set_defaults(func=cmd_node_init)


def _register_consent(sub) -> None:
    consent = sub.add_parser("consent", help="hospital IT and privacy officer: the node's consent registry")
    csub = consent.add_subparsers(dest="consent_command", metavar="COMMAND", required=True)
    imp = csub.add_parser("import", help="merge a site's consent.csv into the registry",
                          description="Add every record of SITE/consent.csv not yet in the registry. "
                                      "The latest record per patient and purpose wins; a tie counts as "
                                      "withdrawn. Prints counts only.")
    imp.add_argument("--state", type=Path, required=True, help="the node's state directory")
    imp.add_argument("--site-data", type=Path, required=True, help="the site directory or a consent.csv")
    _actor_arg(imp)
    imp.set_defaults(func=cmd_consent_import)
    for verb in ("grant", "withdraw"):
        p = csub.add_parser(verb, help=f"record that one patient {'grants' if verb == 'grant' else 'withdraws'} "
                                       "consent for a purpose, from now on",
                            description=f"Add a '{verb}' record for the patient and purpose at the current "
                                        "time; it takes effect from the next round. The audit log records "
                                        "the counts, never the patient." + (
                                            " A patient and purpose the registry has no record of is an "
                                            "error: check the id and the purpose." if verb == "withdraw"
                                            else ""))
        p.add_argument("--state", type=Path, required=True, help="the node's state directory")
        _patient_args(p, required=True)
        p.add_argument("--purpose", required=True, help="the consent purpose, e.g. twin-training")
        _actor_arg(p)
        p.set_defaults(func=cmd_consent_record, status="granted" if verb == "grant" else "withdrawn")
    st = csub.add_parser("status", help="patients granted and withdrawn per purpose (counts)",
                         description="Counts per purpose. With --patient or --patient-file, that one "
                                     "patient's status.")
    st.add_argument("--state", type=Path, required=True, help="the node's state directory")
    st.add_argument("--purpose", help="only this purpose")
    _patient_args(st, required=False)
    st.set_defaults(func=cmd_consent_status)


def _patient_args(p: argparse.ArgumentParser, *, required: bool) -> None:
    who = p.add_mutually_exclusive_group(required=required)
    who.add_argument("--patient", help="the patient's id as in the site export")
    who.add_argument("--patient-file", type=Path, metavar="FILE",
                     help="the patient's id read from FILE, for ids awkward on a command line (a line "
                          "break, quotes, a comma): the file's whole content is the id, UTF-8, exactly "
                          "as in the site export; one final newline is ignored")


def _register_plan(sub) -> None:
    plan = sub.add_parser("plan", help="privacy officer: approve the training plans a node may train")
    psub = plan.add_subparsers(dest="plan_command", metavar="COMMAND", required=True)
    show = psub.add_parser("show", help="show a plan and its hash",
                           description="Show a plan file (or a model directory's plan.json), or a plan "
                                       "recorded in a node's approvals, with its SHA-256.")
    src = show.add_mutually_exclusive_group(required=True)
    src.add_argument("--plan", type=Path, help="plan.json, or a model/run directory holding one")
    src.add_argument("--state", type=Path, help="the node's state directory (with --sha)")
    show.add_argument("--sha", help="the plan's hash (or its first 8+ digits), with --state")
    show.set_defaults(func=cmd_plan_show)
    ap = psub.add_parser("approve", help="approve a plan for this node",
                         description="Record the plan's canonical JSON and hash as approved; audited.")
    ap.add_argument("--state", type=Path, required=True, help="the node's state directory")
    ap.add_argument("--plan", type=Path, required=True, help="plan.json, or a model/run directory holding one")
    _actor_arg(ap)
    ap.set_defaults(func=cmd_plan_approve)
    rv = psub.add_parser("revoke", help="revoke an approved plan; the node refuses its next rounds",
                         description="Revoke the approval; effective at once, then audited.")
    rv.add_argument("--state", type=Path, required=True, help="the node's state directory")
    rv.add_argument("--sha", required=True, help="the plan's hash (or its first 8+ digits)")
    _actor_arg(rv)
    rv.set_defaults(func=cmd_plan_revoke)
    ls = psub.add_parser("list", help="the plans approved (and revoked) at this node")
    ls.add_argument("--state", type=Path, required=True, help="the node's state directory")
    ls.set_defaults(func=cmd_plan_list)


def _register_audit(sub) -> None:
    audit = sub.add_parser("audit", help="privacy officer: verify and read audit logs")
    asub = audit.add_subparsers(dest="audit_command", metavar="COMMAND", required=True)
    ver = asub.add_parser("verify", help="check audit logs: chains, signatures, pinned keys, cross-anchors",
                          description="PATH is an audit log, a node or coordinator state directory, or a "
                                      "run directory (coordinator/ and nodes/<site>/). Exit 0 only when "
                                      "every check holds; otherwise one line per problem: "
                                      "FAIL <file> seq <n>: <reason>. Warnings (a site whose state "
                                      "is not found, a state directory or private key others may "
                                      "read) are 'note:' lines and do not fail.")
    ver.add_argument("path", type=Path, metavar="PATH")
    ver.add_argument("--key", type=Path, help="the owner's public key, for a log file outside its state")
    ver.add_argument("--state", type=Path, metavar="DIR",
                     help="with a run directory: where its node states are when not under RUN/nodes "
                          "(each site's in DIR/<site>, as 'twinfed simulate --state DIR' keeps them)")
    ver.add_argument("--json", action="store_true", help="print the full result as JSON")
    ver.set_defaults(func=cmd_audit_verify)
    show = asub.add_parser("show", help="audit entries as a table, filtered",
                           description="Show the entries of PATH's logs (does not verify them; use "
                                       "'audit verify').")
    show.add_argument("path", type=Path, metavar="PATH")
    show.add_argument("--event", action="append", help="only this event (repeatable)")
    show.add_argument("--round", type=int, help="only entries about this round")
    show.add_argument("--since", type=_time_arg, help="only entries at or after this ISO-8601 time")
    show.add_argument("--until", type=_time_arg, help="only entries before this ISO-8601 time")
    show.add_argument("--json", action="store_true", help="JSON lines: each entry with its log's path")
    show.set_defaults(func=cmd_audit_show)
    rep = asub.add_parser("report", help="the privacy officer's report as HTML and JSON",
                          description="Write OUT/report.html (budget per site over rounds as a plot, "
                                      "rounds joined and refused, consent counts, the verification "
                                      "result) and OUT/report.json with the same figures. Exit 0 when "
                                      "the report is written, whatever the verdict it shows.")
    rep.add_argument("path", type=Path, metavar="PATH")
    rep.add_argument("--out", type=Path, required=True,
                     help="output directory (made if need be); only its report.html and report.json "
                          "are written")
    rep.set_defaults(func=cmd_audit_report)


def _time_arg(text: str) -> datetime:
    try:
        t = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError("not an ISO-8601 time, e.g. 2026-01-31T09:30:00Z") from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _officer(args) -> str:
    if args.actor:
        return args.actor
    try:
        return f"officer:{getpass.getuser()}"
    except Exception:  # no login name in a container: still say it came from the CLI
        return "officer:unknown"


def _counts_text(counts: dict[str, dict[str, int]]) -> str:
    return "; ".join(f"{p}: {c['granted']} granted, {c['withdrawn']} withdrawn"
                     for p, c in sorted(counts.items())) or "no records"


# --------------------------------------------------------------------------------------------- node


def cmd_node_init(args) -> int:
    from twinfed.governance.consent_registry import consent_counts
    from twinfed.governance.node_state import init_node

    if args.site_data is not None and not args.site_data.is_dir():
        raise TwinfedError(f"{args.site_data}: no such site directory")
    from twinfed.deploy.certs import make_node_auth_key

    info = init_node(args.state, site_name=args.site_name, site_data=args.site_data)
    print(f"initialised node {info.name!r} in {args.state}: audit key fingerprint {info.key_fingerprint}")
    _private, public = make_node_auth_key(Path(args.state) / "keys")
    print(f"SuperNode authentication key: {public} (send it to the coordinator to enrol this node)")
    if args.site_data is not None:
        print(f"consent: {_counts_text(consent_counts(args.state))}")
    return 0


# --------------------------------------------------------------------------------------------- consent


def cmd_consent_import(args) -> int:
    from twinfed.governance.consent_registry import import_consent

    s = import_consent(args.state, args.site_data, actor=_officer(args))
    print(f"imported {s.records_added} new records ({s.duplicates} already present); "
          f"{_counts_text(s.counts)}")
    return 0


def _patient_id(args) -> str | None:
    """The id from --patient, or the whole content of --patient-file less one final newline."""
    if args.patient_file is None:
        return args.patient
    try:
        text = args.patient_file.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise TwinfedError(f"{args.patient_file}: no such file; --patient-file names a file holding "
                           "one patient id") from None
    except OSError as exc:
        raise TwinfedError(f"{args.patient_file}: cannot read it ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise TwinfedError(f"{args.patient_file}: not UTF-8 text; save the patient id as UTF-8") from None
    return text[:-1] if text.endswith("\n") else text


def cmd_consent_record(args) -> int:
    from twinfed.governance.consent_registry import record_consent
    from twinfed.governance.layout import read_info

    read_info(args.state)
    c = record_consent(args.state, _patient_id(args), args.purpose, args.status, actor=_officer(args))
    print(f"recorded {args.status} for {args.purpose!r}, effective from the next round; "
          f"{args.purpose}: {c['granted']} granted, {c['withdrawn']} withdrawn")
    return 0


def cmd_consent_status(args) -> int:
    from twinfed.cli.table import format_table
    from twinfed.governance.consent_registry import consent_counts, patient_status
    from twinfed.governance.layout import read_info

    read_info(args.state)
    patient = _patient_id(args)
    if patient is not None:
        status = patient_status(args.state, patient, args.purpose)
        if not status:
            print(f"no consent record for that patient{f' and {args.purpose!r}' if args.purpose else ''}: "
                  "not used")
        for purpose, s in sorted(status.items()):
            print(f"{purpose}: {s}")
        return 0
    counts = consent_counts(args.state, args.purpose)
    if not counts:
        print("no consent records: no patient is used (run 'twinfed consent import')")
        return 0
    print(format_table(["purpose", "granted", "withdrawn"],
                       [[p, c["granted"], c["withdrawn"]] for p, c in sorted(counts.items())]))
    return 0


# --------------------------------------------------------------------------------------------- plan


def _secagg_lines(plan) -> list[str]:
    """The SecAgg+ assumptions officers approve, and the neighbourhoods they lead to."""
    from twinfed.privacy.neighbourhood import Assumptions, neighbourhood

    s = plan.privacy.secagg
    a = Assumptions.of(plan)
    chosen = []
    for n in (3, 10, 100, 1000):
        try:
            h = neighbourhood(n, a)
            chosen.append(f"{n} sites: {h.shares} shares, threshold {h.threshold}")
        except TwinfedError:
            chosen.append(f"{n} sites: none (refused)")
    return [f"SecAgg+:     assumes at most {s.corrupt_fraction:g} of a round's sites corrupt (colluding "
            f"with the coordinator) and {s.dropout_fraction:g} dropping out, rounded up; "
            f"exposure <= 2^-{s.security_bits}, failed round <= 2^-{s.correctness_bits}",
            f"neighbours:  {'; '.join(chosen)} (t corrupt neighbours of a site could unmask it)"]


def cmd_plan_show(args) -> int:
    from twinfed.governance.approvals import find_approval, load_plan_file

    if args.plan is not None:
        if args.sha:
            raise TwinfedError("--sha goes with --state, not --plan")
        plan, status = load_plan_file(args.plan), None
    else:
        if not args.sha:
            raise TwinfedError("with --state, name the plan with --sha (see 'twinfed plan list')")
        a = find_approval(args.state, args.sha)
        plan = a.plan()
        status = (f"approved {a.approved_at} by {a.approved_by}" if a.active else
                  f"revoked {a.revoked_at} by {a.revoked_by} (approved {a.approved_at} by {a.approved_by})")
    print(f"plan sha256: {plan.sha256()}")
    if status:
        print(f"status:      {status}")
    if getattr(plan, "kind", None) == TRIAL_PLAN_KIND:
        return _show_trial_plan(plan)
    print(f"purpose:     {plan.purpose}")
    print(f"twin:        {plan.spec.name}")
    print(f"rounds:      {plan.rounds}")
    print(f"privacy:     epsilon {plan.privacy.epsilon} per site, delta {plan.privacy.delta}, "
          f"DP {'on' if plan.privacy.enabled else 'OFF'}, secure aggregation "
          f"{'on' if plan.privacy.secure_aggregation else 'OFF'}")
    print(f"model:       {plan.model.kind}, {plan.model.layers} x {plan.model.hidden}")
    print(f"secure sum:  never unmasked over fewer than {plan.privacy.secagg.min_sites} sites")
    if plan.privacy.secure_aggregation:
        for line in _secagg_lines(plan):
            print(line)
    print(f"counts:      released once per study with Gaussian noise of std {plan.privacy.count_noise:g} "
          f"patients ({', '.join(plan.metrics) or 'kept at the node'})")
    for warning in _plan_warnings(plan):
        print(f"WARNING:     {warning}")
    print("leaves each node, besides its masked update (field: kind):")
    from twinfed.wire import reply_field_table

    for name, kind in reply_field_table():
        print(f"  {name}: {kind}")
    print(json.dumps(json.loads(plan.canonical_json()), indent=2, sort_keys=True))
    return 0


def _show_trial_plan(plan) -> int:
    """``plan show`` of an in-silico trial's plan: what the trial computes and what leaves."""
    from twinfed.models.trial import layout, plan_structures, sensitivity
    from twinfed.wire import reply_field_table

    d, p = plan.design, plan.privacy
    cal = plan.twin.calibration
    print(f"kind:        in-silico trial {d.name!r}")
    print(f"purpose:     {d.purpose}")
    print(f"twin:        {plan.spec.name}, weights {plan.twin.weights_sha256[:16]}..., trained under plan "
          f"{plan.twin.training_plan().sha256()[:16]}...; intervals "
          + ("none (no uncertainty propagated)" if cal is None else f"from {cal.source}"))
    print(f"arms:        {', '.join(a.name for a in d.arms)} (reference {d.reference}); from "
          f"{d.start_hours:g} h after each patient's first record for {d.duration_days:g} days, "
          f"{d.draws} draws per patient")
    print(f"outcomes:    {', '.join(o.name for o in d.outcomes)}")
    print(f"privacy:     epsilon {p.epsilon:g} per site for this trial, delta {p.delta:g}, DP "
          f"{'on' if p.enabled else 'OFF'}, secure aggregation {'on' if p.secure_aggregation else 'OFF'}")
    print(f"secure sum:  never unmasked over fewer than {p.secagg.min_sites} sites")
    structures = plan_structures(plan.twin.training_plan())
    print(f"release:     once per site: {len(layout(d, structures))} sums over its patients (per arm and outcome the "
          "clipped outcome and its square, per contrast the clipped paired difference and its square, "
          f"a count{_structures_note(structures)}), one patient moving them by at most {sensitivity(d, structures):.3g} (L2); Gaussian noise "
          "calibrated to the epsilon above, charged to the site's ledger")
    for warning in _plan_warnings(plan):
        print(f"WARNING:     {warning}")
    print("leaves each node, besides its masked sums (field: kind):")
    for name, kind in reply_field_table():
        print(f"  {name}: {kind}")
    print(json.dumps(json.loads(plan.canonical_json()), indent=2, sort_keys=True))
    return 0


def _structures_note(structures: tuple[str, ...]) -> str:
    """What an ensemble twin's trial adds to its release (models.trial.layout)."""
    if not structures:
        return ""
    return (f"; per core structure after the first ({', '.join(structures[1:])}) its arm outcomes and "
            f"contrasts minus the first's ({structures[0]}), clipped")


def _plan_warnings(plan) -> list[str]:
    """What an officer must not miss before approving a plan."""
    out = []
    if not plan.privacy.enabled:
        out.append("DIFFERENTIAL PRIVACY IS OFF: deployed nodes refuse this plan (simulated baselines only)")
    if not plan.privacy.secure_aggregation:
        out.append("SECURE AGGREGATION IS OFF: the coordinator would see each site's update")
    if getattr(plan, "kind", None) == TRIAL_PLAN_KIND:
        return out
    if plan.unsupported_metrics():
        out.append(f"asks nodes to release {', '.join(plan.unsupported_metrics())}, which no node "
                   "releases: every node will refuse it")
    return out


def cmd_plan_approve(args) -> int:
    from twinfed.governance.approvals import approve_plan, load_plan_file

    plan = load_plan_file(args.plan)
    if getattr(plan, "kind", None) != TRIAL_PLAN_KIND and plan.unsupported_metrics():
        raise TwinfedError(f"the plan asks nodes to release {', '.join(plan.unsupported_metrics())}; "
                           "nodes release only DP figures (patients_used, patients_excluded): fix "
                           "the plan's metrics")
    a = approve_plan(args.state, plan, actor=_officer(args))
    dp = f"epsilon {plan.privacy.epsilon:g}" if plan.privacy.enabled else "NO differential privacy"
    print(f"approved plan {a.sha256} ({plan.purpose!r}, {plan.rounds} rounds, {dp}) at {args.state}")
    for warning in _plan_warnings(plan):
        print(f"WARNING: {warning}")
    return 0


def cmd_plan_revoke(args) -> int:
    from twinfed.governance.approvals import revoke_plan

    a = revoke_plan(args.state, args.sha, actor=_officer(args))
    print(f"revoked plan {a.sha256} at {args.state}; the node refuses its rounds from now on")
    return 0


def cmd_plan_list(args) -> int:
    from twinfed.cli.table import format_table
    from twinfed.governance.approvals import list_approvals
    from twinfed.governance.layout import read_info

    read_info(args.state)
    rows = [[a.sha256[:16], "approved" if a.active else "revoked", a.purpose, a.rounds,
             a.approved_at[:19], a.approved_by, (a.revoked_at or "")[:19] or None]
            for a in list_approvals(args.state)]
    if not rows:
        print("no plans approved at this node")
        return 0
    print(format_table(["sha256", "status", "purpose", "rounds", "approved", "by", "revoked"], rows))
    return 0


# --------------------------------------------------------------------------------------------- audit


def cmd_audit_verify(args) -> int:
    from twinfed.governance.verify import verify_path

    report = verify_path(args.path, public_key_file=args.key, node_states=args.state)
    if args.json:
        print(report.model_dump_json(indent=2))
        return 0 if report.ok else 1
    for note in report.notes:
        print(f"note: {note}")
    if report.ok:
        print(f"ok: {args.path}: {report.n_entries} entries in {len(report.logs)} log(s), "
              f"{report.anchors_checked} cross-anchors checked")
        return 0
    for issue in report.issues:
        seq = "" if issue.seq is None else f" seq {issue.seq}"
        print(f"FAIL {issue.file}{seq}: {issue.reason}")
    return 1


def _logs_under(path: Path) -> list[Path]:
    from twinfed.governance.layout import is_state_dir, state_paths

    if path.is_file():
        return [path]
    if not path.is_dir():
        raise TwinfedError(f"{path}: no such file or directory")
    if is_state_dir(path):
        return [state_paths(path).audit]
    logs = [state_paths(path / "coordinator").audit] if is_state_dir(path / "coordinator") else []
    nodes = path / "nodes"
    if nodes.is_dir():
        logs += [state_paths(d).audit for d in sorted(nodes.iterdir()) if is_state_dir(d)]
    if not logs:
        raise TwinfedError(f"{path}: not an audit log, a state directory or a run directory")
    return logs


def _short(v):
    """Hashes shortened to a 12-digit prefix, which identifies them on screen."""
    if isinstance(v, str) and len(v) == 64:
        return v[:12] + "..."
    if isinstance(v, dict):
        return {k: _short(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_short(x) for x in v]
    return v


def _summary(details: dict, width: int = 90) -> str:
    # round first, then plain values, then nested ones: the eye finds what a filter asked for
    keys = sorted(details, key=lambda k: (k != "round", isinstance(details[k], (dict, list)), k))
    parts = []
    for k in keys:
        v = _short(details[k])
        parts.append(f"{k}={json.dumps(v, separators=(',', ':')) if isinstance(v, (dict, list)) else v}")
    text = " ".join(parts)
    return text if len(text) <= width else text[:width - 3] + "..."


def cmd_audit_show(args) -> int:
    from pydantic import ValidationError

    from twinfed.cli.table import format_table
    from twinfed.governance.audit_log import AuditEntry, read_entries

    logs = _logs_under(args.path)
    rows, out = [], []
    for log in logs:
        lines, torn = read_entries(log)
        for n, raw in enumerate(lines, start=1):
            try:
                e = AuditEntry.model_validate_json(raw)
            except ValidationError:
                rows.append([str(log), None, None, None, f"(line {n} unreadable)", ""])
                continue
            if args.event and e.event not in args.event:
                continue
            if args.round is not None and e.details.get("round") != args.round:
                continue
            if args.since is not None and e.at < args.since:
                continue
            if args.until is not None and e.at >= args.until:
                continue
            if args.json:
                out.append(json.dumps({"log": str(log), **e.model_dump(mode="json")}, sort_keys=True))
            rows.append([str(log), e.seq, e.time[:19].replace("T", " "), e.actor, e.event, _summary(e.details)])
        if torn is not None:
            rows.append([str(log), None, None, None, f"(torn last line: {len(torn)} bytes)", ""])
    if args.json:
        if out:
            print("\n".join(out))
        return 0
    if len(logs) == 1:
        rows = [r[1:] for r in rows]
        headers = ["seq", "time (UTC)", "actor", "event", "details"]
    else:
        headers = ["log", "seq", "time (UTC)", "actor", "event", "details"]
    if not rows:
        print("no matching entries")
        return 0
    print(format_table(headers, rows))
    return 0


def cmd_audit_report(args) -> int:
    from twinfed.governance.report import write_report

    if args.out.exists() and not args.out.is_dir():
        raise TwinfedError(f"{args.out}: not a directory; --out names the directory to write "
                           "report.html and report.json into, and an existing file is never overwritten")
    report = write_report(args.path, args.out)
    v = report.verification
    verdict = (f"verified ({v.n_entries} entries)" if v.ok else
               f"verification FAILED ({len(v.issues)} problem(s); see the report)")
    print(f"wrote {args.out / 'report.html'} and {args.out / 'report.json'}: {len(report.sites)} site(s), "
          f"{verdict}")
    for s in report.sites:  # each site's spend: its ledger's total (as ledger show), by kind
        if s.spend is not None:
            print(f"{s.site}: {s.spend.label()}")
    return 0
