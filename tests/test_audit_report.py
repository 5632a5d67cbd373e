"""The officer's report: the figures in report.json and report.html match the audit logs."""

import base64
import json
from html.parser import HTMLParser

from audit_builders import T0, lines, make_run, write_lines
from twinfed.governance.layout import state_paths
from twinfed.governance.report import write_report


class _Page(HTMLParser):
    """Collects table rows by table id, images, and the verdict's text."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self.verdict = {}, [], ""
        self._table = self._row = self._cell = None
        self._in_verdict = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(a.get("id"), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""
        elif tag == "img":
            self.images.append(a)
        elif tag == "p" and a.get("id") == "verdict":
            self._in_verdict = True

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell.strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self._table.append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None
        elif tag == "p":
            self._in_verdict = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        if self._in_verdict:
            self.verdict += data


def _site_rows(page):
    header, *rows = page.tables["sites"]
    return [dict(zip(header, r)) for r in rows]


def test_report_json_has_budget_per_site_rounds_and_consent(tmp_path):
    run = make_run(tmp_path / "run", sites=("a", "b"), rounds=3, refuse={"b": 3})
    report = write_report(run, tmp_path / "out", at=T0)
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data == json.loads(report.model_dump_json())
    assert data["verification"]["ok"] and data["rounds_aggregated"] == [1, 2, 3]
    a, b = data["sites"]
    assert [p["epsilon_spent"] for p in a["budget"]] == [0.75, 1.5, 2.25]
    assert a["rounds_joined"] == [1, 2, 3] and b["rounds_joined"] == [1, 2]
    assert [(r["round"], r["reason"]) for r in b["rounds_refused"]] == [(3, "budget_exhausted")]
    assert b["budget_exhausted"][0]["reason"] == "budget_exhausted"
    assert b["epsilon_spent"] == 1.5 and b["epsilon_budget"] == 3.0


def test_report_html_renders_the_same_figures_and_an_embedded_plot(tmp_path):
    run = make_run(tmp_path / "run", sites=("a", "b"), rounds=2, refuse={"b": 2})
    write_report(run, tmp_path / "out", at=T0)
    page = _Page()
    page.feed((tmp_path / "out" / "report.html").read_text())
    assert page.verdict.startswith("VERIFIED")
    rows = {r["site"]: r for r in _site_rows(page)}
    assert rows["a"]["rounds joined"] == "2" and rows["a"]["rounds refused"] == "0"
    assert rows["b"]["rounds joined"] == "1" and rows["b"]["rounds refused"] == "1"
    assert rows["a"]["epsilon spent"] == "1.500" and rows["b"]["epsilon budget"] == "3.000"
    assert rows["a"]["patients used"] == "4" and rows["a"]["patients excluded"] == "1"
    [plot] = [img for img in page.images if img.get("id") == "budget-plot"]
    prefix = "data:image/png;base64,"
    assert plot["src"].startswith(prefix)
    assert base64.b64decode(plot["src"][len(prefix):])[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r[:3] for r in page.tables["refusals"][1:]] == [["b", "2", "round_refused"], ["b", "2", "budget_exhausted"]]


def test_report_shows_consent_counts_from_the_audit_log(tmp_path):
    from builders import write_site
    from twinfed.governance.consent_registry import withdraw
    from twinfed.governance.node_state import init_node

    state = tmp_path / "state"
    init_node(state, site_data=write_site(tmp_path / "site", n_patients=3, n_steps=30), at=T0)
    withdraw(state, "p0", "twin-training", actor="officer:o")
    report = write_report(state, tmp_path / "out", at=T0)
    assert report.sites[0].consent == {"twin-training": {"granted": 2, "withdrawn": 1}}
    assert "2 granted, 1 withdrawn" in (tmp_path / "out" / "report.html").read_text()


def test_a_tampered_run_reports_the_failure_and_only_figures_that_verified(tmp_path):
    run = make_run(tmp_path / "run", sites=("a",), rounds=3)
    log = state_paths(run / "nodes" / "a").audit
    ls = lines(log)
    obj = json.loads(ls[2])
    obj["details"]["epsilon_spent"] = 0.0
    ls[2] = json.dumps(obj, separators=(",", ":")).encode()
    write_lines(log, ls)
    report = write_report(run, tmp_path / "out", at=T0)
    assert not report.verification.ok and "seq 2" in report.verification.issues[0]
    assert report.sites[0].rounds_joined == [1]  # entries from the edited one on are not reported
    page = _Page()
    page.feed((tmp_path / "out" / "report.html").read_text())
    assert page.verdict.startswith("FAILED")
