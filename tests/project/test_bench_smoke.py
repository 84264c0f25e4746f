"""`make bench` cannot rot: a tiny run of the harness, checking the report's shape (no timings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SIDES = ("aggregator", "naive", "sequential")
FIGURES = (
    "calls_per_s",
    "p50_ms",
    "p99_ms",
    "p999_ms",
    "overhead_p50_ms",
    "overhead_p99_ms",
    "cpu_ms_per_call",
    "peak_rss_mb",
)


def quick_bench(output: Path, scenarios: str, timeout: float) -> tuple[dict[str, Any], str]:
    """A quick run of ``scenarios`` into ``output``: its report and its printed table."""
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--scenarios", scenarios, "--output", output],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    report: dict[str, Any] = json.loads(output.read_text())
    return report, run.stdout


def markdown(output: Path) -> str:
    """``python -m bench --markdown`` of a report: docs/performance.md's tables."""
    return subprocess.run(
        [sys.executable, "-m", "bench", "--markdown", output],
        cwd=ROOT, capture_output=True, text=True, timeout=20, check=True,
    ).stdout  # fmt: skip


@pytest.mark.slow
def test_quick_bench_reports_every_figure_for_every_side(tmp_path: Path) -> None:
    output = tmp_path / "bench-results.json"
    report, printed = quick_bench(output, "flat5x20ms,mixed,cache-hot", timeout=50)

    keys = {"flat5x20ms/c1", "flat5x20ms/c16", "flat5x20ms/c64", "flat5x20ms/c256"}
    keys |= {"mixed/c1", "mixed/c64", "cache-hot/c1", "cache-hot/c64"}
    assert set(report["results"]) == keys
    floored = {key for key in keys if key.endswith(("/c1", "/c64"))}
    for key in keys:
        # The gRPC stack's floor runs beside the three sides at concurrency 1 and 64 only.
        sides = (*SIDES, "floor") if key in floored else SIDES
        assert set(report["results"][key]) == set(sides), key
        for side in sides:
            figures = report["results"][key][side]
            assert set(FIGURES) <= set(figures), (key, side)
            assert figures["calls"] > 0, (key, side, figures)
            assert not figures["errors"], (key, side, figures)
            assert not figures["not_ok_results"], (key, side, figures)
        assert key in report["throughput_vs_naive"]
        assert key in report["overhead_p50_vs_naive"]
    # Where the floor ran: each side's CPU per aggregate above it.
    above = report["cpu_above_floor_ms_per_call"]
    assert set(above) == floored
    for key in floored:
        floor = report["results"][key]["floor"]["cpu_ms_per_call"]
        assert above[key]["floor_cpu_ms_per_call"] == floor
        for side in ("aggregator", "naive"):
            ours = report["results"][key][side]["cpu_ms_per_call"]
            assert above[key][side] == pytest.approx(ours - floor, abs=0.001), (key, side)
    assert "multicore" not in report  # not asked for
    assert report["skipped"] == {}
    assert {"grpcio", "aiohttp"} <= set(report["versions"])
    assert {"date", "machine", "pinning"} <= set(report)
    assert "flat5x20ms/c64" in printed  # the table was printed
    assert "above floor" in printed  # and the floor's block
    assert set(report["exit_codes"].values()) == {0}

    results_table, floor_table = (part.splitlines() for part in markdown(output).split("\n\n"))
    assert results_table[0].startswith("| scenario | side | calls/s |")
    assert len(results_table) == 2 + sum(len(sides) for sides in report["results"].values())
    assert floor_table[0].startswith("| scenario | floor CPU ms/call | aggregator above")
    assert [row.split(" | ")[0] for row in floor_table[2:]] == [f"| {key}" for key in above]


@pytest.mark.slow
def test_quick_bench_measures_two_workers_against_one(tmp_path: Path) -> None:
    output = tmp_path / "bench-results.json"
    report, printed = quick_bench(output, "flat5x20ms,multicore", timeout=80)
    multicore = report["multicore"]
    assert multicore["workers"] == [1, 2]
    assert multicore["scenario"] == "cache-hot/c64"
    for workers in ("1", "2"):
        figures = multicore["results"][workers]
        assert figures["calls"] > 0, (workers, figures)
        assert not figures["errors"], (workers, figures)
        assert not figures["not_ok_results"], (workers, figures)
        assert figures["cpu_ms_per_call"] is not None
        assert "load" in figures["harness_cpu_ms_per_call"]
    # Each worker process is counted (a quick run's few calls may all reach one of them).
    assert len(multicore["worker_cpu_share"]["1"]) == 1
    assert len(multicore["worker_cpu_share"]["2"]) == 2
    if report["pinning"]["applied"]:  # on every CPU, where the other sides get one
        pinning = report["pinning"]
        assert multicore["cpus"] == sorted({*pinning["server_cpus"], *pinning["harness_cpus"]})
    projection = multicore["projection"]
    assert set(projection["calls_per_s"]) == {"cache-hot/c64", "flat5x20ms/c64"}
    for calls in projection["calls_per_s"].values():
        assert set(calls) == {"1", "2", "4", "16"}
    assert projection["goal_calls_per_s"] == 10_000
    assert "multicore: cache-hot/c64" in printed
    readme = markdown(output)
    assert "| workers: 2 |" in readme
    assert "| 16 |" in readme


@pytest.mark.slow
def test_quick_bench_measures_grpc_targets_in_json_and_in_bytes(tmp_path: Path) -> None:
    output = tmp_path / "bench-results.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--scenarios", "grpc5-bytes,grpc5-json",
         "--output", output],
        cwd=ROOT, capture_output=True, text=True, timeout=50,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(output.read_text())
    for key in ("grpc5-bytes/c16", "grpc5-json/c16"):
        for side in SIDES:
            figures = report["results"][key][side]
            assert figures["calls"] > 0, (key, side, figures)
            assert not figures["errors"], (key, side, figures)
            assert not figures["not_ok_results"], (key, side, figures)
            assert "cpu_us_per_target" in figures
    figures = ("json_us_per_target", "bytes_us_per_target", "json_extra_us_per_target")
    assert set(report["grpc_json_cpu"]["c16"]) == {*figures, *(f"naive_{f}" for f in figures)}


@pytest.mark.slow
def test_quick_bench_calls_the_named_aggregate_beside_the_same_targets_ad_hoc(
    tmp_path: Path,
) -> None:
    output = tmp_path / "bench-results.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--scenarios", "page5,named-page5",
         "--output", output],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(output.read_text())
    for key in ("page5/c1", "page5/c64", "named-page5/c1", "named-page5/c64"):
        for side in SIDES:
            figures = report["results"][key][side]
            assert figures["calls"] > 0, (key, side, figures)
            assert not figures["errors"], (key, side, figures)
            assert not figures["not_ok_results"], (key, side, figures)
            assert not figures["incomplete_calls"], (key, side, figures)


@pytest.mark.slow
def test_quick_bench_runs_another_revision_beside_this_tree(tmp_path: Path) -> None:
    """--versus REV: the aggregator at REV is one more side of every point (before/after in one
    run), and the report says how much leaner this tree is there."""
    output = tmp_path / "bench-results.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--scenarios", "flat5x20ms", "--versus",
         "HEAD", "--output", output],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["versus"]["revision"] == "HEAD"
    for key, sides in report["results"].items():
        assert sides["before"]["calls"] > 0, (key, sides["before"])
        assert not sides["before"]["errors"], (key, sides["before"])
        point = report["versus"]["points"][key]
        assert set(point) == {"cpu_ms_per_call_before", "cpu_ms_per_call_after", "leaner",
                              "throughput"}  # fmt: skip
        assert key in report["cpu_leaner_vs_naive"]  # None when a quick slice took no CPU tick
    assert "vs HEAD" in run.stdout
