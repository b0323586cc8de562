"""Cooperative cancellation of a solve, checked between the rounds of its sequential loops.

A solve is thousands of small tensor steps (greedy LPT places one item per step, refinement swaps once
per round), so stopping between steps bounds how long a cancelled solve keeps its thread: one step, tens
of microseconds on a CPU. The caller scopes a stop condition with `stop_when`; the loops call
`checkpoint`, which raises `SolveCancelled` once the condition holds. Without a scope, `checkpoint` costs
one context-variable read and never raises, so library callers see no change.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

_should_stop: contextvars.ContextVar[Callable[[], bool] | None] = contextvars.ContextVar(
    "rebalancer_solver_should_stop", default=None
)


class SolveCancelled(Exception):
    """The stop condition of the enclosing `stop_when` held at a checkpoint; the solve was abandoned."""


@contextlib.contextmanager
def stop_when(should_stop: Callable[[], bool]) -> Iterator[None]:
    """Within this block (on this thread), solver loops raise SolveCancelled once `should_stop()` is true.

    `should_stop` is called at every checkpoint, so it must be cheap (a flag or clock read).
    """
    token = _should_stop.set(should_stop)
    try:
        yield
    finally:
        _should_stop.reset(token)


def checkpoint() -> None:
    """Raise SolveCancelled when the enclosing stop condition holds; a no-op outside `stop_when`."""
    should_stop = _should_stop.get()
    if should_stop is not None and should_stop():
        raise SolveCancelled("solve cancelled")
