"""generated/ is what `make proto` makes from protos/: fail when they drift apart."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = "aggregator/v1/aggregator.proto"
FILES = ("aggregator_pb2.py", "aggregator_pb2.pyi", "aggregator_pb2_grpc.py")


def test_generated_stubs_match_protos(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT / 'protos'}",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            str(ROOT / "protos" / PROTO),
        ],
        check=True,
    )
    for name in FILES:
        fresh = (tmp_path / "aggregator" / "v1" / name).read_text()
        committed = (ROOT / "generated" / "aggregator" / "v1" / name).read_text()
        assert fresh == committed, f"generated/aggregator/v1/{name} is stale: run `make proto`"
