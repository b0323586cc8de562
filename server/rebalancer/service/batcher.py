"""Coalescing queue in front of the one solver worker.

Requests with the same `BatchKey` that wait together (the first waits `window_s` for company) are
concatenated along the layer axis into ONE `solve` call of at most `max_layers` layers, and the result
is split back. Each request's layers get `layer_seeds = seed + local layer index`, so a layer's result
does not depend on its batch mates.

Decision on prev_phy2log / history: both are concatenated per request along the layer axis, and the key
says whether the requests have a prev placement and how many history intervals T they carry, so every
request in a batch has the same kind of extra input. Scalar solver knobs (tolerances, move caps) are in
the key too, since they apply to the whole call.

The solver runs in a dedicated single-thread executor; the event loop only moves futures around.
A request whose deadline passed or that was cancelled before its batch starts is dropped, not solved.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from rebalancer_wire.options import ArgumentError

from rebalancer.solver import CostModel, maps, solve

from .errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from .metrics import Metrics
from .model import Topology
from .rearrangement import rearrange_job
from .validation import SolveSettings, solver_error_field

log = logging.getLogger(__name__)


# Requests with equal keys can share a solver call: the layout but the layer count, every batch-scoped
# solve option (rebalancer_wire.options), and the kind of extra input (placement in force, history length).
BatchKey = tuple


@dataclass
class SolveJob:
    """One request's share of a batch: loads [L, E], prev [L, R] (numpy or tensors), history [T, L, E]."""

    topology: Topology
    settings: SolveSettings
    loads: np.ndarray | torch.Tensor
    prev_phy2log: np.ndarray | torch.Tensor | None = None
    history: torch.Tensor | None = None
    # The placement in force when the plan ignores it (options.fresh): moves and "before" are still
    # measured against it, since those are the copies the engines would really ship.
    baseline_phy2log: np.ndarray | torch.Tensor | None = None
    deadline: float | None = None  # time.monotonic() after which the caller has gone
    # Elastic EP: failed GPUs (they change the layout, so they are part of the key); the cost model of
    # this request's transfer plan and budget.
    unavailable_gpus: tuple[int, ...] = ()
    cost_model: CostModel | None = None
    arrived: float = 0.0
    future: asyncio.Future = field(default=None)  # type: ignore[assignment]

    @property
    def key(self) -> BatchKey:
        t = self.topology
        layout = (t.num_experts, t.num_replicas, t.num_groups, t.num_nodes, t.num_gpus)
        extra_inputs = (self.prev_phy2log is not None, 0 if self.history is None else int(self.history.shape[0]))
        return layout + self.settings.batch_key() + extra_inputs + (self.unavailable_gpus,)

    @property
    def num_layers(self) -> int:
        return int(self.loads.shape[0])


@dataclass
class PlanOutcome:
    """One request's slice of a solver result, as numpy on the CPU: maps plus per-layer figures [L]."""

    phy2log: np.ndarray
    log2phy: np.ndarray
    logcnt: np.ndarray
    balancedness: np.ndarray
    balancedness_before: np.ndarray | None
    moved_copies: np.ndarray
    policies: dict[str, int]
    device: str
    solver_path: str
    solve_seconds: float
    batch_layers: int
    batch_requests: int
    # With a placement in force: the transfer plan [T, 5] int32 and its cost (rearrangement.py).
    transfers: np.ndarray | None = None
    gpu_ids: np.ndarray | None = None
    moved_bytes: float = 0.0
    intra_node_share: float = 1.0
    estimated_transfer_seconds: float = 0.0
    deferred_layers: int = 0


def _tensor(value: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Arrays decoded from messages are read-only views; torch needs its own copy of those."""
    return value if isinstance(value, torch.Tensor) else torch.tensor(value)


class Batcher:
    """Bounded queue + one solver worker. `submit` is the only entry point used by the service."""

    def __init__(
        self, metrics: Metrics, device: torch.device, *, window_s: float, max_layers: int, max_queue: int
    ) -> None:
        self.metrics = metrics
        self.device = device
        self.window_s = window_s
        self.max_layers = max_layers
        self.max_queue = max_queue
        self._pending: list[SolveJob] = []
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="solver")
        self._task: asyncio.Task | None = None
        self._closed = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def submit(self, job: SolveJob) -> PlanOutcome:
        """Queue `job` and wait for its slice of a batch; raises ResourceExhausted past the queue cap."""
        if self._closed:
            raise Unavailable("server is shutting down")
        if len(self._pending) >= self.max_queue:
            raise ResourceExhausted(f"solver queue is full ({self.max_queue} requests waiting)")
        job.future = asyncio.get_running_loop().create_future()
        job.arrived = time.monotonic()
        self._pending.append(job)
        self.metrics.queue_depth.set(len(self._pending))
        self._wakeup.set()
        return await job.future

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            # The window runs from the oldest waiting request's arrival: requests that queued up while
            # the worker was busy have waited long enough already.
            remaining = self._pending[0].arrived + self.window_s - time.monotonic() if self._pending else 0.0
            if remaining > 0:
                await asyncio.sleep(remaining)
            self._wakeup.clear()
            pending, self._pending = self._pending, []
            self.metrics.queue_depth.set(0)
            try:
                for batch in self._batches(pending):
                    await self._solve(batch)
            except Exception as error:  # never let one bad round stop the worker for everyone after it
                log.exception("batch round failed")
                for job in pending:
                    if not job.future.done():
                        job.future.set_exception(error)

    def _batches(self, pending: list[SolveJob]) -> list[list[SolveJob]]:
        """Group live jobs by key, in arrival order, each group cut at the layer cap."""
        now = time.monotonic()
        groups: dict[BatchKey, list[list[SolveJob]]] = {}
        for job in pending:
            if self._drop_if_gone(job, now):
                continue
            chunks = groups.setdefault(job.key, [[]])
            if chunks[-1] and sum(j.num_layers for j in chunks[-1]) + job.num_layers > self.max_layers:
                chunks.append([])
            chunks[-1].append(job)
        return [chunk for chunks in groups.values() for chunk in chunks]

    def _drop_if_gone(self, job: SolveJob, now: float) -> bool:
        """True (and counted) when nobody waits for `job` any more: the caller cancelled, as grpc does
        when the client's deadline passes or it disconnects, or the job's own deadline has passed."""
        if job.future.done():
            self.metrics.dropped_requests.labels("cancelled").inc()
            return True
        if job.deadline is not None and job.deadline <= now:
            job.future.set_exception(DeadlineExceeded("deadline passed before the solver started"))
            self.metrics.dropped_requests.labels("deadline").inc()
            return True
        return False

    async def _solve(self, batch: list[SolveJob]) -> None:
        # A job may have been cancelled, or its deadline passed, while earlier batches of this round solved.
        now = time.monotonic()
        batch = [job for job in batch if not self._drop_if_gone(job, now)]
        if not batch:
            return
        loop = asyncio.get_running_loop()
        try:
            outcomes = await loop.run_in_executor(self._executor, self._solve_sync, batch)
        except InvalidArgument as error:
            if len(batch) > 1:  # find the culprit: solve each alone so batch mates still get results
                for job in batch:
                    await self._solve([job])
                return
            outcomes = [error]
        except Exception as error:  # the worker must survive anything a request can trigger
            log.exception("solver call failed")
            outcomes = [error] * len(batch)
        for job, outcome in zip(batch, outcomes, strict=True):
            if job.future.done():
                continue
            if isinstance(outcome, Exception):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)

    def _solve_sync(self, batch: list[SolveJob]) -> list[PlanOutcome]:
        """Runs on the solver thread: one `solve` for the whole batch, then split per job."""
        first = batch[0]
        t, s = first.topology, first.settings
        device = self.device

        def cat(parts, dim=0, dtype=torch.float64):
            return torch.cat([_tensor(p).to(device, dtype) for p in parts], dim=dim)

        layer_seeds = torch.cat([job.settings.seed + torch.arange(job.num_layers, dtype=torch.int64) for job in batch])
        try:
            result = solve(
                cat([job.loads for job in batch]),
                t.num_replicas,
                t.num_groups,
                t.num_nodes,
                t.num_gpus,
                **s.batch_kwargs(),
                layer_seeds=layer_seeds,
                device=device,
                prev_phy2log=cat([job.prev_phy2log for job in batch], dtype=torch.int64)
                if first.prev_phy2log is not None
                else None,
                history=cat([job.history for job in batch], dim=1) if first.history is not None else None,
                unavailable_gpus=list(first.unavailable_gpus) or None,
            )
        except ArgumentError as error:
            raise InvalidArgument([(solver_error_field(error), str(error))]) from None
        path = str(result.stats.get("path", "torch"))
        layers = int(result.phy2log.shape[0])
        self.metrics.solve_duration.labels(result.device, path).observe(result.solve_seconds)
        self.metrics.solver_calls.labels(path).inc()
        self.metrics.batch_layers.observe(layers)
        self.metrics.batch_requests.observe(len(batch))

        phy2log = result.phy2log.cpu().numpy()
        log2phy = result.log2phy.cpu().numpy()
        logcnt = result.logcnt.cpu().numpy()
        balancedness = result.balancedness.double().cpu().numpy()
        before = None if result.balancedness_before is None else result.balancedness_before.double().cpu().numpy()
        moved = result.moved_copies.cpu().numpy()
        outcomes = []
        start = 0
        for job in batch:
            rows = slice(start, start + job.num_layers)
            start += job.num_layers
            job_moved, job_before = moved[rows], None if before is None else before[rows]
            if job.baseline_phy2log is not None:
                job_moved, job_before = self._against_baseline(job, result.phy2log[rows], t)
            job_logcnt = logcnt[rows]
            # log2phy's padding width is the batch's max copies; a request alone would get its own max.
            width = max(int(job_logcnt.max()), 1)
            outcome = PlanOutcome(
                phy2log=phy2log[rows],
                log2phy=log2phy[rows, :, :width],
                logcnt=job_logcnt,
                balancedness=balancedness[rows],
                balancedness_before=job_before,
                moved_copies=job_moved,
                policies=dict(Counter(result.policy_per_layer[rows])),
                device=result.device,
                solver_path=path,
                solve_seconds=result.solve_seconds,
                batch_layers=layers,
                batch_requests=len(batch),
            )
            self._add_rearrangement(job, outcome, result, rows)
            outcomes.append(outcome)
        return outcomes

    def _add_rearrangement(self, job: SolveJob, outcome: PlanOutcome, result, rows: slice) -> None:
        """The job's transfer plan, budget and cost, on its slice of the batch (see rearrangement.py)."""
        in_force = job.prev_phy2log if job.prev_phy2log is not None else job.baseline_phy2log
        if in_force is None:
            return
        try:
            arranged = rearrange_job(
                _tensor(job.loads).to(self.device, torch.float64),
                _tensor(in_force).to(self.device, torch.int64),
                result.phy2log[rows],
                job.topology,
                job.settings,
                job.cost_model,
                job.unavailable_gpus,
                result.gpu_ids,
            )
        except ArgumentError as error:
            raise InvalidArgument([(solver_error_field(error), str(error))]) from None
        outcome.transfers, outcome.gpu_ids = arranged.transfers, arranged.gpu_ids
        outcome.moved_bytes = arranged.moved_bytes
        outcome.intra_node_share = arranged.intra_node_share
        outcome.estimated_transfer_seconds = arranged.estimated_transfer_seconds
        outcome.deferred_layers = arranged.kept_layers
        if arranged.kept_layers:
            outcome.phy2log, outcome.log2phy, outcome.logcnt = arranged.phy2log, arranged.log2phy, arranged.logcnt
            outcome.balancedness, outcome.moved_copies = arranged.balancedness, arranged.moved_copies
            outcome.policies = dict(Counter(outcome.policies) + Counter(kept=arranged.kept_layers))
        self.metrics.transfer_seconds.observe(arranged.estimated_transfer_seconds)

    def _against_baseline(
        self, job: SolveJob, phy2log: torch.Tensor, topology: Topology
    ) -> tuple[np.ndarray, np.ndarray]:
        """Moved copies [L] and balancedness [L] of the baseline placement, for a fresh plan."""
        baseline = _tensor(job.baseline_phy2log).to(self.device, torch.int64)
        loads = _tensor(job.loads).to(self.device, torch.float64)
        moved = maps.moved_copies(baseline, phy2log, topology.num_experts, topology.num_gpus)
        logcnt = maps.logcnt_from_phy2log(baseline, topology.num_experts)
        before = maps.balancedness(loads, baseline, logcnt, topology.num_gpus)
        return moved.cpu().numpy(), before.double().cpu().numpy()

    async def close(self) -> None:
        """Stop taking work, let the worker finish the batch in hand, fail what is still queued."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for job in self._pending:
            if not job.future.done():
                job.future.set_exception(Unavailable("server is shutting down"))
        self._pending = []
        self._executor.shutdown(wait=True)
