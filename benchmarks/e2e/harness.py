"""The harness's entry point: run a profile, write JSON, Markdown and charts.

Usage::

    python benchmarks/bench_e2e.py [--profile quick|full|tiny] [--only throughput,latency]
        [--configs netra-sqlite,trio-ws] [--sessions 1000,10000] [--repeat 1]
        [--procs 2] [--out benchmarks/results] [--charts docs/bench]
    python benchmarks/bench_e2e.py --report-only benchmarks/results/latest.json

The quick profile writes ``latest.{json,md}`` and ``docs/bench/*.png``; any other
profile ``<profile>.{json,md}`` and ``docs/bench/<profile>/*.png`` (``make bench-full``:
``full.*``), so neither overwrites the other.

Exit status 1 when any stream lost, reordered or failed anything (or a point
crashed); the figures are written either way.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from . import report
from .scenarios import PROFILES, Bench, Profile, only_configs, parse_only
from .servers import REPO, stop_all


def raise_open_files(wanted: int) -> int:
    """Raise the soft open-file limit towards ``wanted`` (inherited by every child)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        soft = min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


def results_name(profile: str) -> str:
    """The stem of a profile's results files: ``latest`` for ``make bench`` (quick), the
    profile's name otherwise, so a ``make bench-full`` never overwrites the quick
    profile's figures, nor the other way round."""
    return "latest" if profile == "quick" else profile


def default_charts(profile: str) -> Path:
    """Where a profile's charts go by default: docs/bench (quick), docs/bench/<profile>."""
    charts = REPO / "docs" / "bench"
    return charts if profile == "quick" else charts / profile


def run_bench(
    profile: Profile,
    out: Path | None,
    charts: Path | None,
    only: list[str] | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Run ``profile``; write ``<name>.json`` / ``<name>.md`` (``results_name``) to ``out``
    and the charts to ``charts`` (each when given); return the results."""
    largest = max((*profile.memory_sessions, *profile.throughput_sessions,
                   *profile.latency_sessions))  # fmt: skip
    limit = raise_open_files(2 * largest + 1024)
    if limit < largest + 256:
        log(f"warning: open-file limit {limit} is too low for {largest:,} connections")
    began = time.time()
    meta = report.meta()
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        bench = Bench(profile, Path(tmp), log=log)
        try:
            bench.run(only)
        finally:
            bench.close()
    meta["loadavg_end"] = os.getloadavg()
    points = report.aggregate(bench.rows)
    report.add_ratios(points, profile.batch)
    results: dict[str, Any] = {
        "profile": profile.name,
        "settings": asdict(profile),
        "procs": profile.procs,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "wall_s": time.time() - began,
        "command": " ".join(sys.argv),
        "meta": meta,
        "rows": bench.rows,
        "points": points,
        "failures": bench.failures,
    }
    results["targets"] = report.targets(points, profile.batch)
    if charts is not None:
        results["charts"] = [str(p) for p in report.charts(points, charts)]
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        name = results_name(profile.name)
        (out / f"{name}.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
        (out / f"{name}.md").write_text(report.markdown(results) + "\n")
    return results


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--only", default=None, help="comma-separated scenarios")
    parser.add_argument("--procs", type=int, default=None, help="client processes")
    parser.add_argument(
        "--configs",
        default=None,
        help="comma-separated configurations: run only these of the profile's (for example "
        "netra-sqlite,trio-ws)",
    )
    parser.add_argument(
        "--sessions",
        default=None,
        help="comma-separated session counts: the throughput points to run, for every "
        "configuration (for example 1000,10000)",
    )
    parser.add_argument(
        "--repeat", type=int, default=None, help="repetitions of each point (full: 2)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument(
        "--charts",
        type=Path,
        default=None,
        help="chart directory (default: docs/bench for quick, docs/bench/<profile> otherwise)",
    )
    parser.add_argument(
        "--report-only",
        type=Path,
        default=None,
        metavar="JSON",
        help="run nothing: write the Markdown and the charts again from a results file",
    )
    args = parser.parse_args(argv)
    if args.report_only:
        results = json.loads(args.report_only.read_text())
        # Points, ratios and targets again from the rows: this version's rules, the
        # file's figures.
        batch = results["settings"]["batch"]
        if results.get("rows"):
            results["points"] = report.aggregate(results["rows"])
            report.add_ratios(results["points"], batch)
        results["targets"] = report.targets(results["points"], batch)
        report.charts(results["points"], args.charts or default_charts(results["profile"]))
        print(report.markdown(results))
        return 0
    # SIGTERM (a stopped `make`, a killed job) unwinds like Ctrl-C, so every server and
    # client process the harness started is stopped by its `finally`, not left running.
    signal.signal(signal.SIGTERM, _terminate)
    profile = PROFILES[args.profile]
    if args.procs:
        profile = replace(profile, procs=args.procs)
    if args.configs:
        profile = only_configs(profile, set(args.configs.split(",")))
    if args.sessions:
        sessions = tuple(int(n) for n in args.sessions.split(","))
        profile = replace(profile, throughput_sessions=sessions, throughput_large_sessions=())
    if args.repeat:
        profile = replace(profile, repeat=args.repeat)
    charts = args.charts or default_charts(profile.name)
    try:
        results = run_bench(profile, args.out, charts, parse_only(args.only))
    finally:
        stop_all()  # whatever an interrupted scenario left running
    print()
    print(report.markdown(results))
    name = results_name(profile.name)
    print(f"wall {results['wall_s']:.0f} s; results in {args.out}/{name}.*, charts in {charts}")
    for failure in results["failures"]:
        print(f"FAIL: {failure}", file=sys.stderr)
    return 1 if results["failures"] else 0
