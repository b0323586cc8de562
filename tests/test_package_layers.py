"""Data flows one way between the packages: the wire package imports neither side, the client never the
server. Checked in a fresh interpreter, so an import made by another test cannot hide a violation."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

LAYERS = {
    "rebalancer_wire": ("rebalancer", "rebalancer_client", "torch"),
    "rebalancer_client": ("rebalancer", "torch"),
}


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_package_imports_nothing_above_it(package):
    forbidden = LAYERS[package]
    script = (
        "import importlib, json, pkgutil, sys\n"
        f"root = importlib.import_module({package!r})\n"
        "for info in pkgutil.walk_packages(root.__path__, root.__name__ + '.'):\n"
        "    importlib.import_module(info.name)\n"
        "print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    loaded = set(json.loads(result.stdout))
    assert not loaded & set(forbidden), f"{package} pulls in {sorted(loaded & set(forbidden))}"
