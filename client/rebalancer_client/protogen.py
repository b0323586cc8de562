"""Regenerate the committed protobuf/gRPC modules in `rebalancer_client/v1` (`make protos`).

The generated gRPC module imports its messages as `rebalancer.v1.rebalancer_pb2`, which would collide
with the server package; it is rewritten to a relative import so the stubs live inside the client.
A test runs `generate()` into a temporary folder and compares, so stale stubs fail the suite.
"""

from __future__ import annotations

import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "protos"
PROTO = "rebalancer/v1/rebalancer.proto"
TARGET = pathlib.Path(__file__).resolve().parent / "v1"
GENERATED = ("rebalancer_pb2.py", "rebalancer_pb2.pyi", "rebalancer_pb2_grpc.py")


def generate(out_dir: pathlib.Path) -> dict[str, str]:
    """Run protoc into `out_dir`; returns {file name: text} of the three generated modules."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as raw:
        outputs = [f"--python_out={raw}", f"--pyi_out={raw}", f"--grpc_python_out={raw}"]
        args = ["protoc", f"-I{PROTO_ROOT}", *outputs, PROTO]
        include = pathlib.Path(protoc.__file__).parent / "_proto"
        if protoc.main([*args, f"-I{include}"]) != 0:
            raise RuntimeError(f"protoc failed on {PROTO}")
        generated = pathlib.Path(raw) / "rebalancer" / "v1"
        texts = {name: (generated / name).read_text() for name in GENERATED}
    texts["rebalancer_pb2_grpc.py"] = texts["rebalancer_pb2_grpc.py"].replace(
        "from rebalancer.v1 import rebalancer_pb2", "from . import rebalancer_pb2"
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (out_dir / name).write_text(text)
    return texts


def main() -> int:
    generate(TARGET)
    print(f"regenerated {', '.join(GENERATED)} in {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
