"""The privacy officer's report: budgets, rounds, consent counts and the verification verdict.

Guarantees:
- every figure comes from audit entries that verified (the first ``n_entries`` of each log), so
  a tampered tail cannot put numbers in the report; the verdict is shown first;
- only what the audit log holds is reported: counts, hashes, budgets, never an identifier;
- ``report.json`` is the :class:`OfficerReport` model; ``report.html`` is self-contained (the
  plot is an embedded PNG) and shows the same figures.

It reads these node events (detail names are the emitters' contract): ``round_joined``
(``round``, ``epsilon_spent`` = the site's total after the round, ``epsilon_budget``,
``patients_used``, ``patients_excluded``), ``round_refused`` / ``plan_refused`` (``round``,
``refusal``: a code and where; logs written before codes have a ``reason`` text),
``budget_exhausted`` (``round``, ``refusal``), ``consent_imported`` /
``consent_changed`` (``purposes``: counts per status); and the coordinator's
``round_aggregated`` (``round``).
"""

from __future__ import annotations

import base64
import html
import io
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from twinfed.governance.audit_log import AuditEntry, format_time, read_entries
from twinfed.governance.verify import PathReport, verify_path
from twinfed.outputs import SiteSpend


class BudgetPoint(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    round: int
    epsilon_spent: float
    epsilon_budget: float | None = None
    patients_used: int | None = None
    patients_excluded: int | None = None
    time: str


class Refusal(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    round: int | None
    event: str
    reason: str
    time: str


class SiteSummary(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    site: str
    log: str
    rounds_joined: list[int]
    rounds_refused: list[Refusal]
    budget: list[BudgetPoint]
    # The site's total: its whole privacy ledger (as ``twinfed ledger show``), or for a log without
    # any privacy_spent entry the last figure its rounds recorded.
    epsilon_spent: float | None
    epsilon_budget: float | None
    budget_exhausted: list[Refusal]
    consent: dict[str, dict[str, int]]  # purpose -> {"granted": n, "withdrawn": n}
    plans_approved: int
    plans_revoked: int
    spend: SiteSpend | None = None  # the ledger's total and its parts by kind of release


class Verification(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    ok: bool
    n_entries: int
    anchors_checked: int
    issues: list[str]
    notes: list[str]


class OfficerReport(BaseModel):
    """``report.json``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: str = "twinfed-report-v1"
    path: str
    generated_at: str
    verification: Verification
    sites: list[SiteSummary]
    rounds_aggregated: list[int]


def build_report(path: str | Path, *, at: datetime | None = None) -> OfficerReport:
    checked = verify_path(path)
    sites, rounds_aggregated = [], []
    for lg in checked.logs:
        entries = _verified_entries(lg.result.file, lg.result.n_entries)
        if lg.kind == "coordinator":
            rounds_aggregated = sorted({int(e.details["round"]) for e in entries
                                        if e.event == "round_aggregated" and _is_int(e.details.get("round"))})
        else:
            sites.append(_site_summary(lg.name, lg.result.file, entries))
    return OfficerReport(
        path=str(path), generated_at=format_time(at or datetime.now(timezone.utc)),
        verification=_verification(checked), sites=sites, rounds_aggregated=rounds_aggregated)


def write_report(path: str | Path, out_dir: str | Path, *, at: datetime | None = None) -> OfficerReport:
    """Write ``report.json`` and ``report.html`` into ``out_dir`` (made if need be); returns the
    report. Nothing else is written, and each file is replaced whole or not at all
    (:class:`twinfed.atomic.WriteError` naming it if it cannot be written). Both are meant to be
    read by others (mode 0644): they hold counts, hashes and budgets only."""
    from twinfed.atomic import make_dir, write_bytes_atomic

    report = build_report(path, at=at)
    files = {"report.json": (report.model_dump_json(indent=2) + "\n").encode(),
             "report.html": render_html(report).encode("utf-8")}
    out = make_dir(out_dir, mode=0o777)  # the umask decides, as for any directory a person makes
    for name, data in files.items():
        write_bytes_atomic(out / name, data, mode=0o644)
    return report


def _verified_entries(file: str, n: int) -> list[AuditEntry]:
    if n == 0:  # nothing verified: a missing log, or one that is not a regular file
        return []
    lines, _ = read_entries(file)
    return [AuditEntry.model_validate_json(raw) for raw in lines[:n]]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _reason(details: dict) -> str:
    """A refusal as the officer reads it: the code and where (file, row, column), or the text
    older logs kept."""
    from twinfed.wire import Refusal as CodedRefusal

    try:
        return str(CodedRefusal.model_validate(details["refusal"]))
    except (KeyError, ValueError):
        return str(details.get("reason", ""))


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _site_summary(site: str, log: str, entries: list[AuditEntry]) -> SiteSummary:
    joined, refused, exhausted, budget = [], [], [], []
    consent: dict[str, dict[str, int]] = {}
    approved = revoked = 0
    for e in entries:
        d = e.details
        rnd = d.get("round") if _is_int(d.get("round")) else None
        if e.event == "round_joined":
            if rnd is not None:
                joined.append(rnd)
            spent = _num(d.get("epsilon_spent"))
            if rnd is not None and spent is not None:
                budget.append(BudgetPoint(round=rnd, epsilon_spent=spent, epsilon_budget=_num(d.get("epsilon_budget")),
                                          patients_used=d.get("patients_used") if _is_int(d.get("patients_used")) else None,
                                          patients_excluded=d.get("patients_excluded")
                                          if _is_int(d.get("patients_excluded")) else None, time=e.time))
        elif e.event in ("round_refused", "plan_refused"):
            refused.append(Refusal(round=rnd, event=e.event, reason=_reason(d), time=e.time))
        elif e.event == "budget_exhausted":
            exhausted.append(Refusal(round=rnd, event=e.event, reason=_reason(d), time=e.time))
        elif e.event in ("consent_imported", "consent_changed"):
            for purpose, counts in (d.get("purposes") or {}).items():
                if isinstance(counts, dict):
                    consent[purpose] = {k: int(v) for k, v in counts.items() if _is_int(v)}
        elif e.event == "plan_approved":
            approved += 1
        elif e.event == "plan_revoked":
            revoked += 1
    last = budget[-1] if budget else None
    spend = ledger_spend(Path(log).parent, entries)
    return SiteSummary(site=site, log=log, rounds_joined=joined, rounds_refused=refused, budget=budget,
                       epsilon_spent=spend.epsilon if spend else last.epsilon_spent if last else None,
                       epsilon_budget=spend.epsilon_budget if spend else last.epsilon_budget if last else None,
                       budget_exhausted=exhausted, consent=consent, plans_approved=approved,
                       plans_revoked=revoked, spend=spend)


DEFAULT_DELTA = 1e-5  # as ``twinfed ledger show`` when no release recorded one


def ledger_spend(state_dir: Path, entries: list[AuditEntry]) -> SiteSpend | None:
    """The site's spend from its privacy ledger, as ``twinfed ledger show`` computes it: every
    segment, at the ledger's budget delta (the smallest delta a release used, for a ledger whose
    budget has none), by the node's accountant; by kind of release in ledger order. The segments
    are the ledger file's when it agrees with the verified ``entries``, else those the verified
    entries record (the report shows only what verified). None: no DP release and no budget."""
    from twinfed.ledger_file import LedgerError, LedgerState, disagreement, ledger_from_log, read_ledger
    from twinfed.privacy.ledger import PrivacyLedger, epsilon_of

    logged = ledger_from_log(entries)
    if logged.epsilon_budget is None and not logged.segments:
        return None
    try:
        state = read_ledger(state_dir)
    except LedgerError:
        state = None
    ledger = None
    if isinstance(state, LedgerState) and disagreement(state, logged) is None:
        ledger = PrivacyLedger(state_dir, state)
        segments, accountant, budget = ledger.segments, ledger.accountant, ledger.budget
        source = "the node's privacy ledger"
    else:
        segments, accountant, budget = list(logged.segments), logged.accountant or "rdp", logged.epsilon_budget
        source = "the node's signed audit log (its privacy ledger file is missing or disagrees)"
    delta = _ledger_delta(ledger, logged, entries)
    total = ledger.spent(delta) if ledger is not None else epsilon_of(segments, delta, accountant)
    kinds = _release_kinds(entries)
    labelled = [(_kind(s, kinds), s) for s in segments]
    from twinfed.outputs import attribute

    parts = attribute(labelled, lambda segs: epsilon_of(segs, delta, accountant))
    return SiteSpend(epsilon=total, delta=delta, epsilon_budget=budget, accountant=accountant,
                     by_kind=parts, source=source)


def _ledger_delta(ledger, logged, entries: list[AuditEntry]) -> float:
    """The delta ``twinfed ledger show`` evaluates the ledger at: its budget's, once the ledger
    holds an (epsilon, delta) budget; else the smallest delta a release here used."""
    for d in (getattr(ledger, "delta", None), getattr(logged, "delta_budget", None)):
        if _num(d) is not None and 0 < d < 1:
            return float(d)
    used = [float(e.details["delta"]) for e in entries
            if e.event == "privacy_spent" and _num(e.details.get("delta")) is not None]
    return min(used) if used else DEFAULT_DELTA


def _release_kinds(entries: list[AuditEntry]) -> dict[tuple[str, int], str]:
    """``(plan_sha256, round) -> "trial" | "calibration"`` for the node's Gaussian-sum releases,
    from its ``aggregate_released`` entries; plus every plan this node calibrated a study for
    (``study_calibrated``: a training plan, whose Gaussian sum is its calibration) as ``(plan, -1)``."""
    kinds: dict[tuple[str, int], str] = {}
    for e in entries:
        d = e.details
        if e.event == "aggregate_released" and d.get("kind") in ("trial", "calibration") and _is_int(d.get("round")):
            kinds[(str(d.get("plan_sha256")), d["round"])] = d["kind"]
        elif e.event == "study_calibrated":
            kinds[(str(d.get("plan_sha256")), -1)] = "calibration"
    return kinds


def _kind(segment, kinds: dict[tuple[str, int], str]) -> str:
    if segment.mechanism == "dp-sgd":
        return "training"
    if segment.mechanism == "gaussian-count":
        return "count"
    # A Gaussian sum: as the node recorded its release; else (a crash between the charge and the
    # release) a training plan's is its calibration, any other plan's a trial's.
    return kinds.get((segment.plan_sha256, segment.round),
                     kinds.get((segment.plan_sha256, -1), "trial"))


def _verification(checked: PathReport) -> Verification:
    return Verification(ok=checked.ok, n_entries=checked.n_entries, anchors_checked=checked.anchors_checked,
                        issues=[str(i) for i in checked.issues], notes=checked.notes)


# ---------------------------------------------------------------------------------------------
# HTML


def budget_plot_png(report: OfficerReport) -> bytes:
    import matplotlib

    matplotlib.use("Agg")  # no display on a hospital server
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.6), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for i, s in enumerate(report.sites):
        if not s.budget:
            continue
        color = f"C{i % 10}"
        ax.plot([p.round for p in s.budget], [p.epsilon_spent for p in s.budget], "o-", color=color,
                label=s.site)
        if s.epsilon_budget is not None:
            ax.axhline(s.epsilon_budget, color=color, linestyle=":", linewidth=1)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    ax.set_ylim(bottom=0)
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon spent (site total)")
    ax.set_title("Privacy budget spent per site (dotted: budget)")
    if any(s.budget for s in report.sites):
        ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _by_kind(s: SiteSummary) -> str:
    """The site's spend by kind of release (what each kind added to its total), at its delta."""
    if s.spend is None:
        return "-"
    parts = ", ".join(f"{p.kind} {p.epsilon:.3f}" for p in s.spend.by_kind)
    return html.escape(f"{parts} (delta {s.spend.delta:.2g})")


def render_html(report: OfficerReport) -> str:
    e = html.escape
    v = report.verification
    verdict = (f'<p class="ok" id="verdict">VERIFIED: {v.n_entries} entries, {v.anchors_checked} '
               "cross-anchors checked</p>" if v.ok else
               f'<p class="fail" id="verdict">FAILED: {len(v.issues)} problem(s)</p>')
    issues = "".join(f"<li>{e(i)}</li>" for i in v.issues)
    notes = "".join(f"<li>{e(n)}</li>" for n in v.notes)
    rows = []
    for s in report.sites:
        consent = "; ".join(f"{e(p)}: {c.get('granted', 0)} granted, {c.get('withdrawn', 0)} withdrawn"
                            for p, c in sorted(s.consent.items())) or "-"
        last = s.budget[-1] if s.budget else None
        rows.append(
            "<tr>" + "".join(f"<td>{x}</td>" for x in (
                e(s.site), len(s.rounds_joined), len(s.rounds_refused),
                "-" if s.epsilon_spent is None else f"{s.epsilon_spent:.3f}",
                "-" if s.epsilon_budget is None else f"{s.epsilon_budget:.3f}",
                "-" if last is None or last.patients_used is None else last.patients_used,
                "-" if last is None or last.patients_excluded is None else last.patients_excluded,
                _by_kind(s), consent)) + "</tr>")
    refusals = "".join(f"<tr><td>{e(s.site)}</td><td>{'-' if r.round is None else r.round}</td>"
                       f"<td>{e(r.event)}</td><td>{e(r.reason)}</td><td>{e(r.time)}</td></tr>"
                       for s in report.sites for r in [*s.rounds_refused, *s.budget_exhausted])
    png = base64.b64encode(budget_plot_png(report)).decode("ascii")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>twinfed privacy officer's report</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 60em; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #bbb; padding: 0.3em 0.6em; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
.ok {{ color: #075; font-weight: bold; }} .fail {{ color: #b00; font-weight: bold; }}
</style></head><body>
<h1>Privacy officer's report</h1>
<p>{e(report.path)}, generated {e(report.generated_at)}; rounds aggregated by the coordinator:
{len(report.rounds_aggregated)}.</p>
<h2>Verification</h2>
{verdict}
{f'<ul id="issues">{issues}</ul>' if issues else ''}
{f'<ul id="notes">{notes}</ul>' if notes else ''}
<h2>Sites</h2>
<table id="sites"><thead><tr><th>site</th><th>rounds joined</th><th>rounds refused</th>
<th>epsilon spent</th><th>epsilon budget</th><th>patients used</th><th>patients excluded</th>
<th>spent by kind</th><th>consent</th></tr></thead><tbody>
{''.join(rows)}
</tbody></table>
<h2>Budget over rounds</h2>
<img id="budget-plot" alt="epsilon spent per site over rounds" src="data:image/png;base64,{png}">
<h2>Refusals</h2>
<table id="refusals"><thead><tr><th>site</th><th>round</th><th>event</th><th>reason</th><th>time</th></tr>
</thead><tbody>{refusals}</tbody></table>
</body></html>
"""
