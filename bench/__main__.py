"""``python -m bench``: runs the scenarios, writes bench-results.json, prints the table."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import VERSUS_SIDE, running_harness
from bench.measure import Settings, measure
from bench.multicore import MULTICORE, measure_multicore
from bench.procs import ProcessFailed
from bench.report import (
    cpu_above_floor,
    json_cost,
    machine,
    markdown,
    now,
    ratios,
    table,
    versions,
    versus,
)
from bench.scenarios import SCENARIOS, SIDES, SKIPPED


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke run: a few calls a slice")
    every = [*SCENARIOS, *SKIPPED, MULTICORE]
    parser.add_argument(
        "--scenarios",
        default=",".join(every),
        help=f"comma-separated, of: {', '.join(every)} (default: all)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help=f"{MULTICORE}: server.workers measured against workers: 1 (default 2)",
    )
    parser.add_argument("--output", default="bench-results.json", help="where the JSON goes")
    parser.add_argument("--seed", type=int, default=7, help="the slow upstream's RNG seed")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="FILE",
        help="record the aggregator with py-spy into FILE (collapsed stacks; py-spy on harness "
        "CPUs, so it costs the harness, not the aggregator, CPU time)",
    )
    parser.add_argument(
        "--markdown",
        type=Path,
        metavar="FILE",
        help="print FILE (a bench-results.json) as docs/performance.md's Markdown tables (the "
        "scenarios, and the CPU budget when bench.budget merged it)",
    )
    parser.add_argument(
        "--versus",
        metavar="REV",
        help="also run the aggregator at git revision REV (side 'before', same config, pinned "
        "and loaded as ours, alternating with the others): before/after in one run",
    )
    args = parser.parse_args(argv)
    if args.markdown is not None:
        report = json.loads(args.markdown.read_text())
        print(markdown(report))
        if "cpu_budget" in report:  # merged by `python -m bench.budget` (make bench runs both)
            from bench.budget import markdown as budget_markdown

            print("\n" + budget_markdown(report["cpu_budget"]))
        return 0
    names = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    unknown = [name for name in names if name not in every]
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(unknown)}")
    if args.workers < 2:
        parser.error("--workers: at least 2")
    try:
        selected = [n for n in names if n in SCENARIOS]
        workers = args.workers if MULTICORE in names else None
        report = run(
            selected, Settings(quick=args.quick), args.seed, args.profile, workers, args.versus
        )
    except ProcessFailed as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    report["skipped"] = {n: why for n, why in SKIPPED.items() if n in names}
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"\nwritten to {args.output}")
    return 0


def run(
    names: list[str],
    settings: Settings,
    seed: int,
    profile: Path | None = None,
    workers: int | None = None,
    versus_rev: str | None = None,
) -> dict[str, Any]:
    """The scenarios ``names``, then the multicore mode with ``workers`` unless None; with
    ``versus_rev``, the aggregator at that revision too, as one more side of every point."""
    started = time.monotonic()
    load_before = os.getloadavg()
    results: dict[str, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        with running_harness(Path(tmp), seed, profile) as harness:
            extra: tuple[str, ...] = ()
            if versus_rev is not None:
                extra = (harness.start_versus(_exported(versus_rev, Path(tmp) / "versus")),)
            for name in names:
                scenario = SCENARIOS[name]
                for point in scenario.points:
                    key = f"{name}/{point.key}"
                    print(f"bench: {key} ...", file=sys.stderr, flush=True)
                    sides = (*point.sides, *extra)
                    results[key] = measure(harness, scenario, point, settings, sides=sides)
            multicore = {}
            if workers is not None:
                print(f"bench: {MULTICORE} (workers: {workers}) ...", file=sys.stderr, flush=True)
                multicore[MULTICORE] = measure_multicore(harness, settings, workers, results)
            pinning = harness.describe()
            peak_rss = (
                "VmHWM per scenario point (reset through /proc/<pid>/clear_refs)"
                if harness.peak_rss_resets
                else "VmHWM since the process started (the kernel refused to reset it)"
            )
        exit_codes = dict(harness.exit_codes)
    return {
        "date": now(),
        "machine": machine(),
        "versions": versions(),
        "pinning": pinning,
        "peak_rss": peak_rss,
        # Other jobs on the machine make the figures noisy: see also other_cpu_util per side.
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "options": {
            "quick": settings.quick,
            "scenarios": names,
            "seed": seed,
            "profile": str(profile) if profile else None,
            "multicore_workers": workers,
        },
        "sides": {
            "aggregator": "python -m aggregator serve, production-like config (breaker, "
            "bulkhead, metrics); see bench/scenarios.py",
            "naive": "grpc.aio + asyncio.as_completed over one aiohttp session (bench/naive.py)",
            "sequential": "the naive server awaiting the calls one after another",
            "floor": "at concurrency 1 and 64 only: grpc.aio calling nothing, waiting as long as "
            "the slowest target and streaming ready-made results (bench/naive.py --floor): "
            "the stack's own overhead",
        },
        "scenarios": {
            name: {
                "description": SCENARIOS[name].description,
                "targets": len(SCENARIOS[name].calls),
                "slowest_upstream_ms": SCENARIOS[name].slowest_ms,
                "rounds": settings.rounds(SCENARIOS[name]),
            }
            for name in names
        },
        "results": results,
        **ratios(results),
        **(
            {"versus": {"revision": versus_rev, "points": versus(results, VERSUS_SIDE)}}
            if versus_rev is not None
            else {}
        ),
        **cpu_above_floor(results),
        **json_cost(results),
        **multicore,
        "exit_codes": exit_codes,
        "duration_s": round(time.monotonic() - started, 1),
        "side_order": f"round r runs {', '.join(SIDES)} (and floor at c1 and c64) rotated by r",
    }


def _exported(revision: str, into: Path) -> Path:
    """The tree at git ``revision``, exported into ``into`` (its code only: the venv is ours)."""
    into.mkdir(parents=True)
    root = Path(__file__).resolve().parent.parent
    archive = subprocess.run(
        ["git", "-C", str(root), "archive", revision], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


if __name__ == "__main__":
    sys.exit(main())
