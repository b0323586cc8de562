"""Coalescing queue in front of the solver: two lanes, each with its own worker thread.

Every job is costed before it is queued (admission.py): one that exceeds the per-job limits is refused
with a message that says what to lower. Jobs estimated at most `small_job_seconds` go to the small lane,
the others to the large lane, so a long solve never holds up short ones; each lane's batches are cut at
`max_layers` layers and at the lane's estimated cost (the per-job limits in the large lane,
SMALL_BATCH_FACTOR small jobs' worth in the small one).

Within a lane, requests with the same `BatchKey` that wait together are concatenated along the layer
axis into ONE `solve` call, and the result is split back. The first waits `window_s` for company only
while the server is busy (`wait_when="busy"`): a request that finds nothing else queued or solving in
either lane is solved at once, since on an idle server the window is pure latency (an engine's one
rebalance per interval), while under load the requests that queue up behind a solve still batch. With
`wait_when="always"` every first request waits the window, which batches bursts that hit an idle server
(e.g. one request per rank at the same moment).
Each request's layers get `layer_seeds = seed + local layer index`, so a layer's result does not depend
on its batch mates. prev_phy2log and history are concatenated per request along the layer axis; the key
says whether requests have a prev placement and how many history intervals T they carry, and holds the
scalar solver knobs (tolerances, move caps), which apply to the whole call.

A request whose deadline passed or that was cancelled before its batch starts is dropped, not solved;
while a batch solves, the solver checks between its rounds whether anyone still waits for it (or the
server is closing) and abandons the solve when not.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from rebalancer_wire.codec import narrowest_ids
from rebalancer_wire.options import ArgumentError, SolveSettings

from rebalancer.solver import CostModel, maps, solve
from rebalancer.solver.api import SolveResult, cpu_threads
from rebalancer.solver.cancel import SolveCancelled, stop_when

from .admission import JobLimits, Shape, SolveCost, candidates_for, mib
from .errors import (
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    ResourceExhausted,
    ServiceError,
    Unavailable,
    out_of_memory,
)
from .metrics import Metrics
from .model import Topology
from .rearrangement import rearrange_job
from .validation import solver_error_field

log = logging.getLogger(__name__)

# How often, at most, a running solve asks whether its callers are still there.
STOP_POLL_S = 0.005
# A solve may run this many times --max-job-seconds before it is stopped (RESOURCE_EXHAUSTED): admission
# runs on estimates, and whatever a request makes the solver do beyond them (a crafted placement in force
# that sends every layer to the fresh plan, say) costs at most this, not the solver thread for minutes.
OVERRUN_FACTOR = 3.0
# Small-lane batches may add up to this many times the small-job bound: batching many small requests is
# far cheaper than solving them one by one, and the lane's wait stays a few small solves long.
SMALL_BATCH_FACTOR = 4


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
    cost: SolveCost | None = None
    future: asyncio.Future = field(default=None)  # type: ignore[assignment]

    @property
    def key(self) -> BatchKey:
        t = self.topology
        layout = (t.num_experts, t.num_replicas, t.num_groups, t.num_nodes, t.num_gpus)
        extra_inputs = (self.prev_phy2log is not None, self.history_intervals)
        return layout + self.settings.batch_key() + extra_inputs + (self.unavailable_gpus,)

    @property
    def num_layers(self) -> int:
        return int(self.loads.shape[0])

    @property
    def history_intervals(self) -> int:
        return 0 if self.history is None else int(self.history.shape[0])

    def shape(self, device_type: str, num_layers: int | None = None) -> Shape:
        """What the cost model needs, for this job alone or for a batch of `num_layers` like it."""
        t, s = self.topology, self.settings
        return Shape(
            num_layers=self.num_layers if num_layers is None else num_layers,
            num_experts=t.num_experts,
            num_replicas=t.num_replicas,
            num_groups=t.num_groups,
            num_nodes=t.num_nodes,
            num_gpus=t.num_gpus,
            candidates=candidates_for(s.num_candidates, device_type),
            history_intervals=self.history_intervals,
            has_prev=self.prev_phy2log is not None,
            policy=s.policy,
            elastic=bool(self.unavailable_gpus),
        )

    @property
    def input_bytes(self) -> int:
        """Bytes the queued job holds: its loads, prev, history and baseline."""
        parts = (self.loads, self.prev_phy2log, self.history, self.baseline_phy2log)
        return sum(_nbytes(part) for part in parts if part is not None)

    def gone(self, now: float) -> bool:
        """Nobody waits for the result: the caller cancelled (future done) or the deadline passed."""
        return self.future.done() or (self.deadline is not None and self.deadline <= now)


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


def _nbytes(value: np.ndarray | torch.Tensor) -> int:
    return int(value.nbytes) if isinstance(value, np.ndarray) else value.numel() * value.element_size()


def _tensor(value: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Arrays decoded from messages are read-only views; torch needs its own copy of those."""
    return value if isinstance(value, torch.Tensor) else torch.tensor(value)


class _StopCondition:
    """The solver's `should_stop` for one batch: true once every job is gone, the server closes, or the
    solve has run past `limit_s` (then `overran` says so).

    Called from the solver thread at every checkpoint; looks at the jobs and the clock at most every
    STOP_POLL_S.
    """

    def __init__(self, batch: list[SolveJob], closing: threading.Event, limit_s: float) -> None:
        self.batch = batch
        self.closing = closing
        self.limit_s = limit_s
        self.stop_at = time.monotonic() + limit_s
        self.overran = False
        self._next_look = 0.0

    def __call__(self) -> bool:
        if self.closing.is_set():
            return True
        now = time.monotonic()
        if now < self._next_look:
            return False
        self._next_look = now + STOP_POLL_S
        self.overran = now >= self.stop_at
        return self.overran or all(job.gone(now) for job in self.batch)


class _Lane:
    """One worker thread and the jobs waiting for it; batches are cut at the lane's estimated cost."""

    def __init__(self, name: str, max_seconds: float, max_bytes: int) -> None:
        self.name = name
        self.max_seconds = max_seconds
        self.max_bytes = max_bytes
        self.pending: list[SolveJob] = []
        self.current: list[SolveJob] = []  # the batch being solved
        self.wakeup = asyncio.Event()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"solver-{name}")
        self.task: asyncio.Task | None = None


class Batcher:
    """Admission, two lanes of bounded queues and their solver workers. `submit` is the only entry point."""

    def __init__(
        self,
        metrics: Metrics,
        device: torch.device,
        *,
        window_s: float,
        max_layers: int,
        max_queue: int,
        limits: JobLimits,
        max_queued_bytes: int,
        wait_when: str = "busy",  # or "always" (config.BATCH_WINDOW_WHEN)
    ) -> None:
        self.metrics = metrics
        self.device = device
        self.window_s = window_s
        self.wait_when = wait_when
        self.max_layers = max_layers
        self.max_queue = max_queue
        self.limits = limits
        self.max_queued_bytes = max_queued_bytes
        self.queued_bytes = 0
        self._small = _Lane(
            "small",
            SMALL_BATCH_FACTOR * limits.small_job_seconds,
            min(SMALL_BATCH_FACTOR * limits.small_job_bytes, limits.max_job_bytes),
        )
        self._large = _Lane("large", limits.max_job_seconds, limits.max_job_bytes)
        self._closing = threading.Event()
        self._closed = False

    @property
    def _lanes(self) -> tuple[_Lane, _Lane]:
        return self._small, self._large

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for lane in self._lanes:
            lane.task = loop.create_task(self._run(lane), name=f"batcher-{lane.name}")

    async def submit(self, job: SolveJob) -> PlanOutcome:
        """Cost `job`, queue it in its lane and wait for its slice of a batch.

        Raises ResourceExhausted when the job exceeds the per-job limits or the queue is full.
        """
        if self._closed:
            raise Unavailable("server is shutting down")
        job.cost = self.limits.check(job.shape(self.device.type))
        waiting = sum(len(lane.pending) for lane in self._lanes)
        if waiting >= self.max_queue:
            raise ResourceExhausted(f"solver queue is full ({self.max_queue} requests waiting)")
        nbytes = job.input_bytes
        if self.queued_bytes + nbytes > self.max_queued_bytes:
            raise ResourceExhausted(
                f"solver queue memory is full ({mib(self.queued_bytes)} of {mib(self.max_queued_bytes)} queued): "
                "retry later"
            )
        lane = self._small if self.limits.is_small(job.cost) else self._large
        job.future = asyncio.get_running_loop().create_future()
        job.arrived = time.monotonic()
        lane.pending.append(job)
        self.queued_bytes += nbytes
        self.metrics.queue_depth.set(waiting + 1)
        lane.wakeup.set()
        return await job.future

    async def _run(self, lane: _Lane) -> None:
        while True:
            await lane.wakeup.wait()
            remaining = self._window_left(lane)
            if remaining > 0:
                await asyncio.sleep(remaining)
            lane.wakeup.clear()
            pending, lane.pending = lane.pending, []
            self.queued_bytes -= sum(job.input_bytes for job in pending)
            self.metrics.queue_depth.set(sum(len(other.pending) for other in self._lanes))
            try:
                for batch in self._batches(lane, pending):
                    await self._solve(lane, batch)
            except Exception as error:  # never let one bad round stop the worker for everyone after it
                log.exception("batch round failed")
                for job in pending:
                    if not job.future.done():
                        job.future.set_exception(_client_error(error))

    def _window_left(self, lane: _Lane) -> float:
        """Seconds the lane's oldest request still waits for batch mates. The window runs from its
        arrival (requests that queued up while the worker was busy have waited long enough already);
        with `wait_when="busy"` a request alone in an idle server does not wait at all."""
        if not lane.pending:
            return 0.0
        if self.wait_when == "busy" and len(lane.pending) == 1 and not self._busy_besides(lane):
            return 0.0
        return lane.pending[0].arrived + self.window_s - time.monotonic()

    def _busy_besides(self, lane: _Lane) -> bool:
        """Whether another lane has work queued or solving (this lane's worker is free: it is asking)."""
        return any(other.pending or other.current for other in self._lanes if other is not lane)

    def _batches(self, lane: _Lane, pending: list[SolveJob]) -> list[list[SolveJob]]:
        """Group live jobs by key, in arrival order, each group cut at the layer cap and the lane's work."""
        now = time.monotonic()
        groups: dict[BatchKey, list[list[SolveJob]]] = {}
        device_type = self.device.type
        for job in pending:
            if self._drop_if_gone(job, now):
                continue
            chunks = groups.setdefault(job.key, [[]])
            layers = sum(j.num_layers for j in chunks[-1]) + job.num_layers
            if chunks[-1] and (layers > self.max_layers or not self._fits(lane, job.shape(device_type, layers))):
                chunks.append([])
            chunks[-1].append(job)
        return [chunk for chunks in groups.values() for chunk in chunks]

    def _fits(self, lane: _Lane, shape: Shape) -> bool:
        cost = self.limits.cost(shape)
        return cost.work_seconds <= lane.max_seconds and cost.peak_bytes <= lane.max_bytes

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

    async def _solve(self, lane: _Lane, batch: list[SolveJob]) -> None:
        # A job may have been cancelled, or its deadline passed, while earlier batches of this round solved.
        now = time.monotonic()
        batch = [job for job in batch if not self._drop_if_gone(job, now)]
        if not batch:
            return
        stop = _StopCondition(batch, self._closing, OVERRUN_FACTOR * self.limits.max_job_seconds)
        run = functools.partial(self._solve_stoppable, batch, stop)
        lane.current = batch
        try:
            outcomes = await asyncio.get_running_loop().run_in_executor(lane.executor, run)
        except InvalidArgument as error:
            if len(batch) > 1:  # find the culprit: solve each alone so batch mates still get results
                for job in batch:
                    await self._solve(lane, [job])
                return
            outcomes = [error]
        except SolveCancelled:
            self._fail_stopped(batch, stop)
            return
        except Exception as error:  # the worker must survive anything a request can trigger
            log.exception("solver call failed")
            outcomes = [_client_error(error)] * len(batch)
        finally:
            lane.current = []
        for job, outcome in zip(batch, outcomes, strict=True):
            if job.future.done():
                continue
            if isinstance(outcome, Exception):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)

    def _fail_stopped(self, batch: list[SolveJob], stop: _StopCondition) -> None:
        """Answer the jobs of an abandoned solve: shutting down, run past its limit, or each gone by cancel
        or deadline."""
        for job in batch:
            if self._closing.is_set():
                reason, error = "shutdown", Unavailable("server is shutting down")
            elif job.future.done():
                reason, error = "cancelled", None
            elif stop.overran:
                reason, error = (
                    "overrun",
                    ResourceExhausted(
                        f"the solve ran past {stop.limit_s:.1f} s ({OVERRUN_FACTOR:g}x the per-job limit) and was "
                        "stopped: lower the layers per request or options.num_candidates, or send a placement in "
                        "force closer to the loads"
                    ),
                )
            else:
                reason, error = "deadline", DeadlineExceeded("deadline passed during the solve")
            self.metrics.dropped_requests.labels(reason).inc()
            if error is not None and not job.future.done():
                job.future.set_exception(error)
        log.info("solve of %d request(s) stopped between rounds", len(batch))

    def _solve_stoppable(self, batch: list[SolveJob], should_stop: _StopCondition) -> list[PlanOutcome]:
        """Runs on a lane's thread: the batch's solve, abandoned between rounds once `should_stop` holds."""
        with stop_when(should_stop):
            return self._solve_sync(batch)

    def _solve_sync(self, batch: list[SolveJob]) -> list[PlanOutcome]:
        """One `solve` for the whole batch, then split per job."""
        result = self._call_solver(batch)
        self._observe(result, len(batch))
        # The per-request transfer plans are solver work too: same thread setting, same reported seconds.
        with cpu_threads(self.device):
            return self._split(result, batch)

    def _call_solver(self, batch: list[SolveJob]) -> SolveResult:
        """The batch's inputs concatenated along the layer axis, solved in one call.

        Solver argument errors become InvalidArgument naming the request field; allocation failures
        become ResourceExhausted.
        """
        first = batch[0]
        t, s = first.topology, first.settings
        device = self.device

        def cat(parts, dim=0, dtype=torch.float64):
            tensors = [_tensor(p).to(device, dtype) for p in parts]
            return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)  # a lone job: no copy

        layer_seeds = cat([job.settings.seed + torch.arange(job.num_layers) for job in batch], dtype=torch.int64)
        prev = cat([job.prev_phy2log for job in batch], dtype=torch.int64) if first.prev_phy2log is not None else None
        history = cat([job.history for job in batch], dim=1) if first.history is not None else None
        try:
            return solve(
                cat([job.loads for job in batch]),
                t.num_replicas,
                t.num_groups,
                t.num_nodes,
                t.num_gpus,
                **s.batch_kwargs(),
                layer_seeds=layer_seeds,
                device=device,
                prev_phy2log=prev,
                history=history,
                unavailable_gpus=list(first.unavailable_gpus) or None,
                plan_transfers=False,  # planned per request in _add_rearrangement, where budgets apply
            )
        except ArgumentError as error:
            raise InvalidArgument([(solver_error_field(error), str(error))]) from None
        except (MemoryError, RuntimeError) as error:
            if not out_of_memory(error):
                raise
            log.warning("solver ran out of memory: %s", error)
            raise ResourceExhausted(
                "the solver ran out of memory: lower options.num_candidates or the layers per request"
            ) from None

    def _observe(self, result: SolveResult, requests: int) -> None:
        path = result.path
        self.metrics.solve_duration.labels(result.device, path).observe(result.solve_seconds)
        self.metrics.solver_calls.labels(path).inc()
        self.metrics.batch_layers.observe(int(result.phy2log.shape[0]))
        self.metrics.batch_requests.observe(requests)

    def _split(self, result: SolveResult, batch: list[SolveJob]) -> list[PlanOutcome]:
        """Each job's rows of the batch result, as numpy, with its own log2phy width; log2phy is built in
        the narrowest integer type of its slot ids, the type it is sent in."""
        phy2log = result.phy2log.cpu().numpy()
        slot_ids = getattr(torch, narrowest_ids(phy2log.shape[1] - 1).name)
        log2phy = result.log2phy_as(slot_ids).cpu().numpy()
        logcnt = result.logcnt.cpu().numpy()
        balancedness = result.balancedness.double().cpu().numpy()
        before = None if result.balancedness_before is None else result.balancedness_before.double().cpu().numpy()
        moved = result.moved_copies.cpu().numpy()
        path = result.path
        outcomes, start = [], 0
        for job in batch:
            rows = slice(start, start + job.num_layers)
            start += job.num_layers
            job_moved, job_before = moved[rows], None if before is None else before[rows]
            if job.baseline_phy2log is not None:
                job_moved, job_before = self._against_baseline(job, result.phy2log[rows])
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
                batch_layers=int(result.phy2log.shape[0]),
                batch_requests=len(batch),
            )
            self._add_rearrangement(job, outcome, result, rows)
            outcomes.append(outcome)
        return outcomes

    def _add_rearrangement(self, job: SolveJob, outcome: PlanOutcome, result: SolveResult, rows: slice) -> None:
        """The job's transfer plan, budget and cost, on its slice of the batch (see rearrangement.py)."""
        in_force = job.prev_phy2log if job.prev_phy2log is not None else job.baseline_phy2log
        if in_force is None:
            return
        started = time.perf_counter()
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
                planned_from_it=job.prev_phy2log is not None,
            )
        except ArgumentError as error:
            raise InvalidArgument([(solver_error_field(error), str(error))]) from None
        outcome.solve_seconds += time.perf_counter() - started
        outcome.transfers, outcome.gpu_ids = arranged.transfers, arranged.gpu_ids
        outcome.moved_bytes = arranged.moved_bytes
        outcome.intra_node_share = arranged.intra_node_share
        outcome.estimated_transfer_seconds = arranged.estimated_transfer_seconds
        outcome.deferred_layers = arranged.kept_layers
        if arranged.phy2log is not None:  # a budget held layers back, or the NIC receivers were balanced
            outcome.phy2log, outcome.log2phy, outcome.logcnt = arranged.phy2log, arranged.log2phy, arranged.logcnt
            outcome.balancedness, outcome.moved_copies = arranged.balancedness, arranged.moved_copies
        if arranged.kept_layers:
            outcome.policies = dict(Counter(outcome.policies) + Counter(kept=arranged.kept_layers))
        self.metrics.transfer_seconds.observe(arranged.estimated_transfer_seconds)

    def _against_baseline(self, job: SolveJob, phy2log: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Moved copies [L] and balancedness [L] of the baseline placement, for a fresh plan."""
        topology = job.topology
        baseline = _tensor(job.baseline_phy2log).to(self.device, torch.int64)
        loads = _tensor(job.loads).to(self.device, torch.float64)
        moved = maps.moved_copies(baseline, phy2log, topology.num_experts, topology.num_gpus)
        logcnt = maps.logcnt_from_phy2log(baseline, topology.num_experts)
        before = maps.balancedness(loads, baseline, logcnt, topology.num_gpus)
        return moved.cpu().numpy(), before.double().cpu().numpy()

    async def close(self) -> None:
        """Stop taking work, stop the solves in hand at their next round, fail what is still queued."""
        self._closed = True
        self._closing.set()
        for lane in self._lanes:
            if lane.task is not None:
                lane.task.cancel()
        await asyncio.gather(*(lane.task for lane in self._lanes if lane.task is not None), return_exceptions=True)
        for lane in self._lanes:
            for job in lane.pending + lane.current:
                if not job.future.done():
                    job.future.set_exception(Unavailable("server is shutting down"))
            lane.pending, lane.current = [], []
            lane.executor.shutdown(wait=True)
        self.queued_bytes = 0


def _client_error(error: BaseException) -> ServiceError:
    """What a caller may see of an unexpected failure: its own ServiceError, or a bare INTERNAL."""
    return error if isinstance(error, ServiceError) else Internal()
