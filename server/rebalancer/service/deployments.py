"""Deployments and their placement versions: the domain the RPC handlers and the auto-rebalancer drive.

Data flows one way: window snapshot -> batcher -> solver -> PlacementRecord -> store -> watchers and
metrics. Commits of one deployment are serialised by its lock, so versions are dense and a
`base_version` check is exact. The in-memory `current` record is what every read serves; SQLite is the
durable copy written before `current` changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np
import torch
from rebalancer_wire.options import SolveSettings
from rebalancer_wire.v1 import rebalancer_pb2 as pb

from rebalancer.solver import CostModel, maps

from .batcher import Batcher, PlanOutcome, SolveJob
from .errors import FailedPrecondition, InvalidArgument, NotFound
from .metrics import Metrics
from .model import PlacementRecord, Topology
from .store import Store
from .telemetry import Quality, TelemetryWindows


@dataclass
class Deployment:
    deployment_id: str
    topology: Topology
    current: PlacementRecord | None = None
    # Replaced on every commit: waiters hold the old one, which is set to wake them.
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    deleted: bool = False

    @property
    def version(self) -> int:
        return self.current.version if self.current is not None else 0

    def notify(self) -> None:
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()


def now_ms() -> int:
    return int(time.time() * 1000)


def placement_stats(outcome: PlanOutcome) -> pb.PlacementStats:
    """Per-layer figures -> PlacementStats (means over layers; imbalance = max/mean = 1/balancedness)."""
    before = outcome.balancedness_before
    return pb.PlacementStats(
        balancedness_before=float(before.mean()) if before is not None else 0.0,
        balancedness_after=float(outcome.balancedness.mean()),
        imbalance_before=float((1.0 / before).mean()) if before is not None else 0.0,
        imbalance_after=float((1.0 / outcome.balancedness).mean()),
        replicas_moved=int(outcome.moved_copies.sum()),
        moved_per_layer=outcome.moved_copies.tolist(),
        solve_seconds=outcome.solve_seconds,
        device=outcome.device,
        policies=[pb.PolicyLayers(policy=name, layers=count) for name, count in sorted(outcome.policies.items())],
        batch_layers=outcome.batch_layers,
        batch_requests=outcome.batch_requests,
        solver_path=outcome.solver_path,
        moved_bytes=outcome.moved_bytes,
        intra_node_share=outcome.intra_node_share,
        estimated_transfer_seconds=outcome.estimated_transfer_seconds,
        deferred_layers=outcome.deferred_layers,
    )


class Registry:
    """Every deployment the server knows, with its window, placement versions and watchers."""

    def __init__(self, store: Store, windows: TelemetryWindows, batcher: Batcher, metrics: Metrics) -> None:
        self.store = store
        self.windows = windows
        self.batcher = batcher
        self.metrics = metrics
        self.deployments: dict[str, Deployment] = {}
        self._register_lock = asyncio.Lock()
        self.stopping = asyncio.Event()

    async def restore(self) -> None:
        """Load deployments and current placements from the store; windows start empty."""
        topologies, placements = await asyncio.to_thread(self.store.load)
        for deployment_id, topology in topologies.items():
            record = placements.get(deployment_id)
            if record is not None:
                phy2log = torch.from_numpy(record.phy2log)
                logcnt = maps.logcnt_from_phy2log(phy2log, topology.num_experts)
                record.logcnt = logcnt.numpy()
                record.log2phy = maps.log2phy_from_phy2log(phy2log, logcnt).numpy()
            self.deployments[deployment_id] = Deployment(deployment_id, topology, record)
            await self.windows.ensure(deployment_id, topology)
            if record is not None:
                await self.windows.set_placement(deployment_id, record.phy2log)
        self.metrics.deployments.set(len(self.deployments))

    def get(self, deployment_id: str) -> Deployment:
        deployment = self.deployments.get(deployment_id)
        if deployment is None:
            raise NotFound(f"unknown deployment {deployment_id!r}")
        return deployment

    async def register(self, deployment_id: str, topology: Topology) -> Deployment:
        """The deployment, created (and persisted) on first sight; its topology must match afterwards."""
        async with self._register_lock:
            deployment = self.deployments.get(deployment_id)
            if deployment is None:
                await self.store.add_deployment(deployment_id, topology, now_ms())
                await self.windows.ensure(deployment_id, topology)
                deployment = self.deployments[deployment_id] = Deployment(deployment_id, topology)
                self.metrics.deployments.set(len(self.deployments))
        if deployment.topology != topology:
            raise InvalidArgument([("topology", f"does not match deployment {deployment_id!r}: {deployment.topology}")])
        return deployment

    async def plan(
        self,
        deployment: Deployment,
        settings: SolveSettings,
        *,
        loads: np.ndarray | None = None,
        base_version: int = 0,
        deadline: float | None = None,
        cost_model: CostModel | None = None,
        unavailable_gpus: tuple[int, ...] = (),
        in_force: np.ndarray | None = None,
    ) -> PlanOutcome:
        """Plan on `loads` (default: the window, with its history) from the placement in force: `in_force`
        [L, R] when the caller knows better than the committed version (an engine's actual map)."""
        if base_version and base_version != deployment.version:
            raise FailedPrecondition(f"base_version {base_version} is stale: current version is {deployment.version}")
        history = None
        if loads is None:
            snapshot = await self.windows.snapshot(deployment.deployment_id)
            if not snapshot.reports:
                raise FailedPrecondition(
                    f"deployment {deployment.deployment_id!r} has no telemetry yet: stream or pass loads"
                )
            loads, history = snapshot.loads, snapshot.history
        current = deployment.current
        if in_force is None and current is not None:
            in_force = current.phy2log
        job = SolveJob(
            topology=deployment.topology,
            settings=settings,
            loads=loads,
            prev_phy2log=None if settings.fresh else in_force,
            history=history,
            baseline_phy2log=in_force if settings.fresh else None,
            deadline=deadline,
            cost_model=cost_model,
            unavailable_gpus=unavailable_gpus,
        )
        outcome = await self.batcher.submit(job)
        self.metrics.balancedness.labels(deployment.deployment_id, "proposed").set(float(outcome.balancedness.mean()))
        return outcome

    async def commit(
        self, deployment: Deployment, outcome: PlanOutcome, *, trigger: str, base_version: int = 0
    ) -> PlacementRecord:
        """Persist `outcome` as the next version, then serve it and wake the watchers."""
        async with deployment.lock:
            if deployment.deleted:
                raise NotFound(f"deployment {deployment.deployment_id!r} was deleted")
            if base_version and base_version != deployment.version:
                raise FailedPrecondition(
                    f"base_version {base_version} is stale: current version is {deployment.version}"
                )
            record = PlacementRecord(
                deployment_id=deployment.deployment_id,
                version=deployment.version + 1,
                topology=deployment.topology,
                phy2log=outcome.phy2log,
                logcnt=outcome.logcnt,
                log2phy=outcome.log2phy,
                stats=placement_stats(outcome),
                trigger=trigger,
                created_unix_ms=now_ms(),
                transfers=outcome.transfers,
            )
            await self.store.commit(record)
            deployment.current = record
            await self.windows.set_placement(deployment.deployment_id, record.phy2log)
        labels = deployment.deployment_id
        self.metrics.placements.labels(trigger).inc()
        self.metrics.replicas_moved.labels(labels).inc(record.stats.replicas_moved)
        self.metrics.balancedness.labels(labels, "current").set(record.stats.balancedness_after)
        self.metrics.imbalance_ratio.labels(labels).set(record.stats.imbalance_after)
        deployment.notify()
        return record

    async def quality(self, deployment: Deployment) -> Quality | None:
        """Score the placement in force on the window and export it (imbalance and current balancedness)."""
        quality = await self.windows.quality(deployment.deployment_id)
        if quality is not None and not deployment.deleted:
            self.metrics.imbalance_ratio.labels(deployment.deployment_id).set(quality.imbalance)
            self.metrics.balancedness.labels(deployment.deployment_id, "current").set(quality.balancedness)
        return quality

    async def delete(self, deployment_id: str) -> bool:
        """Forget a deployment: rows, window, metric series; its watchers end. False when unknown."""
        deployment = self.deployments.get(deployment_id)
        if deployment is None:
            return False
        async with deployment.lock:
            deployment.deleted = True
            await self.store.delete_deployment(deployment_id)
            del self.deployments[deployment_id]
        await self.windows.drop(deployment_id)
        self.metrics.forget_deployment(deployment_id)
        self.metrics.deployments.set(len(self.deployments))
        deployment.notify()
        return True

    async def watch(self, deployment: Deployment, after_version: int) -> AsyncIterator[PlacementRecord]:
        """Every version newer than `after_version` (the latest when several landed at once).

        Ends when the deployment is deleted or the server stops.
        """
        sent = after_version
        while not deployment.deleted and not self.stopping.is_set():
            current = deployment.current
            if current is not None and current.version > sent:
                sent = current.version
                yield current
                continue
            changed = asyncio.ensure_future(deployment.changed.wait())
            stopping = asyncio.ensure_future(self.stopping.wait())
            try:
                await asyncio.wait((changed, stopping), return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in (changed, stopping):
                    waiter.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await waiter
