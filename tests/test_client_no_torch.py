"""The client never imports torch: import, codec, placement and CLI work where `import torch` fails."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

BLOCKER = """
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
"""

SCRIPT = """
import sys
import numpy as np
import rebalancer_client
from rebalancer_client import RebalancerClient, AsyncRebalancerClient, LoadReporter, ShardedClient, Placement
from rebalancer_wire.codec import decode, encode
from rebalancer_client.cli import main, read_loads

try:
    import torch
except ImportError:
    pass
else:
    raise SystemExit("torch was importable: the blocker failed")
array = np.arange(12, dtype=np.float32).reshape(3, 4)
assert np.array_equal(decode(encode(array)), array)
try:
    read_loads(sys.argv[1])
except ValueError as exc:
    assert "needs torch" in str(exc), exc
else:
    raise SystemExit(".pt was read without torch")
assert main(["rebalance", sys.argv[1], "--replicas", "4", "--gpus", "2"]) == 2
print("ok", [name for name in sys.modules if name.split(".")[0] == "torch"])
"""


def _env(tmp_path: pathlib.Path) -> dict[str, str]:
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    return env


def test_client_imports_encodes_and_runs_without_torch(tmp_path):
    loads = tmp_path / "loads.pt"
    loads.write_bytes(b"not really a torch file")
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT), str(loads)],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "ok ['torch']" in result.stdout  # only the blocker's None entry, no torch module loaded
    assert "reading .pt files needs torch" in result.stderr


def test_cli_help_and_health_without_torch(tmp_path):
    env = _env(tmp_path)
    cli = [sys.executable, "-m", "rebalancer_client.cli"]
    help_text = subprocess.run([*cli, "--help"], env=env, capture_output=True, text=True, timeout=60)
    assert help_text.returncode == 0 and "rebalance" in help_text.stdout, help_text.stderr
    health = subprocess.run(
        [*cli, "health", "--target", "127.0.0.1:1", "--timeout", "0.5"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert health.returncode == 1 and "UNAVAILABLE" in health.stdout, health.stderr
