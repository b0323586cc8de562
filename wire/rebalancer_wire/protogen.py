"""Regenerate the committed protobuf/gRPC modules in `rebalancer_wire/v1` (`make protos`).

The proto lives at `protos/rebalancer/v1/rebalancer.proto` (package `rebalancer.v1`, as buf wants), but
protoc is shown that directory under the virtual path `rebalancer_wire/`, so the generated modules import
each other as `rebalancer_wire.v1` and need no rewriting. A test runs `generate()` into a temporary
folder and compares, so stale stubs fail the suite.
"""

from __future__ import annotations

import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "protos" / "rebalancer"
PROTO = "rebalancer_wire/v1/rebalancer.proto"
TARGET = pathlib.Path(__file__).resolve().parent / "v1"
GENERATED = ("rebalancer_pb2.py", "rebalancer_pb2.pyi", "rebalancer_pb2_grpc.py")


def generate(out_dir: pathlib.Path) -> dict[str, str]:
    """Run protoc into `out_dir`; returns {file name: text} of the three generated modules."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as raw:
        outputs = [f"--python_out={raw}", f"--pyi_out={raw}", f"--grpc_python_out={raw}"]
        include = pathlib.Path(protoc.__file__).parent / "_proto"
        args = ["protoc", f"-Irebalancer_wire={PROTO_DIR}", f"-I{include}", *outputs, PROTO]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO}")
        generated = pathlib.Path(raw) / "rebalancer_wire" / "v1"
        texts = {name: (generated / name).read_text() for name in GENERATED}
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
