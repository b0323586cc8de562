"""The committed gRPC stubs match the proto, and the proto follows buf's STANDARD lint rules."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import pytest
from rebalancer_wire import protogen

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_generated_modules_are_not_stale(tmp_path):
    fresh = protogen.generate(tmp_path)
    for name, text in fresh.items():
        committed = (protogen.TARGET / name).read_text()
        assert committed == text, f"{name} is stale: run `make protos` and commit the result"


def _buf() -> str | None:
    beside = pathlib.Path(sys.executable).with_name("buf")
    return str(beside) if beside.exists() else shutil.which("buf")


def test_proto_passes_buf_lint():
    buf = _buf()
    if buf is None:
        pytest.skip("buf not installed (pip install buf-bin)")
    result = subprocess.run([buf, "lint"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_service_names_follow_the_contract():
    from rebalancer_wire.v1 import rebalancer_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["RebalancerService"]
    assert service.full_name == "rebalancer.v1.RebalancerService"
    assert {"Rebalance", "StreamLoad", "GetPlacement", "WatchPlacement"} <= set(service.methods_by_name)
