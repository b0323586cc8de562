"""Deployments and their placement versions: the domain the RPC handlers and the auto-rebalancer drive.

Data flows one way: checked command -> window snapshot -> batcher -> solver -> PlacementRecord -> store
-> watchers and metrics. Commits of one deployment are serialised by its lock, so versions are dense and
a `base_version` check is exact. The in-memory `current` record is what every read serves; SQLite is the
durable copy written before `current` changes.

Registration is one step: the state ledger is charged, the SQLite row written and (for a report) the
window created and the report added, or nothing of it remains. A placement is committed only when its
message fits in a response, so whoever asked for it can read it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np
import torch
from rebalancer_wire.options import SolveSettings
from rebalancer_wire.v1 import rebalancer_pb2 as pb

from rebalancer.solver import CostModel, maps

from .admission import deployment_bytes, mib, placement_message_bound
from .batcher import Batcher, PlanOutcome, SolveJob
from .budget import StateLedger
from .commands import AdviseCommand, PlanCommand, ReportCommand
from .errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from .metrics import Metrics
from .model import PlacementRecord, Topology
from .rearrangement import layout_after
from .store import Store
from .telemetry import Quality, TelemetryWindows

log = logging.getLogger(__name__)


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

    def require_version(self, base_version: int) -> None:
        """FailedPrecondition unless `base_version` is 0 (no check) or the version in force."""
        if base_version and base_version != self.version:
            raise FailedPrecondition(f"base_version {base_version} is stale: current version is {self.version}")

    def notify(self) -> None:
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()


def require_layout(deployment: Deployment, layout: Topology) -> None:
    """FailedPrecondition when an elastic commit moved `deployment` off `layout` (the layout a request
    was checked or planned against); the layout object is replaced on every such commit."""
    if deployment.topology is not layout:
        raise FailedPrecondition(
            f"deployment {deployment.deployment_id!r} moved to another GPU set meanwhile "
            f"({deployment.topology.num_gpus} GPUs): plan again"
        )


def now_ms() -> int:
    return int(time.time() * 1000)


def _finite(value: float) -> float:
    """Stats and gauges stay numbers: a non-finite figure (which valid loads cannot produce) reads 0."""
    return value if math.isfinite(value) else 0.0


def placement_stats(outcome: PlanOutcome) -> pb.PlacementStats:
    """Per-layer figures -> PlacementStats (means over layers; imbalance = max/mean = 1/balancedness)."""
    before = outcome.balancedness_before
    return pb.PlacementStats(
        balancedness_before=_finite(float(before.mean())) if before is not None else 0.0,
        balancedness_after=_finite(float(outcome.balancedness.mean())),
        imbalance_before=_finite(float((1.0 / before).mean())) if before is not None else 0.0,
        imbalance_after=_finite(float((1.0 / outcome.balancedness).mean())),
        replicas_moved=int(outcome.moved_copies.sum()),
        moved_per_layer=outcome.moved_copies.tolist(),
        solve_seconds=outcome.solve_seconds,
        device=outcome.device,
        policies=[pb.PolicyLayers(policy=name, layers=count) for name, count in sorted(outcome.policies.items())],
        batch_layers=outcome.batch_layers,
        batch_requests=outcome.batch_requests,
        solver_path=outcome.solver_path,
        moved_bytes=_finite(outcome.moved_bytes),
        intra_node_share=_finite(outcome.intra_node_share),
        estimated_transfer_seconds=_finite(outcome.estimated_transfer_seconds),
        deferred_layers=outcome.deferred_layers,
    )


def _inline_job(command: PlanCommand, topology: Topology, deadline: float | None) -> SolveJob:
    """The solve of a command that brings its own loads (an inline plan, or a new deployment's first)."""
    return SolveJob(
        topology,
        command.settings,
        command.loads,
        prev_phy2log=command.prev_phy2log,
        deadline=deadline,
        unavailable_gpus=command.unavailable_gpus,
        cost_model=command.cost_model,
    )


def _retrieve(task: asyncio.Future) -> None:
    """Mark a task's outcome as read (its awaiting caller may have been cancelled)."""
    if not task.cancelled():
        task.exception()


def placement_record(
    deployment_id: str, topology: Topology, outcome: PlanOutcome, *, version: int = 0, trigger: str = "request"
) -> PlacementRecord:
    """The one place a solver outcome becomes a PlacementRecord (version 0: not committed); a plan for a
    changed GPU set describes its new layout."""
    return PlacementRecord(
        deployment_id=deployment_id,
        version=version,
        topology=layout_after(topology, outcome.gpu_ids),
        phy2log=outcome.phy2log,
        logcnt=outcome.logcnt,
        log2phy=outcome.log2phy,
        stats=placement_stats(outcome),
        trigger=trigger,
        created_unix_ms=now_ms() if version else 0,
        transfers=outcome.transfers,
        gpu_ids=outcome.gpu_ids,
    )


class Registry:
    """Every deployment the server knows, with its window, placement versions and watchers."""

    def __init__(
        self,
        store: Store,
        windows: TelemetryWindows,
        batcher: Batcher,
        metrics: Metrics,
        ledger: StateLedger,
        *,
        max_message_bytes: int,
    ) -> None:
        self.store = store
        self.windows = windows
        self.batcher = batcher
        self.metrics = metrics
        self.ledger = ledger
        self.max_message_bytes = max_message_bytes
        self.deployments: dict[str, Deployment] = {}
        self._register_lock = asyncio.Lock()
        self.stopping = asyncio.Event()

    async def restore(self) -> None:
        """Load deployments and current placements from the store. Windows are not allocated: each is
        created on its deployment's first report, so a restart never needs room for all of them at once."""
        topologies, placements = await asyncio.to_thread(self.store.load)
        for deployment_id, topology in topologies.items():
            record = placements.get(deployment_id)
            if record is not None:
                phy2log = torch.from_numpy(record.phy2log)
                logcnt = maps.logcnt_from_phy2log(phy2log, topology.num_experts)
                record.logcnt = logcnt.numpy()
                record.log2phy = maps.log2phy_from_phy2log(phy2log, logcnt).numpy()
                await self.windows.set_placement(deployment_id, record.phy2log)
            # Committed state is served whatever the budget says now: charged, never refused.
            self.ledger.charge(deployment_bytes(topology), f"deployment {deployment_id!r}", force=True)
            self.deployments[deployment_id] = Deployment(deployment_id, topology, record)
        self.metrics.deployments.set(len(self.deployments))
        if self.ledger.used > self.ledger.limit:
            log.warning(
                "restored state takes %s, over the %s state budget: new deployments and windows are refused "
                "until some are deleted",
                mib(self.ledger.used),
                mib(self.ledger.limit),
            )

    def get(self, deployment_id: str) -> Deployment:
        deployment = self.deployments.get(deployment_id)
        if deployment is None:
            raise NotFound(f"unknown deployment {deployment_id!r}")
        return deployment

    def topology_of(self, deployment_id: str) -> Topology | None:
        deployment = self.deployments.get(deployment_id)
        return None if deployment is None else deployment.topology

    async def register(self, deployment_id: str, topology: Topology) -> Deployment:
        """The deployment, created (and persisted) on first sight; its topology must match afterwards."""
        deployment, _ = await self._register(deployment_id, topology)
        return deployment

    async def _register(
        self, deployment_id: str, topology: Topology, first_report: ReportCommand | None = None
    ) -> tuple[Deployment, bool]:
        """(deployment, whether `first_report` was added). A new deployment is created in one step:
        ledger charge, SQLite row and, with `first_report`, its window holding that report; any failure
        undoes the steps before it. An existing one is returned as it is (its topology must match)."""
        async with self._register_lock:
            deployment = self.deployments.get(deployment_id)
            if deployment is not None:
                if topology.conflicts(deployment.topology):
                    raise InvalidArgument(
                        [("topology", f"does not match deployment {deployment_id!r}: {deployment.topology}")]
                    )
                return deployment, False
            self.ledger.check_count(len(self.deployments))
            nbytes = deployment_bytes(topology)
            self.ledger.charge(nbytes, f"deployment {deployment_id!r}")
            try:
                await self._persist_new(deployment_id, topology)
                if first_report is not None:
                    await self._add_first_report(first_report)
            except BaseException:
                self.ledger.release(nbytes)
                raise
            deployment = self.deployments[deployment_id] = Deployment(deployment_id, topology)
            self.metrics.deployments.set(len(self.deployments))
            return deployment, first_report is not None

    async def _persist_new(self, deployment_id: str, topology: Topology) -> None:
        try:
            await self.store.add_deployment(deployment_id, topology, now_ms())
        except sqlite3.Error:
            log.exception("cannot persist deployment %s", deployment_id)
            raise Unavailable("the state store cannot take the deployment now: retry later") from None

    async def _add_first_report(self, report: ReportCommand) -> None:
        """Add the registering report; on refusal remove the row just written, so the id stays free."""
        try:
            await self.windows.add(
                report.deployment_id, report.topology, report.loads, report.layer_indices, report.step
            )
        except BaseException:
            await self.store.delete_deployment(report.deployment_id)
            raise

    async def ingest(self, report: ReportCommand) -> None:
        """Add a checked report to its deployment's window, registering the deployment when new."""
        deployment = self.deployments.get(report.deployment_id)
        if deployment is None:
            deployment, added = await self._register(report.deployment_id, report.topology, report)
            if added:
                return
        try:
            await self.windows.add(
                report.deployment_id,
                report.topology,
                report.loads,
                report.layer_indices,
                report.step,
                alive=lambda: not deployment.deleted,
            )
        except KeyError:
            raise InvalidArgument([("deployment_id", "deployment was deleted")]) from None

    async def rebalance(self, command: PlanCommand, message: pb.Placement, deadline: float | None = None) -> bool:
        """Plan a checked command; commit it unless inline or dry-run. The placement is written into
        `message` (the response's), encoded once for the size check and the answer. Returns whether it
        was committed."""
        if command.inline:
            outcome = await self.batcher.submit(_inline_job(command, command.topology, deadline))
            self._fitting(placement_record("", command.topology, outcome), message)
            return False
        deployment = self.deployments.get(command.deployment_id)
        if deployment is None:
            return await self._rebalance_new(command, message, deadline)
        deployment.require_version(command.base_version)  # fail fast; commit checks again under the lock
        planned_on = deployment.topology
        if command.checked_against is not None:
            require_layout(deployment, command.checked_against)
        outcome = await self.plan(
            deployment,
            command.settings,
            loads=command.loads,
            deadline=deadline,
            cost_model=command.cost_model,
            unavailable_gpus=command.unavailable_gpus,
            in_force=command.prev_phy2log,
        )
        if command.settings.dry_run:
            self._fitting(placement_record(deployment.deployment_id, planned_on, outcome), message)
            return False
        await self.commit(
            deployment,
            outcome,
            trigger="request",
            base_version=command.base_version,
            message=message,
            planned_on=planned_on,
        )
        return True

    async def _rebalance_new(self, command: PlanCommand, message: pb.Placement, deadline: float | None) -> bool:
        """A plan for a deployment not registered yet: solved first, registered only when it commits, so
        a refused or dry-run request leaves no deployment behind."""
        deployment_id, topology = command.deployment_id, command.topology
        if topology is None:
            raise NotFound(f"unknown deployment {deployment_id!r}")
        if command.loads is None:
            raise FailedPrecondition(f"deployment {deployment_id!r} has no telemetry yet: stream or pass loads")
        if command.base_version:
            raise FailedPrecondition(
                f"base_version {command.base_version} is stale: deployment {deployment_id!r} is new"
            )
        outcome = await self.batcher.submit(_inline_job(command, topology, deadline))
        if command.settings.dry_run:
            self._fitting(placement_record(deployment_id, topology, outcome), message)
            return False
        deployment = await self.register(deployment_id, topology)
        await self.commit(deployment, outcome, trigger="request", message=message)
        return True

    async def plan(
        self,
        deployment: Deployment,
        settings: SolveSettings,
        *,
        loads=None,
        deadline: float | None = None,
        cost_model: CostModel | None = None,
        unavailable_gpus: tuple[int, ...] = (),
        in_force: np.ndarray | None = None,
    ) -> PlanOutcome:
        """Plan on `loads` (default: the window, with its history) from the placement in force: `in_force`
        [L, R] when the caller knows better than the committed version (an engine's actual map)."""
        history = None
        if loads is None:
            loads, history = await self._window(deployment.deployment_id)
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
            cost_model=cost_model or deployment.topology.transfer_cost,
            unavailable_gpus=unavailable_gpus,
        )
        outcome = await self.batcher.submit(job)
        self.metrics.balancedness.labels(deployment.deployment_id, "proposed").set(
            _finite(float(outcome.balancedness.mean()))
        )
        return outcome

    async def _window(self, deployment_id: str) -> tuple[np.ndarray, np.ndarray | None]:
        """The deployment's window sum [L, E] and history [T, L, E]; FAILED_PRECONDITION while empty."""
        snapshot = await self.windows.snapshot(deployment_id)
        if snapshot is None or not snapshot.reports:
            raise FailedPrecondition(f"deployment {deployment_id!r} has no telemetry yet: stream or pass loads")
        return snapshot.loads, snapshot.history

    async def advise(self, command: AdviseCommand, deadline: float | None = None) -> list[tuple[int, PlanOutcome]]:
        """(slots per GPU, fresh plan) for each count of `command`, on its loads or the deployment's window;
        the counts are solved as separate jobs (each its own layout), so admission and lanes apply to each."""
        loads = command.loads
        if loads is None:
            loads, _ = await self._window(command.deployment_id)
        settings = dataclasses.replace(command.settings, dry_run=True, fresh=True)
        gpus = command.topology.num_gpus
        jobs = [
            SolveJob(
                topology=dataclasses.replace(command.topology, num_replicas=count * gpus),
                settings=settings,
                loads=loads,
                deadline=deadline,
            )
            for count in command.slots_per_gpu
        ]
        outcomes = await asyncio.gather(*(self.batcher.submit(job) for job in jobs))
        return list(zip(command.slots_per_gpu, outcomes, strict=True))

    def _fitting(self, record: PlacementRecord, message: pb.Placement | None = None) -> PlacementRecord:
        """`record`, once its message (written into `message` when given) is known to fit in a response
        (validation's bound makes this hold; this keeps it true for any placement the solver returns).
        The layout's bound decides without measuring the message: ByteSize encodes it all once more."""
        if message is not None:
            record.fill(message)
        if self._surely_fits(record):
            return record
        size = (record.fill(pb.Placement()) if message is None else message).ByteSize()
        if size > self.max_message_bytes - 1024:
            raise ResourceExhausted(
                f"the placement takes {mib(size)}, over the {mib(self.max_message_bytes)} message limit: "
                "lower num_layers per deployment or the spare slots (R - E); nothing was committed"
            )
        return record

    def _surely_fits(self, record: PlacementRecord) -> bool:
        """Whether `record`'s message fits in a response, known without encoding it: the largest
        placement of its layout (admission's bound) plus its transfer plan, int32 [T, 5]."""
        transfers = 0 if record.transfers is None else 4 * record.transfers.size
        return placement_message_bound(record.topology) + transfers <= self.max_message_bytes - 1024

    async def _store_while_encoding(
        self, record: PlacementRecord, message: pb.Placement, relayout: Topology | None
    ) -> Exception | None:
        """Write `record`'s row on the store thread while the event loop encodes it into `message` (both
        take about a millisecond for a DeepSeek-V3 placement). An encoding error is returned, not raised:
        the row is written regardless, so the commit must be completed before the caller hears of it."""
        written = self.store.start_commit(record, relayout)
        try:
            record.fill(message)
            error = None
        except Exception as exc:
            error = exc
        await written
        return error

    async def commit(
        self,
        deployment: Deployment,
        outcome: PlanOutcome,
        *,
        trigger: str,
        base_version: int = 0,
        message: pb.Placement | None = None,
        planned_on: Topology | None = None,
    ) -> PlacementRecord:
        """Persist `outcome` as the next version, then serve it and wake the watchers; its placement
        message is written into `message` when given. `planned_on` is the layout the plan was made for:
        a commit that moved the deployment to another one meanwhile wins.

        Shielded from the caller's cancellation (an RPC whose client goes away): the row, once handed to
        the store thread, is written anyway, and a stored version the server did not serve would make
        every later commit of the deployment collide with it.
        """
        committing = asyncio.ensure_future(
            self._commit(deployment, outcome, trigger, base_version, message, planned_on)
        )
        committing.add_done_callback(_retrieve)  # nobody may be left to read its error
        return await asyncio.shield(committing)

    async def _commit(
        self,
        deployment: Deployment,
        outcome: PlanOutcome,
        trigger: str,
        base_version: int,
        message: pb.Placement | None,
        planned_on: Topology | None,
    ) -> PlacementRecord:
        async with deployment.lock:
            if deployment.deleted:
                raise NotFound(f"deployment {deployment.deployment_id!r} was deleted")
            deployment.require_version(base_version)
            if planned_on is not None:
                require_layout(deployment, planned_on)
            record = placement_record(
                deployment.deployment_id, deployment.topology, outcome, version=deployment.version + 1, trigger=trigger
            )
            relayout = record.topology if record.gpu_ids is not None else None
            encode_error = None
            with self._recharged(deployment, relayout):
                if message is not None and self._surely_fits(record):
                    encode_error = await self._store_while_encoding(record, message, relayout)
                else:
                    await self.store.commit(self._fitting(record, message), relayout)
            deployment.current = record
            if relayout is not None:
                deployment.topology = relayout
            await self.windows.set_placement(deployment.deployment_id, record.phy2log, relayout)
        labels = deployment.deployment_id
        self.metrics.placements.labels(trigger).inc()
        self.metrics.replicas_moved.labels(labels).inc(record.stats.replicas_moved)
        self.metrics.balancedness.labels(labels, "current").set(record.stats.balancedness_after)
        self.metrics.imbalance_ratio.labels(labels).set(record.stats.imbalance_after)
        deployment.notify()
        if encode_error is not None:
            raise encode_error
        return record

    @contextlib.contextmanager
    def _recharged(self, deployment: Deployment, relayout: Topology | None):
        """Around the commit of a changed GPU set: the state ledger charged for the new layout (refused
        when it does not fit), and released of the old one once the commit went through."""
        if relayout is None:
            yield
            return
        new_bytes = deployment_bytes(relayout)
        self.ledger.charge(new_bytes, f"deployment {deployment.deployment_id!r} on {relayout.num_gpus} GPUs")
        try:
            yield
        except BaseException:
            self.ledger.release(new_bytes)
            raise
        self.ledger.release(deployment_bytes(deployment.topology))

    async def quality(self, deployment: Deployment) -> Quality | None:
        """Score the placement in force on the window and export it (imbalance and current balancedness)."""
        quality = await self.windows.quality(deployment.deployment_id)
        if quality is not None and not deployment.deleted:
            self.metrics.imbalance_ratio.labels(deployment.deployment_id).set(_finite(quality.imbalance))
            self.metrics.balancedness.labels(deployment.deployment_id, "current").set(_finite(quality.balancedness))
        return quality

    async def delete(self, deployment_id: str) -> bool:
        """Forget a deployment: rows, window, metric series; its watchers end. False when unknown."""
        deployment = self.deployments.get(deployment_id)
        if deployment is None:
            return False
        async with deployment.lock:
            if deployment.deleted:  # a concurrent delete got there first
                return False
            deployment.deleted = True
            await self.store.delete_deployment(deployment_id)
            self.deployments.pop(deployment_id, None)
        await self.windows.drop(deployment_id)
        self.ledger.release(deployment_bytes(deployment.topology))
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
