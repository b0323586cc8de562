"""The memory budget of the process and the ledger soft state is charged against.

One number (--memory-budget-mb, default half of the host's memory or of the cgroup limit, whichever is
smaller) bounds what the server holds beyond what it needs to run at all (its resident size at start).
That remainder is split once, at start:
* state: telemetry windows and placements in force, charged when a deployment registers and when its
  window is allocated, released when it is deleted;
* one large solver job at a time, and one small-lane job beside it (their estimated peaks);
* the inputs of queued solve requests.
A charge that would not fit is refused with ResourceExhausted before anything is allocated.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path

from .admission import mib
from .errors import ResourceExhausted
from .metrics import Metrics

STATE_SHARE, LARGE_JOB_SHARE, SMALL_JOB_SHARE, QUEUE_SHARE = 0.4, 0.35, 0.1, 0.15
AUTO_FRACTION = 0.5
# Below this much room beyond the start-up footprint the shares would be useless: they get at least this.
MIN_AVAILABLE_BYTES = 64 * 2**20


def host_memory_bytes() -> int:
    """Physical memory, or the cgroup v2/v1 limit when one is set and smaller."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def resident_bytes() -> int:
    """This process's resident set size now (from /proc; the peak from getrusage where /proc is absent)."""
    try:
        fields = Path("/proc/self/statm").read_text().split()
        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass(frozen=True)
class MemoryShares:
    """The budget split into its four uses, in bytes."""

    total: int
    baseline: int
    state: int
    large_job: int
    small_job: int
    queue: int

    @classmethod
    def split(cls, budget_mb: float, baseline: int | None = None) -> MemoryShares:
        total = int(budget_mb * 2**20) if budget_mb > 0 else int(host_memory_bytes() * AUTO_FRACTION)
        baseline = resident_bytes() if baseline is None else baseline
        available = max(total - baseline, MIN_AVAILABLE_BYTES)
        return cls(
            total=total,
            baseline=baseline,
            state=int(available * STATE_SHARE),
            large_job=int(available * LARGE_JOB_SHARE),
            small_job=int(available * SMALL_JOB_SHARE),
            queue=int(available * QUEUE_SHARE),
        )


class StateLedger:
    """Bytes of soft state held, against the state share and a cap on deployments.

    Only the event loop charges and releases, so no lock is needed.
    """

    def __init__(self, limit_bytes: int, max_deployments: int, metrics: Metrics) -> None:
        self.limit = limit_bytes
        self.max_deployments = max_deployments
        self.used = 0
        self.metrics = metrics
        metrics.state_budget_bytes.set(limit_bytes)

    def charge(self, nbytes: int, what: str, *, force: bool = False) -> None:
        """Reserve `nbytes` for `what`, or raise ResourceExhausted (unless `force`: restored state)."""
        if not force and self.used + nbytes > self.limit:
            raise ResourceExhausted(
                f"soft-state memory budget is full: {what} needs {mib(nbytes)}, {mib(self.limit - self.used)} "
                f"of {mib(self.limit)} left; delete unused deployments, lower --window or --history-intervals, "
                "or raise --memory-budget-mb"
            )
        self.used += nbytes
        self.metrics.state_bytes.set(self.used)

    def release(self, nbytes: int) -> None:
        self.used = max(self.used - nbytes, 0)
        self.metrics.state_bytes.set(self.used)

    def check_count(self, registered: int) -> None:
        if registered >= self.max_deployments:
            raise ResourceExhausted(
                f"deployment cap reached ({self.max_deployments}): delete unused deployments or raise --max-deployments"
            )
