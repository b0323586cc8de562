"""Test-suite settings shared by every module.

Hypothesis runs derandomized by default so CI is repeatable (the same examples every run, no example
database); `HYPOTHESIS_PROFILE=explore` draws fresh examples for a local bug hunt.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))
