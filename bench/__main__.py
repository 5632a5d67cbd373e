"""``python -m bench`` (``make bench``): measure every goal of DESIGN.md section 6 on this machine.

Writes ``bench/results/latest.json`` (figures grouped by section, see :mod:`bench.report`), the
plots beside it, and prints each figure against its target. ``--quick`` runs tiny sizes into
``bench/results/quick/`` (a smoke test, minutes); ``--only SECTION`` runs some sections and
updates only those in the results file. ``--structures all`` makes every cohort's spec declare
every structure of its core family (the ensemble twin) and ``--rolled-hours H`` trains with the
rolled-forward loss; such a run's results go to a directory of its own, named by its options
(e.g. ``bench/results/quick/structures-all/``), never over the plain run's. Exit status 1 if a section failed (the others still run
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

from bench.report import (SECTIONS, format_table, is_figure, markdown_table, merge, missed, read_json,
                          write_json)
from bench.sizes import FULL, QUICK
from bench.studies import STRUCTURES, Workspace, variant

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
    p.add_argument("--structures", choices=STRUCTURES, default="spec",
                   help="spec (default): each cohort's spec as generated, its core's default structure; "
                        "all: every cohort declares every structure of its core family (an ensemble twin)")
    p.add_argument("--rolled-hours", type=float, default=0.0, metavar="H",
                   help="train the federated and site-alone studies with the rolled-forward loss over H "
                        "hours (training.rolled_hours; default 0: off)")
    p.add_argument("--show", action="store_true",
                   help="only print the table of the last results (nothing is measured)")
    p.add_argument("--markdown", action="store_true",
                   help="with --show: the figures with targets as a Markdown table")
    args = p.parse_args(argv)
    if args.rolled_hours:
        from pydantic import ValidationError

        from twinfed.models.plan import TrainingConfig
        try:
            TrainingConfig(rolled_hours=args.rolled_hours)
        except ValidationError as e:
            p.error(f"--rolled-hours: {e.errors()[0]['msg'].removeprefix('Value error, ')}")
    return args


def out_dir(args: argparse.Namespace) -> Path:
    """The results directory: ``--out``, else ``bench/results`` (``quick/`` with --quick), in a
    subdirectory named by the run's other options (``structures-all``, ``rolled-6h``) if any."""
    if args.out:
        return args.out
    return HERE / "results" / ("quick" if args.quick else "") / variant(args.structures, args.rolled_hours)


def command(args: argparse.Namespace) -> str:
    return ("python -m bench" + (" --quick" if args.quick else "")
            + (f" --structures {args.structures}" if args.structures != "spec" else "")
            + (f" --rolled-hours {args.rolled_hours:g}" if args.rolled_hours else "")
            + "".join(f" --only {s}" for s in args.only or []))


def with_options(figs: dict, options: dict) -> dict:
    """Each figure of a section with the run's options (``bench_options``) in its conditions."""
    return {name: fig | {"conditions": {**fig.get("conditions", {}), "bench_options": options}}
            if is_figure(fig) else fig for name, fig in figs.items()}


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
    results_dir = out_dir(args)
    if args.show:
        return show(results_dir / "latest.json", args.markdown)
    sections = [s for s in SECTIONS if not args.only or s in args.only]
    name = variant(args.structures, args.rolled_hours)
    work = HERE / "results" / "work" / sizes.name
    # A run of other options trains its twins in its own directory; the cohorts are shared.
    ws = Workspace(root=work / name if name else work, results=results_dir, progress=_progress,
                   structures=args.structures, rolled_hours=args.rolled_hours, cohorts_dir=work / "cohorts")
    options = ws.options() | {"variant": name or "plain",
                              "rolled_hours_applies_to": "the federated and site-alone studies' plans "
                                                         "(not the centralised or pretrained twins)"}
    ws.reset_runs()
    path = results_dir / "latest.json"
    commit = _git("rev-parse", "--short", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    run_meta = {"started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "git_commit": commit + ("+uncommitted changes" if dirty else ""),
                "sizes": sizes.conditions(), "machine": machine(), "load_average_at_start": os.getloadavg(),
                "command": command(args), "options": options}
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
        figs = with_options(figs, options)
        results = merge(results, {section: figs, "run": run_meta | {"sections": {section: section_meta}}})
        write_json(results, path)
    results["run"]["seconds"] = round(time.perf_counter() - t_all, 1)
    results["run"]["load_average_at_end"] = os.getloadavg()
    write_json(results, path)

    print(format_table(results))
    print()
    miss = missed(results)
    print(f"{len(miss)} target(s) missed" + (": " + ", ".join(f"{s}/{n}" for s, n, _ in miss) if miss else ""))
    print(f"results: {path} ({results['run']['seconds']:.0f} s); plots in {results_dir}/")
    if failed:
        print(f"FAILED sections: {', '.join(failed)} (tracebacks above)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
