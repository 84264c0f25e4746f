"""The report: bench-results.json's shape, the ratios, and the table printed at the end."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.scenarios import FLOOR


def ratios(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, float | None]]:
    """throughput_vs_naive (higher is better), overhead_p50_vs_naive (lower is better) and
    cpu_leaner_vs_naive (the naive side's CPU per aggregate over ours: higher is better)."""
    throughput: dict[str, float | None] = {}
    overhead: dict[str, float | None] = {}
    leaner: dict[str, float | None] = {}
    for key, sides in results.items():
        ours, naive = sides["aggregator"], sides["naive"]
        throughput[key] = ratio(ours["calls_per_s"], naive["calls_per_s"])
        overhead[key] = ratio(ours["overhead_p50_ms"], naive["overhead_p50_ms"])
        leaner[key] = ratio(naive["cpu_ms_per_call"], ours["cpu_ms_per_call"])
    return {
        "throughput_vs_naive": throughput,
        "overhead_p50_vs_naive": overhead,
        "cpu_leaner_vs_naive": leaner,
    }


def versus(results: dict[str, dict[str, dict[str, Any]]], side: str) -> dict[str, Any]:
    """``--versus REV``: per point, the CPU per aggregate of ``side`` (the aggregator at REV)
    and of this tree's, and how much leaner this tree is (higher is better)."""
    points = {}
    for key, sides in results.items():
        if side in sides:
            before, after = sides[side]["cpu_ms_per_call"], sides["aggregator"]["cpu_ms_per_call"]
            points[key] = {
                "cpu_ms_per_call_before": before,
                "cpu_ms_per_call_after": after,
                "leaner": ratio(before, after),
                "throughput": ratio(sides["aggregator"]["calls_per_s"], sides[side]["calls_per_s"]),
            }
    return points


def json_cost(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """CPU per gRPC target written in JSON (answer decoded) and in bytes, when both grpc5
    scenarios ran: what the JSON path costs the aggregator (its compiled codecs), and the naive
    peer (json_format), each against its own bytes run."""
    json_runs = [key for key in results if key.startswith("grpc5-json/")]
    cost: dict[str, Any] = {}
    for key in json_runs:
        twin = key.replace("grpc5-json/", "grpc5-bytes/")
        if twin in results:
            ours = _json_extra(results[key]["aggregator"], results[twin]["aggregator"])
            naive = _json_extra(results[key]["naive"], results[twin]["naive"])
            cost[key.removeprefix("grpc5-json/")] = {
                **ours,
                **{f"naive_{name}": figure for name, figure in naive.items()},
            }
    return {"grpc_json_cpu": cost} if cost else {}


def _json_extra(in_json: dict[str, Any], in_bytes: dict[str, Any]) -> dict[str, float | None]:
    json_us, bytes_us = in_json["cpu_us_per_target"], in_bytes["cpu_us_per_target"]
    extra = None if json_us is None or bytes_us is None else round(json_us - bytes_us, 1)
    return {
        "json_us_per_target": json_us,
        "bytes_us_per_target": bytes_us,
        "json_extra_us_per_target": extra,
    }


def ratio(ours: float | None, theirs: float | None) -> float | None:
    if ours is None or not theirs or theirs <= 0:
        return None
    return round(ours / theirs, 3)


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gb": _memory_gb(),
    }


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for package in ("grpcio", "aiohttp", "protobuf", "aggregator"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    found["aggregator_git"] = _git_revision()
    return found


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def _git_revision() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "aggregator"],
            cwd=root,
            capture_output=True,
            text=True,
        )
    except OSError:
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


_COLUMNS = (
    ("side", "", 10, None),
    ("calls/s", "calls_per_s", 8, 1),
    ("p50", "p50_ms", 8, 1),
    ("p99", "p99_ms", 8, 1),
    ("p99.9", "p999_ms", 8, 1),
    ("ovh p50", "overhead_p50_ms", 8, 2),
    ("ovh p99", "overhead_p99_ms", 8, 2),
    ("1st p50", "first_result_p50_ms", 8, 1),
    ("cpu ms/call", "cpu_ms_per_call", 11, 3),
    ("RSS MB", "peak_rss_mb", 7, 1),
    ("calls", "calls", 6, 0),
)


def table(report: dict[str, Any]) -> str:
    """The human-readable report: one block per scenario and load level, then the ratios."""
    lines = [
        f"bench {report['date']}  grpcio {report['versions']['grpcio']}  "
        f"aiohttp {report['versions']['aiohttp']}  pinning: {_pinning(report['pinning'])}",
        "latencies in ms; ovh = latency minus the slowest upstream's own time; "
        "cpu ms/call = server CPU-seconds per 1,000 aggregates",
    ]
    if report["load_average_before"][0] > 0.5:
        lines.append(
            f"! load average {report['load_average_before'][0]:.2f} at the start: "
            "the machine was not idle, figures are noisy"
        )
    header = "  ".join(f"{title:>{width}}" for title, _, width, _ in _COLUMNS)
    harness_cpus = len(report["pinning"].get("harness_cpus") or range(os.cpu_count() or 1))
    for key, sides in report["results"].items():
        scenario = report["scenarios"][key.split("/")[0]]
        lines += ["", f"{key}: {scenario['description']}", header]
        for side in sides:
            lines.append(_row(side, sides[side]))
            trouble = _trouble(sides[side], harness_cpus)
            if trouble:
                lines.append(f"{'':>10}  ! {trouble}")
        other = max(figures["other_cpu_util"] or 0.0 for figures in sides.values())
        if other > 0.1:
            lines.append(
                f"{'':>10}  ! other processes took up to {other:.0%} of a CPU during these "
                "slices: figures are noisy"
            )
    lines += [
        "",
        f"{'aggregator vs naive':<22}{'throughput':>12}{'overhead p50':>14}{'CPU leaner':>12}",
    ]
    for key in report["results"]:
        throughput = report["throughput_vs_naive"][key]
        overhead = report["overhead_p50_vs_naive"][key]
        leaner = report.get("cpu_leaner_vs_naive", {}).get(key)
        lines.append(f"{key:<22}{_times(throughput):>12}{_times(overhead):>14}{_times(leaner):>12}")
    if report.get("versus"):
        lines += ["", f"{'vs ' + report['versus']['revision']:<22}{'CPU before':>12}"
                  f"{'CPU after':>12}{'leaner':>10}{'throughput':>12}"]  # fmt: skip
        for key, point in report["versus"]["points"].items():
            lines.append(
                f"{key:<22}{_cell(point['cpu_ms_per_call_before'], 3, 12)}"
                f"{_cell(point['cpu_ms_per_call_after'], 3, 12)}{_times(point['leaner']):>10}"
                f"{_times(point['throughput']):>12}"
            )
    lines += _floor_lines(report)
    if "multicore" in report:
        lines += _multicore_lines(report["multicore"])
    for name, why in report["skipped"].items():
        lines.append(f"{name}: {why}")
    return "\n".join(lines)


def _row(side: str, figures: dict[str, Any]) -> str:
    cells = []
    for _, field, width, digits in _COLUMNS:
        value = side if not field else figures.get(field)
        if isinstance(value, float | int) and digits is not None:
            cells.append(f"{value:>{width},.{digits}f}")
        else:
            cells.append(f"{'-' if value is None else value:>{width}}")
    return "  ".join(cells)


def _trouble(figures: dict[str, Any], harness_cpus: int) -> str:
    notes = []
    if figures["errors"]:
        notes.append(f"errors {figures['errors']}")
    if figures["not_ok_results"]:
        notes.append(f"results not OK {figures['not_ok_results']}")
    if figures["not_ok_sample"]:
        notes.append(f"e.g. {figures['not_ok_sample'][:120]!r}")
    if figures["incomplete_calls"]:
        notes.append(f"{figures['incomplete_calls']} calls with missing results")
    harness = figures["harness_cpu_util"]
    if harness.get("total", 0) > 0.9 * harness_cpus:
        shares = ", ".join(f"{name} {util:.0%}" for name, util in harness.items() if util)
        notes.append(f"harness CPU busy ({shares}): it may be the limit, not this side")
    return "; ".join(notes)


def _times(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _pinning(pinning: dict[str, Any]) -> str:
    if not pinning.get("applied"):
        return f"none ({pinning.get('reason')})"
    return f"servers on CPU {pinning['server_cpus']}, harness on {pinning['harness_cpus']}"


_MARKDOWN = (
    ("calls/s", "calls_per_s", 1),
    ("p50", "p50_ms", 1),
    ("p99", "p99_ms", 1),
    ("overhead p50", "overhead_p50_ms", 2),
    ("overhead p99", "overhead_p99_ms", 1),
    ("CPU ms/call", "cpu_ms_per_call", 2),
    ("RSS MB", "peak_rss_mb", 0),
)


def markdown(report: dict[str, Any]) -> str:
    """The table docs/performance.md shows (``python -m bench --markdown FILE``)."""
    titles = [
        "scenario", "side", *(title for title, _, _ in _MARKDOWN), "throughput vs naive",
        "CPU leaner than naive",
    ]  # fmt: skip
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for key, sides in report["results"].items():
        ratio = _times(report["throughput_vs_naive"].get(key)).replace("x", "\u00d7")
        leaner = _times(report.get("cpu_leaner_vs_naive", {}).get(key)).replace("x", "\u00d7")
        for index, (side, figures) in enumerate(sides.items()):
            cells = [key if index == 0 else "", side]
            for _, field, digits in _MARKDOWN:
                value = figures.get(field)
                cells.append("-" if value is None else f"{value:,.{digits}f}")
            cells += [ratio, leaner] if index == 0 else ["", ""]
            lines.append("| " + " | ".join(cells) + " |")
    lines += _floor_markdown(report)
    if "multicore" in report:
        lines += _multicore_markdown(report["multicore"])
    return "\n".join(lines)


def cpu_above_floor(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Where the floor ran: the aggregator's and the naive peer's CPU per aggregate minus the
    floor's (ms), i.e. what each spends beyond grpc.aio's own work: how far the limit is."""
    above: dict[str, dict[str, float | None]] = {}
    for key, sides in results.items():
        if FLOOR not in sides:
            continue
        floor = sides[FLOOR]["cpu_ms_per_call"]
        above[key] = {"floor_cpu_ms_per_call": floor}
        for side in ("aggregator", "naive"):
            ours = sides[side]["cpu_ms_per_call"]
            above[key][side] = None if ours is None or floor is None else round(ours - floor, 3)
    return {"cpu_above_floor_ms_per_call": above} if above else {}


def _floor_lines(report: dict[str, Any]) -> list[str]:
    above = report.get("cpu_above_floor_ms_per_call", {})
    if not above:
        return []
    lines = ["", f"{'CPU ms per aggregate':<22}{'floor':>8}{'aggregator':>12}{'naive':>8}"]
    lines.append(f"{'':<22}{'':>8}{'above floor':>12}{'above':>8}")
    for key, figures in above.items():
        cells = [figures["floor_cpu_ms_per_call"], figures["aggregator"], figures["naive"]]
        widths = (8, 12, 8)
        lines.append(f"{key:<22}" + "".join(map(_cell, cells, (3, 3, 3), widths)))
    return lines


def _floor_markdown(report: dict[str, Any]) -> list[str]:
    above = report.get("cpu_above_floor_ms_per_call", {})
    if not above:
        return []
    lines = [
        "",
        "| scenario | floor CPU ms/call | aggregator above the floor | naive above the floor |",
        "|---|---|---|---|",
    ]
    for key, figures in above.items():
        cells = [figures["floor_cpu_ms_per_call"], figures["aggregator"], figures["naive"]]
        lines.append(f"| {key} | " + " | ".join(_cell(v, 2, 0) for v in cells) + " |")
    return lines


def _multicore_lines(multicore: dict[str, Any]) -> list[str]:
    """The multicore block of the printed table (bench/multicore.py)."""
    workers = str(multicore["workers"][-1])
    lines = [
        "",
        f"multicore: {multicore['scenario']}, the aggregator on CPUs {multicore['cpus']}, "
        f"{multicore['connections']} connections; CPU summed over the worker processes",
        f"{'workers':>8}{'calls/s':>10}{'cpu ms/call':>13}{'server CPUs':>13}"
        f"{'load ms/call':>14}{'harness CPUs':>14}{'p50':>8}{'p99':>8}{'others':>8}",
    ]
    for count, figures in multicore["results"].items():
        lines.append(f"{count:>8}" + "".join(_cell(v, d, w) for v, d, w in _multicore_row(figures)))
        trouble = figures["errors"] or figures["not_ok_results"] or figures["incomplete_calls"]
        if trouble:
            lines.append(f"{'':>8}  ! not all OK: {trouble}")
    shares = " / ".join(f"{share:.0%}" for share in multicore["worker_cpu_share"][workers])
    projection = multicore["projection"]
    lines += [
        f"scaling {_times(multicore['throughput_scaling'])} calls/s, CPU per aggregate "
        f"efficiency {_times(multicore['cpu_per_call_efficiency'])}; worker CPU shares {shares}",
        f"! {multicore['bias']}",
        f"projection: {projection['formula']}, e = {projection['efficiency_per_doubling']}",
    ]
    goal = f"{projection['goal_calls_per_s']:,}/s"
    for key, calls in projection["calls_per_s"].items():
        cells = ", ".join(f"{n} cores {_cell(v, 0, 0)}" for n, v in calls.items())
        needed = projection["cores_for_goal"][key]
        lines.append(f"  {key}: {cells}; {goal} at " + (f"~{needed} cores" if needed else "-"))
    return lines


def _multicore_row(figures: dict[str, Any]) -> list[tuple[float | None, int, int]]:
    """(value, digits, width) of a row: in the printed table and in the Markdown one."""
    return [
        (figures["calls_per_s"], 1, 10),
        (figures["cpu_ms_per_call"], 3, 13),
        (figures["server_cpu_util"], 2, 13),
        (figures["harness_cpu_ms_per_call"].get("load"), 3, 14),
        (figures["harness_cpu_util"].get("total"), 2, 14),
        (figures["p50_ms"], 1, 8),
        (figures["p99_ms"], 1, 8),
        (figures["other_cpu_util"], 2, 8),  # other jobs' CPU: above ~0.1, noisy
    ]


def _multicore_markdown(multicore: dict[str, Any]) -> list[str]:
    """docs/performance.md's multicore tables: the measurement, then the projection."""
    lines = [
        "",
        f"| {multicore['scenario']} | calls/s | CPU ms/call (all workers) | server CPU util | "
        "load generator CPU ms/call | harness CPU util | p50 | p99 | other processes' CPU util |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for count, figures in multicore["results"].items():
        cells = [_cell(value, digits, 0) for value, digits, _ in _multicore_row(figures)]
        lines.append(f"| workers: {count} | " + " | ".join(cells) + " |")
    projection = multicore["projection"]
    calls = projection["calls_per_s"]
    goal = projection["goal_calls_per_s"]
    lines += ["", "| cores | " + " | ".join(f"{key} calls/s" for key in calls) + " |"]
    lines.append("|---|" + "---|" * len(calls))
    for cores in next(iter(calls.values())):
        cells = [_cell(v[cores], 0, 0) + (" ✓" * ((v[cores] or 0) >= goal)) for v in calls.values()]
        lines.append(f"| {cores} | " + " | ".join(cells) + " |")
    return lines


def _cell(value: float | None, digits: int, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width},.{digits}f}"
