"""Verify a log, a state directory, or a whole run: chains, pinned keys and cross-anchors.

``verify_path`` accepts
- an audit log file (the key is its state's ``keys/audit_ed25519.pub``, or ``public_key``);
- a node or coordinator state directory;
- a run directory: ``RUN/coordinator/`` and ``RUN/nodes/<site>/``, each a state directory; a run
  whose node states live elsewhere (``twinfed simulate --state DIR``) names that place with
  ``node_states``, each site's state being ``DIR/<site>``.

Checks, each naming the first bad entry by file and seq:
- every log against its pinned public key (:func:`governance.audit_log.verify_log`), and its
  first entry (``node_initialised`` / ``coordinator_initialised``) pins that key's fingerprint;
- a node's approved plans each have a ``plan_approved`` event not revoked since;
- a node's log holds the entry its ``state.json`` records as the newest change of its privacy
  ledger (``ledger_anchor``): a log cut back together with its ledger fails on its own;
- in a run: the coordinator's ``node_seen`` events pin each site's key fingerprint, so a node
  whose key was replaced and log re-signed is caught; every node head the coordinator recorded
  (``round_aggregated`` ``node_heads``) must be in that node's log with that hash (a node's log
  cannot be cut or rewritten unseen; a head recorded without its seq, as nodes reply since
  :class:`twinfed.wire.NodeHead`, is looked for by its hash anywhere in the log), and every coordinator head a node recorded
  (``round_joined`` / ``round_refused`` ``coordinator``) must be in the coordinator's log (nor
  can the coordinator's). Anchors are taken only from entries that themselves verified.

An audit log that is not a regular file (a link to ``/dev/null``, a device) or cannot be read
fails its state's check. A node named by the coordinator but whose state is not found cannot be
cross-checked; that is reported as a note naming where verify looked, not a failure (an officer
may hold only their own node and the coordinator's log). So is a state directory group or others
may enter, or a private key they may read: a warning, since the logs can still be trusted.
"""

from __future__ import annotations

import os
import stat
from datetime import datetime, timedelta
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from twinfed.errors import AuditError, TwinfedError
from twinfed.governance.audit_log import (Anchor, AuditEntry, VerifyResult, apply_anchors,
                                          verify_log_entries)
from twinfed.governance.keys import load_public_key, public_key_fingerprint
from twinfed.governance.layout import StateInfo, is_state_dir, state_paths


class Issue(BaseModel):
    """One thing that does not hold, at one place."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str
    seq: int | None = None
    reason: str

    def __str__(self) -> str:
        return f"{self.file}{'' if self.seq is None else f' seq {self.seq}'}: {self.reason}"


class LogReport(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str  # "node", "coordinator" or "log"
    name: str
    result: VerifyResult


class PathReport(BaseModel):
    """Everything verify checked under one path."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    ok: bool
    logs: list[LogReport]
    issues: list[Issue]
    anchors_checked: int = 0
    notes: list[str] = []

    @property
    def n_entries(self) -> int:
        return sum(lg.result.n_entries for lg in self.logs)


class _State:
    """A state directory's verified log, what it pins, and what it says about others."""

    def __init__(self, root: Path, kind: str, name: str, result: VerifyResult,
                 entries: list[AuditEntry], issues: list[Issue], notes: list[str]) -> None:
        self.root, self.kind, self.name = root, kind, name
        self.result, self.entries, self.issues, self.notes = result, entries, issues, notes


def verify_path(path: str | Path, *, public_key_file: str | Path | None = None,
                node_states: str | Path | None = None) -> PathReport:
    """Verify whatever ``path`` is; ``report.ok`` only when every check holds.

    ``node_states``, for a run directory only: where its node states are when not under
    ``RUN/nodes`` (each site's in ``node_states/<site>``).
    """
    path = Path(path)
    if not path.is_dir() and os.path.lexists(path):
        _no_node_states(path, node_states)
        return _verify_file(path, public_key_file)
    if not path.is_dir():
        raise AuditError(f"{path}: no such file or directory")
    if is_state_dir(path):
        _no_node_states(path, node_states)
        st = _verify_state(path)
        return _report(path, [st], [], 0)
    coord_dir, nodes_dir = path / "coordinator", path / "nodes"
    node_dirs = _state_dirs(nodes_dir)
    coord = _verify_state(coord_dir) if is_state_dir(coord_dir) else None
    places = [nodes_dir]
    if node_states is not None:
        node_states = Path(node_states)
        if not node_states.is_dir():
            raise AuditError(f"{node_states}: no such directory; --state names the directory holding "
                             "the run's node states (one DIR/<site> per site)")
        places.append(node_states)
        here = {d.name for d in node_dirs}
        named = _sites_named(coord.entries) if coord is not None else None
        node_dirs += [d for d in _state_dirs(node_states)
                      if d.name not in here and (named is None or d.name in named)]
    if coord is None and not node_dirs:
        raise AuditError(f"{path}: not an audit log, a state directory (audit.jsonl and keys/) or a "
                         "run directory (coordinator/ and nodes/<site>/)")
    nodes = [_verify_state(d) for d in node_dirs]
    if coord is None:
        notes = [f"{coord_dir}: no coordinator state; cross-anchors were not checked"]
        return _report(path, nodes, [], 0, notes)
    return _cross_check(path, coord, nodes, places)


def _no_node_states(path: Path, node_states) -> None:
    if node_states is not None:
        raise AuditError(f"{path}: not a run directory; --state (where a run's node states are) goes "
                         "with a run directory")


def _state_dirs(parent: Path) -> list[Path]:
    return sorted(d for d in parent.iterdir() if is_state_dir(d)) if parent.is_dir() else []


def _sites_named(entries: list[AuditEntry]) -> set[str]:
    """The sites a coordinator's (verified) entries name: pinned, or with a recorded head."""
    named: set[str] = set()
    for e in entries:
        if e.event == "node_seen":
            named.add(str(e.details.get("site")))
        elif e.event in ("round_aggregated", "round_skipped", "study_closed", "trial_finished"):
            heads = e.details.get("node_heads")
            named.update(str(site) for site in (heads if isinstance(heads, dict) else {}))
    return named


def _unreadable(file: Path, fingerprint: str, exc: AuditError) -> VerifyResult:
    """The failed result for a log that could not be read (not a regular file, permissions)."""
    return VerifyResult(file=str(file), ok=False, n_entries=0, head=None, key_fingerprint=fingerprint,
                        reason=str(exc).removeprefix(f"{file}: "))


def _read_and_verify(file: Path, pub) -> tuple[VerifyResult, list[AuditEntry], list[Issue]]:
    """The log verified, or a failure (an :class:`Issue` without a seq) if it cannot be read."""
    try:
        result, entries = verify_log_entries(file, pub)
    except AuditError as exc:
        result = _unreadable(file, public_key_fingerprint(pub), exc)
        return result, [], [Issue(file=result.file, reason=result.reason)]
    return result, entries, []


def _verify_file(path: Path, public_key_file) -> PathReport:
    key_file = Path(public_key_file) if public_key_file else state_paths(path.parent).public_key
    if not key_file.is_file():
        raise AuditError(f"{path}: no pinned key to verify it with; pass the owner's public key "
                         f"(--key FILE) or verify its state directory")
    result, _, issues = _read_and_verify(path, load_public_key(key_file))
    if not result.ok and not issues:
        issues = [Issue(file=result.file, seq=result.first_bad_seq, reason=result.reason)]
    return PathReport(path=str(path), ok=result.ok, logs=[LogReport(kind="log", name=path.name, result=result)],
                      issues=issues)


def _mode_notes(root: Path) -> list[str]:
    """Warnings, not failures: a state directory others may enter, a private key others may read."""
    notes = []
    try:
        mode = stat.S_IMODE(root.stat().st_mode)
        if mode & 0o077:
            notes.append(f"{root}: mode {mode:04o} lets group or others into the state directory; "
                         f"chmod 700 {root}")
        keys = state_paths(root).key.parent
        for key in sorted(keys.iterdir()) if keys.is_dir() else []:
            if key.suffix == ".pub" or key.is_symlink() or not key.is_file():
                continue
            mode = stat.S_IMODE(key.stat().st_mode)
            if mode & 0o077:
                notes.append(f"{key}: mode {mode:04o} lets group or others read or change the private "
                             f"key; chmod 600 {key}")
    except OSError:
        pass  # what cannot be looked at is not reported on; the checks below say if it matters
    return notes


def _verify_state(root: Path) -> _State:
    p = state_paths(root)
    issues: list[Issue] = []
    kind, name = "node", root.name
    info: StateInfo | None = None
    try:
        info = StateInfo.model_validate_json(p.info.read_bytes())
        kind, name = info.kind, info.name
    except FileNotFoundError:
        issues.append(Issue(file=str(p.info), reason="missing: the state was never fully initialised"))
    except ValidationError as exc:
        issues.append(Issue(file=str(p.info), reason=f"not a valid state file ({exc.errors()[0]['msg']})"))
    try:
        pub = load_public_key(p.public_key)
    except TwinfedError as exc:
        issues.append(Issue(file=str(p.public_key), reason=str(exc)))
        empty = VerifyResult(file=str(p.audit), ok=False, n_entries=0, head=None, key_fingerprint="",
                             reason="not verified: no public key")
        return _State(root, kind, name, empty, [], issues, _mode_notes(root))
    if os.path.lexists(p.audit):
        result, entries, unread = _read_and_verify(p.audit, pub)
        issues.extend(unread)
    else:
        result, entries = VerifyResult(file=str(p.audit), ok=False, n_entries=0, head=None,
                                       key_fingerprint=public_key_fingerprint(pub), first_bad_seq=0, line=1,
                                       reason="entry 0 (line 1) is missing: no audit log"), []
    fp = result.key_fingerprint
    if info is not None and info.key_fingerprint != fp:
        issues.append(Issue(file=str(p.public_key), reason=f"key fingerprint {fp[:16]}... is not the "
                            f"{info.key_fingerprint[:16]}... state.json records: the key was replaced"))
    if result.ok and not entries:
        issues.append(Issue(file=str(p.audit), seq=0, reason=f"entry 0 (line 1) is missing: the log is empty, "
                            f"so its {kind}_initialised entry was removed"))
    if entries:
        first = entries[0]
        if first.event != f"{kind}_initialised":
            issues.append(Issue(file=str(p.audit), seq=0, reason=f"the first entry is {first.event}, not "
                                f"{kind}_initialised"))
        elif first.details.get("key_fingerprint") != fp:
            issues.append(Issue(file=str(p.audit), seq=0, reason="pins key fingerprint "
                                f"{str(first.details.get('key_fingerprint'))[:16]}... but the log verifies "
                                f"with {fp[:16]}...: the key was replaced"))
    if kind == "node" and p.approvals.is_file() and result.ok:
        issues.extend(_check_approvals(root, entries))
    if kind == "node" and result.ok:
        issues.extend(_check_ledger(root, entries))
        issues.extend(_check_calibrated_weights(str(p.audit), entries))
    if kind == "coordinator" and result.ok:
        issues.extend(_study_ends(str(p.audit), entries))
    if kind == "node" and info is not None and info.ledger_anchor is not None:
        mark = info.ledger_anchor  # after the ledger's check, which says what the cut log lost
        result = apply_anchors(result, entries, [Anchor(
            seq=mark.seq, hash=mark.hash,
            source=f"{p.info} (the newest change of the privacy ledger; the log was rolled back)")])
        entries = entries[:result.n_entries]
    return _State(root, kind, name, result, entries, issues, _mode_notes(root))


def _check_approvals(root: Path, entries: list[AuditEntry]) -> list[Issue]:
    from twinfed.governance.approvals import list_approvals, standing_approvals

    try:
        approvals = list_approvals(root)
    except TwinfedError as exc:
        return [Issue(file=str(state_paths(root).approvals), reason=str(exc))]
    standing = standing_approvals(entries)
    return [Issue(file=str(state_paths(root).approvals),
                  reason=f"plan {a.sha256[:16]}... is approved here but the audit log has no standing "
                         "plan_approved event for it: the approval was not made through twinfed")
            for a in approvals if a.active and a.sha256 not in standing]


def _check_calibrated_weights(audit: str, entries: list[AuditEntry]) -> list[Issue]:
    """A study's released calibration must be of the weights the study ended with: the
    coordinator asks for it before it closes the study, so the node can check this only once its
    ``study_finished`` (which names the final weights) is in its log. The weights are those of the
    ``model_received`` just before the ``aggregate_released`` (kind calibration) of that plan."""
    finished = {e.details.get("plan_sha256"): e for e in entries if e.event == "study_finished"}
    received: dict[tuple, AuditEntry] = {}
    issues: list[Issue] = []
    for e in entries:
        d = e.details
        key = (d.get("plan_sha256"), d.get("round"))
        if e.event == "model_received":
            received[key] = e
        elif e.event == "aggregate_released" and d.get("kind") == "calibration":
            end, asked = finished.get(key[0]), received.get(key)
            if end is None or asked is None:
                continue
            if asked.details.get("weights_sha256") != end.details.get("weights_sha256"):
                issues.append(Issue(file=audit, seq=e.seq, reason=(
                    f"the study's calibration was released for weights "
                    f"{str(asked.details.get('weights_sha256'))[:16]}... (seq {asked.seq}), not the weights "
                    f"the study ended with ({str(end.details.get('weights_sha256'))[:16]}..., study_finished "
                    f"at seq {end.seq}): the coordinator calibrated another model")))
    return issues


def _check_ledger(root: Path, entries: list[AuditEntry]) -> list[Issue]:
    """The privacy ledger must be what the signed log's spending events say, and every spend must
    keep to the budget in force when it was recorded (the latest ``privacy_budget_set`` before it):
    recorded at no larger a delta than the budget's (an event without ``delta_budget`` reads as
    :data:`~twinfed.ledger_file.DEFAULT_DELTA`), and taking the site no further than the budget's
    epsilon, within the ledger's relative slack (:data:`twinfed.privacy.ledger.SLACK`)."""
    from twinfed.ledger_file import (DEFAULT_DELTA, LEDGER_FILE, LedgerError, disagreement, ledger_from_log,
                                     read_ledger)
    from twinfed.privacy.ledger import SLACK

    issues: list[Issue] = []
    audit = str(state_paths(root).audit)
    budget: tuple[float, float, int] | None = None  # epsilon, delta, the seq that set them
    for e in entries:
        d = e.details
        if e.event == "privacy_budget_set":
            budget = (float(d.get("epsilon_budget", 0)), float(d.get("delta_budget", DEFAULT_DELTA)), e.seq)
        elif e.event == "privacy_spent" and budget is not None:
            epsilon, delta, at = budget
            if float(d.get("delta", 0)) > delta * (1 + 1e-9):  # as PrivacyLedger.require_delta
                issues.append(Issue(file=audit, seq=e.seq, reason=(
                    f"a spend was recorded at delta {float(d['delta']):.2g}, larger than the budget's "
                    f"delta {delta:.2g} (set at seq {at}): its epsilon is not at the budget's delta")))
            if float(d.get("epsilon_after", 0)) > epsilon * (1 + SLACK):
                issues.append(Issue(file=audit, seq=e.seq, reason=(
                    f"a spend took the site to epsilon {float(d['epsilon_after']):.3f}, over its budget "
                    f"epsilon {epsilon:g} at delta {delta:.2g} (set at seq {at})")))
    try:
        why = disagreement(read_ledger(root), ledger_from_log(entries))
    except LedgerError as exc:
        why = str(exc)
    if why:
        issues.append(Issue(file=str(root / LEDGER_FILE), reason=f"{why}: the ledger was edited, "
                            "replaced or lost; rebuild it from the log ('twinfed ledger rebuild')"))
    return issues


def _what(e: AuditEntry) -> str:
    return f"round {e.details.get('round')}" if "round" in e.details else e.event


def _study_ends(file: str, entries: list[AuditEntry]) -> list[Issue]:
    """Every study the coordinator started has an end in its log: finished or aborted."""
    open_study: AuditEntry | None = None
    for e in entries:
        if e.event == "study_started":
            open_study = e
        elif e.event in ("study_finished", "study_aborted", "trial_finished"):
            open_study = None
    if open_study is None:
        return []
    d = open_study.details
    return [Issue(file=file, seq=open_study.seq,
                  reason=f"the study started here (plan {str(d.get('plan_sha256'))[:16]}..., "
                         f"{d.get('rounds')} rounds) has no study_finished or study_aborted: it was "
                         "interrupted, or the end of the log was removed")]


def _model_matches(path: Path, coord: _State) -> list[Issue]:
    """``RUN/model/weights.npz`` is the file the coordinator's last ``study_finished`` recorded."""
    import hashlib

    weights = path / "model" / "weights.npz"
    if not weights.is_file():
        return []
    last = next((e for e in reversed(coord.entries) if e.event == "study_finished"), None)
    if last is None:
        return [Issue(file=str(weights), reason="the coordinator's log records no finished study for "
                                                "this model: its end was removed, or the file is foreign")]
    # Logs written before field names were fixed used model_sha256 for the file's hash here.
    expected = last.details.get("weights_file_sha256") or last.details.get("model_sha256")
    if hashlib.sha256(weights.read_bytes()).hexdigest() != expected:
        return [Issue(file=str(weights), reason=f"does not match the hash the coordinator recorded at "
                                                f"study_finished (seq {last.seq}): the weights were replaced")]
    calibration, recorded = path / "model" / "calibration.json", last.details.get("calibration_file_sha256")
    if recorded and not calibration.is_file():
        return [Issue(file=str(calibration), reason=f"is missing but the coordinator recorded it at "
                                                    f"study_finished (seq {last.seq})")]
    if recorded and hashlib.sha256(calibration.read_bytes()).hexdigest() != recorded:
        return [Issue(file=str(calibration), reason=f"does not match the hash the coordinator recorded at "
                                                    f"study_finished (seq {last.seq}): the prediction "
                                                    "intervals' calibration was replaced")]
    return []


def _studies(entries: list[AuditEntry]) -> dict[str, list[tuple[str, str]]]:
    """Each plan this coordinator ran, with the time spans (first to last entry) of its studies."""
    spans: dict[str, list[tuple[str, str]]] = {}
    starts = [i for i, e in enumerate(entries) if e.event == "study_started"]
    for k, i in enumerate(starts):
        end = entries[(starts[k + 1] if k + 1 < len(starts) else len(entries)) - 1]
        spans.setdefault(str(entries[i].details.get("plan_sha256")), []).append((entries[i].time, end.time))
    return spans


def _in_studies(e: AuditEntry, studies: dict[str, list[tuple[str, str]]]) -> bool:
    """Whether a node's entry belongs to one of the coordinator's studies: the same plan, logged
    while that study ran (a node answers after the coordinator's instruction, so its entry is no
    earlier than the study's start; the coordinator logs the study's close after the nodes'
    last answers). A minute of slack covers clocks that disagree across machines."""
    for start, end in studies.get(str(e.details.get("plan_sha256")), ()):
        if _shift(start, -60) <= e.time <= _shift(end, 60):
            return True
    return False


def _shift(time: str, seconds: int) -> str:
    """An audit timestamp moved by ``seconds``, in the same sortable form."""
    t = datetime.strptime(time, "%Y-%m-%dT%H:%M:%S.%fZ") + timedelta(seconds=seconds)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _cross_check(path: Path, coord: _State, nodes: list[_State], places: list[Path]) -> PathReport:
    """``places``: where node states were looked for, for the note on a site not found."""
    issues: list[Issue] = []
    missing: set[str] = set()
    by_site = {n.name: n for n in nodes}
    node_anchors: dict[str, list[Anchor]] = {n.name: [] for n in nodes}
    pins: dict[str, tuple[str, int]] = {}
    coord_file = coord.result.file
    for e in coord.entries:  # verified entries only: a forged anchor could not get here
        d = e.details
        if e.event == "node_seen":
            site, fp = str(d.get("site")), str(d.get("key_fingerprint"))
            if site in pins and pins[site][0] != fp:
                issues.append(Issue(file=coord_file, seq=e.seq, reason=f"site {site!r} shows key {fp[:16]}... "
                                    f"but was pinned with {pins[site][0][:16]}... at seq {pins[site][1]}"))
            pins.setdefault(site, (fp, e.seq))
        elif e.event in ("round_aggregated", "round_skipped", "study_closed", "trial_finished"):
            for site, head in (d.get("node_heads") or {}).items():
                try:  # a node's head: its hash, and its seq in logs written before NodeHead
                    a = Anchor(seq=head.get("seq"), hash=head["hash"],
                               source=f"{coord_file} seq {e.seq} ({_what(e)})")
                except (TypeError, KeyError, AttributeError, ValidationError):
                    issues.append(Issue(file=coord_file, seq=e.seq, reason=f"malformed node head for {site!r}"))
                    continue
                if site in node_anchors:
                    node_anchors[site].append(a)
                else:
                    missing.add(site)
    coord_anchors: list[Anchor] = []
    studies = _studies(coord.entries)
    for n in nodes:
        pin = pins.get(n.name)
        if pin is not None and pin[0] != n.result.key_fingerprint:
            issues.append(Issue(file=n.result.file, seq=0, reason=f"the log verifies with key "
                                f"{n.result.key_fingerprint[:16]}... but the coordinator pinned "
                                f"{pin[0][:16]}... for site {n.name!r} at its seq {pin[1]}: the node's "
                                "key was replaced and its log re-signed"))
        for e in n.entries:
            if e.event in ("round_joined", "round_refused", "round_skipped", "study_finished",
                           "aggregate_released"):
                c = e.details.get("coordinator")
                if c is None or not _in_studies(e, studies):
                    continue  # a node serves many runs: only this coordinator's studies anchor it
                try:
                    coord_anchors.append(Anchor(seq=c["seq"], hash=c["hash"],
                                                source=f"{n.result.file} seq {e.seq} ({_what(e)})"))
                except (TypeError, KeyError, ValidationError):
                    issues.append(Issue(file=n.result.file, seq=e.seq, reason="malformed coordinator head"))
    missing |= set(pins) - set(by_site)
    where = " or ".join(str(p) for p in places)
    hint = ("" if len(places) > 1 else "; if the node states are kept elsewhere (as 'twinfed simulate "
            "--state DIR' keeps them), pass --state DIR")
    notes = [f"no state for site {site!r} under {where}; its log was not cross-checked{hint}"
             for site in sorted(missing)]
    issues += _model_matches(path, coord)
    n_anchors = len(coord_anchors) + sum(len(v) for v in node_anchors.values())
    coord.result = apply_anchors(coord.result, coord.entries, coord_anchors)
    for n in nodes:
        n.result = apply_anchors(n.result, n.entries, node_anchors[n.name])
    return _report(path, [coord, *nodes], issues, n_anchors, notes)


def _report(path: Path, states: list[_State], extra: list[Issue], n_anchors: int,
            notes: list[str] | None = None) -> PathReport:
    issues: list[Issue] = []
    notes = [n for st in states for n in st.notes] + (notes or [])
    for st in states:
        if not st.result.ok and st.result.first_bad_seq is not None:
            issues.append(Issue(file=st.result.file, seq=st.result.first_bad_seq, reason=st.result.reason))
        issues.extend(st.issues)
    issues.extend(extra)
    # Per file, the earliest entry first: the first line printed for a file is its first bad entry.
    order = {f: i for i, f in reversed(list(enumerate(i.file for i in issues)))}
    issues.sort(key=lambda i: (order[i.file], -1 if i.seq is None else i.seq))
    logs = [LogReport(kind=st.kind, name=st.name, result=st.result) for st in states]
    return PathReport(path=str(path), ok=not issues, logs=logs, issues=issues, anchors_checked=n_anchors,
                      notes=notes)
