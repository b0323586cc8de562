"""Test-suite settings shared by every module.

benchmarks/ goes on the import path: its `workloads` (load generators, placement scores) and `serving`
(the port helper) are shared by the tests and the benchmarks.

Hypothesis runs derandomized by default so CI is repeatable (the same examples every run, no example
database); `HYPOTHESIS_PROFILE=explore` draws fresh examples for a local bug hunt.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hypothesis import settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))
