"""`make bench`'s CPU budget cannot rot: a quick run of bench/budget.py, every row measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# The rows docs/performance.md ("CPU budget") describes, as issue 21 names them.
ROWS = {
    "planning",
    "planning, named aggregate",
    "admission",
    "admission and auth",
    "policies",
    "result encoding",
    "trailers",
    "metrics",
    "logging (text)",
    "logging (json)",
    "admin record",
    "fan-out",
    "tracing off",
    "tracing on",
    "transport REST",
    "transport REST, aiohttp",
    "transport gRPC",
    "transport gRPC, plain stub",
    "streaming",
    "grpc.aio call",
}


@pytest.mark.slow
def test_quick_budget_measures_every_row_and_merges_into_the_bench_results(
    tmp_path: Path,
) -> None:
    output = tmp_path / "bench-results.json"
    output.write_text(json.dumps({"results": {"kept": True}}))  # what `python -m bench` wrote
    run = subprocess.run(
        [sys.executable, "-m", "bench.budget", "--quick", "--output", output],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["results"] == {"kept": True}
    budget = report["cpu_budget"]
    assert set(budget["rows"]) == ROWS
    for key, row in budget["rows"].items():
        # Differences of medians (fan-out, streaming) too: a negative one would be noise
        # larger than the part, which the table must not hide.
        assert row["us"] is not None, (key, row)
        assert row["us"] > 0, (key, row)
        assert row["per"] in {"aggregate", "target", "request"}, (key, row)
    assert budget["rows"]["policies"]["in_total"] == 5
    assert budget["total_us_per_aggregate"] > 0
    assert {"date", "machine", "versions"} <= set(budget)
    table = run.stdout.splitlines()
    assert table[0].startswith("| row | µs | per | in total |")
    assert sum(line.startswith("| ") for line in table) == len(ROWS) + 2  # the head, the total
