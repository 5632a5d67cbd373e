"""``python -m bench`` (``make bench``): measure every goal of DESIGN.md section 6 on this machine.

Writes ``bench/results/latest.json`` (figures grouped by section, see :mod:`bench.report`), the
plots beside it, and prints each figure against its target. ``--quick`` runs tiny sizes into
``bench/results/quick/`` (a smoke test, minutes); ``--only SECTION`` runs some sections and
updates only those in the results file. Exit status 1 if a section failed (the others still run
and are written); missed targets are reported, not errors.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from bench.report import SECTIONS, format_table, markdown_table, merge, missed, read_json, write_json
from bench.sizes import FULL, QUICK
from bench.studies import Workspace

HERE = Path(__file__).resolve().parent


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=HERE.parent, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def machine() -> dict:
    import flwr
    import opacus
    import torch

    cpu = ""
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    except OSError:
        pass
    mem = ""
    try:
        kib = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal")))
        mem = f"{kib / 2**20:.1f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cpus": os.cpu_count(), "memory": mem,
            "python": platform.python_version(), "torch": torch.__version__, "opacus": opacus.__version__,
            "flwr": flwr.__version__}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, a smoke test of every section")
    p.add_argument("--only", action="append", choices=SECTIONS, metavar="SECTION",
                   help=f"run only this section (repeatable): {', '.join(SECTIONS)}")
    p.add_argument("--out", type=Path, help="results directory (default bench/results, "
                                            "bench/results/quick with --quick)")
    p.add_argument("--show", action="store_true",
                   help="only print the table of the last results (nothing is measured)")
    p.add_argument("--markdown", action="store_true",
                   help="with --show: the figures with targets as a Markdown table")
    return p.parse_args(argv)


def show(path: Path, markdown: bool) -> int:
    results = read_json(path)
    if not results:
        print(f"no results in {path}; run python -m bench first")
        return 1
    print(markdown_table(results) if markdown else format_table(results))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    out_dir = args.out or (HERE / "results" / ("quick" if args.quick else ""))
    if args.show:
        return show(out_dir / "latest.json", args.markdown)
    sections = [s for s in SECTIONS if not args.only or s in args.only]
    ws = Workspace(root=HERE / "results" / "work" / sizes.name, results=out_dir, progress=_progress)
    ws.reset_runs()
    path = out_dir / "latest.json"
    commit = _git("rev-parse", "--short", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    run_meta = {"started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "git_commit": commit + ("+uncommitted changes" if dirty else ""),
                "sizes": sizes.conditions(), "machine": machine(), "load_average_at_start": os.getloadavg(),
                "command": "python -m bench" + (" --quick" if args.quick else "")
                           + "".join(f" --only {s}" for s in args.only or [])}
    results = merge(read_json(path), {"run": run_meta | {"sections": {}}})
    failed = []
    t_all = time.perf_counter()
    for section in sections:
        _progress(f"[{section}]")
        t0 = time.perf_counter()
        module = importlib.import_module(f"bench.{section}")
        try:
            figs = module.run(ws, sizes)
            status = "ok"
        except Exception:  # one failed section must not lose the others' figures
            traceback.print_exc()
            figs, status = {}, "failed"
            failed.append(section)
        seconds = time.perf_counter() - t0
        _progress(f"[{section}] {status} in {seconds:.0f} s")
        section_meta = {"seconds": round(seconds, 1), "status": status, "started_at": run_meta["started_at"],
                        "git_commit": run_meta["git_commit"], "sizes": sizes.name}
        results = merge(results, {section: figs, "run": run_meta | {"sections": {section: section_meta}}})
        write_json(results, path)
    results["run"]["seconds"] = round(time.perf_counter() - t_all, 1)
    results["run"]["load_average_at_end"] = os.getloadavg()
    write_json(results, path)

    print(format_table(results))
    print()
    miss = missed(results)
    print(f"{len(miss)} target(s) missed" + (": " + ", ".join(f"{s}/{n}" for s, n, _ in miss) if miss else ""))
    print(f"results: {path} ({results['run']['seconds']:.0f} s); plots in {out_dir}/")
    if failed:
        print(f"FAILED sections: {', '.join(failed)} (tracebacks above)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
