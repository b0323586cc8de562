"""Test-suite settings shared by every module.

benchmarks/ goes on the import path, for the tests that run the benchmarks on small shapes; what tests and
benchmarks share (loads, scores, the port helper, the engines' wheels) is the `rebalancer_testkit` package.

Hypothesis runs derandomized by default so CI is repeatable (the same examples every run, no example
database); `HYPOTHESIS_PROFILE=explore` draws fresh examples for a local bug hunt.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real in-process server (`service_harness.ServerThread`, default test settings) shared by one
    module's tests; a module that needs other settings defines its own `server`."""
    from service_harness import ServerThread  # here, not on top: client tests must run without torch loaded

    with ServerThread(str(tmp_path_factory.mktemp("state"))) as running:
        yield running
