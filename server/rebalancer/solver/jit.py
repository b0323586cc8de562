"""Numba compilation for the solver's CPU loops, cached on disk where a cache can be written.

Compiling the loops costs seconds on first use; Numba's on-disk cache turns that into milliseconds for
the next process. A read-only install run by a user without a writable home (a locked-down container)
has no cache location, where Numba refuses `cache=True` outright: those loops compile per process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba


def compiled(**options: Any) -> Callable[[Callable], Callable]:
    """`numba.njit(nogil=True, cache=True, **options)`, without the cache where none can be written."""

    def decorate(function: Callable) -> Callable:
        try:
            return numba.njit(nogil=True, cache=True, **options)(function)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            return numba.njit(nogil=True, **options)(function)

    return decorate
