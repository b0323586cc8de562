"""The server re-planning by itself when the placement in force drifts out of balance.

Every `period_s`, each deployment whose window received reports since the last look is scored: the
imbalance (max/mean GPU load, mean over layers) of its current placement on the window is exported,
and when it exceeds `threshold` the deployment is re-planned from that placement (through the batcher,
so it batches with requests) and committed with trigger "auto", which pushes it to watchers.

Hysteresis against flapping: a re-plan is committed only when it lowers the imbalance on the window by
at least `hysteresis` (moving weights for less is not worth it, and a load that no placement balances
better does not cause a commit every period). Attempts on one deployment are at least
`min_interval_s` apart, committed or not.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import KW_ONLY, dataclass, field

from rebalancer_wire.options import SolveSettings

from .deployments import Deployment, Registry
from .errors import ServiceError

log = logging.getLogger(__name__)


@dataclass(eq=False)
class AutoRebalancer:
    """The re-planning loop over `registry`; the policy fields are the ones the module doc describes."""

    registry: Registry
    _: KW_ONLY
    threshold: float
    min_interval_s: float
    hysteresis: float
    period_s: float = 1.0
    _seen: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    _last_attempt: dict[str, float] = field(default_factory=dict, init=False, repr=False)
    _task: asyncio.Task | None = field(default=None, init=False, repr=False)

    @property
    def enabled(self) -> bool:
        return self.threshold > 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="auto-rebalancer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.period_s)
            for gone in (self._seen.keys() | self._last_attempt.keys()) - self.registry.deployments.keys():
                self._seen.pop(gone, None)
                self._last_attempt.pop(gone, None)
            for deployment in list(self.registry.deployments.values()):
                try:
                    await self.check(deployment)
                except ServiceError as error:  # e.g. queue full or deleted meanwhile: try again next period
                    log.warning("auto-rebalance of %s skipped: %s", deployment.deployment_id, error)
                except Exception:
                    log.exception("auto-rebalance of %s failed", deployment.deployment_id)

    async def check(self, deployment: Deployment) -> bool:
        """Score one deployment and re-plan it when due; True when a new version was committed."""
        deployment_id = deployment.deployment_id
        received = self.registry.windows.received(deployment_id)
        if deployment.current is None or self._seen.get(deployment_id) == received:
            return False
        self._seen[deployment_id] = received
        quality = await self.registry.quality(deployment)
        if quality is None or not self.enabled:
            return False
        due = time.monotonic() - self._last_attempt.get(deployment_id, float("-inf")) >= self.min_interval_s
        if quality.imbalance <= self.threshold:
            return False
        if not due:
            self._seen.pop(deployment_id)  # look again next period even without new reports
            return False
        self._last_attempt[deployment_id] = time.monotonic()
        layout = deployment.topology
        outcome = await self.registry.plan(deployment, SolveSettings())
        if float((1.0 / outcome.balancedness).mean()) > quality.imbalance - self.hysteresis:
            return False
        await self.registry.commit(deployment, outcome, trigger="auto", planned_on=layout)
        log.info("auto-rebalanced %s at imbalance %.4f", deployment_id, quality.imbalance)
        return True
