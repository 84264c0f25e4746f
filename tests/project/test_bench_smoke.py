"""`make bench` cannot rot: a tiny run of the harness, checking the report's shape (no timings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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


@pytest.mark.slow
def test_quick_bench_reports_every_figure_for_every_side(tmp_path: Path) -> None:
    output = tmp_path / "bench-results.json"
    scenarios = "flat5x20ms,mixed,cache-hot"
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--scenarios", scenarios, "--output", output],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(output.read_text())

    keys = {"flat5x20ms/c1", "flat5x20ms/c16", "flat5x20ms/c64", "flat5x20ms/c256"}
    keys |= {"mixed/c1", "mixed/c64", "cache-hot/c1", "cache-hot/c64"}
    assert set(report["results"]) == keys
    for key in keys:
        # The gRPC stack's floor runs beside the three sides at concurrency 1 only.
        sides = (*SIDES, "floor") if key.endswith("/c1") else SIDES
        assert set(report["results"][key]) == set(sides), key
        for side in sides:
            figures = report["results"][key][side]
            assert set(FIGURES) <= set(figures), (key, side)
            assert figures["calls"] > 0, (key, side, figures)
            assert not figures["errors"], (key, side, figures)
            assert not figures["not_ok_results"], (key, side, figures)
        assert key in report["throughput_vs_naive"]
        assert key in report["overhead_p50_vs_naive"]
    assert report["skipped"] == {}
    assert {"grpcio", "aiohttp"} <= set(report["versions"])
    assert {"date", "machine", "pinning"} <= set(report)
    assert "flat5x20ms/c64" in run.stdout  # the table was printed
    assert set(report["exit_codes"].values()) == {0}

    readme_table = subprocess.run(
        [sys.executable, "-m", "bench", "--markdown", output],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    ).stdout.splitlines()
    assert readme_table[0].startswith("| scenario | side | calls/s |")
    assert len(readme_table) == 2 + sum(len(sides) for sides in report["results"].values())


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
