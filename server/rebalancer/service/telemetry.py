"""Per-deployment telemetry windows on the solver's device (soft state, never persisted).

A window is a ring of the last W reports [W, L, E] (float32) plus the window sums taken every W new
slots, kept as history [T, L, E] (float64, newest last) for the solver's `history=`. Reports that carry
the same nonzero `step` (one per engine rank) add into the same slot; step 0 always opens a new slot.

All windows live behind one single-thread executor: ingest costs one small torch op per report, runs
off the event loop and off the solver worker, and needs no locks because only that thread touches the
tensors.

Windows are soft state under a memory budget: one is allocated on its deployment's first accepted
report (also after a restart, so a server whose budget cannot hold every window still starts and
serves), charged to the state ledger, and released when the deployment is deleted. The float32 ring
never holds inf: a report that would overflow its slot is refused and leaves the slot as it was.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from rebalancer.solver import maps

from .admission import window_bytes
from .budget import StateLedger
from .errors import InvalidArgument, ResourceExhausted, out_of_memory
from .model import Topology


class WindowOverflow(ValueError):
    """A report whose sum with its slot would not be finite in float32."""


@dataclass
class Snapshot:
    """What a re-plan needs from a window: loads [L, E] and history [T, L, E] (float64, on the device)."""

    loads: torch.Tensor
    history: torch.Tensor | None
    reports: int


@dataclass
class Quality:
    """The placement in force scored on the current window (means over layers)."""

    imbalance: float
    balancedness: float


class DeploymentWindow:
    """The ring of recent reports and the interval history of one deployment."""

    def __init__(self, topology: Topology, capacity: int, intervals: int, device: torch.device) -> None:
        shape = (topology.num_layers, topology.num_experts)
        self.topology = topology
        self.device = device
        self.ring = torch.zeros(capacity, *shape, dtype=torch.float32, device=device)
        self.slot_step = [0] * capacity
        self.slot_reports = [0] * capacity
        self.step_slot: dict[int, int] = {}
        self.head = -1
        self.advances = 0
        self.history = torch.zeros(intervals, *shape, dtype=torch.float64, device=device)
        self.history_count = 0
        self.received = 0  # reports ever accepted: lets the auto-rebalancer skip unchanged windows
        self.phy2log: torch.Tensor | None = None
        self.logcnt: torch.Tensor | None = None

    @property
    def reports(self) -> int:
        return sum(self.slot_reports)

    def _open_slot(self, step: int) -> int:
        capacity = self.ring.shape[0]
        if self.advances == capacity:
            self._close_interval()
        self.head = (self.head + 1) % capacity
        self.advances += 1
        self.step_slot.pop(self.slot_step[self.head], None)
        self.slot_step[self.head] = step
        self.slot_reports[self.head] = 0
        if step:
            self.step_slot[step] = self.head
        return self.head

    def _forget_slot(self, slot: int) -> None:
        """Undo `_open_slot` for a report that was refused: the slot stays empty (and counts no report)."""
        self.ring[slot].zero_()
        self.step_slot.pop(self.slot_step[slot], None)
        self.slot_step[slot] = 0

    def _close_interval(self) -> None:
        intervals = self.history.shape[0]
        if intervals:
            self.history[self.history_count % intervals] = self.ring.sum(0, dtype=torch.float64)
            self.history_count += 1
        self.advances = 0

    def add(self, loads: np.ndarray, layer_indices: np.ndarray | None, step: int) -> None:
        """Add one validated report: loads [k, E] for `layer_indices` [k] (None: all L layers)."""
        slot = self.step_slot.get(step) if step else None
        fresh = slot is None
        if fresh:
            slot = self._open_slot(step)
        values = torch.from_numpy(loads).to(self.device, non_blocking=True)
        target = self.ring[slot]
        if fresh and layer_indices is None:
            summed = values
        else:
            base = torch.zeros_like(target) if fresh else target
            if layer_indices is None:
                summed = base + values
            else:
                summed = base.index_add(0, torch.from_numpy(layer_indices).to(self.device), values)
        if not bool(torch.isfinite(summed).all()):
            if fresh:
                self._forget_slot(slot)
            raise WindowOverflow("this report would overflow its window slot (float32)")
        target.copy_(summed)
        self.slot_reports[slot] += 1
        self.received += 1

    def snapshot(self) -> Snapshot:
        intervals = self.history.shape[0]
        history = None
        if self.history_count and intervals:
            kept = min(self.history_count, intervals)
            # Oldest first: the ring's next write position holds the oldest kept interval once it wrapped.
            order = (torch.arange(kept, device=self.device) + self.history_count - kept) % intervals
            history = self.history[order]
        return Snapshot(self.ring.sum(0, dtype=torch.float64), history, self.reports)

    def set_placement(self, phy2log: np.ndarray) -> None:
        self.phy2log = torch.from_numpy(np.ascontiguousarray(phy2log, dtype=np.int64)).to(self.device)
        self.logcnt = maps.logcnt_from_phy2log(self.phy2log, self.topology.num_experts)

    def quality(self) -> Quality | None:
        if self.phy2log is None or not self.reports:
            return None
        balancedness = maps.balancedness(
            self.ring.sum(0, dtype=torch.float64), self.phy2log, self.logcnt, self.topology.num_gpus
        )
        return Quality(float((1.0 / balancedness).mean()), float(balancedness.mean()))


class TelemetryWindows:
    """Every deployment's window, driven from the event loop through one dedicated thread.

    Windows are created by `add` on a deployment's first accepted report; reads of a deployment
    without a window see an empty one.
    """

    def __init__(self, capacity: int, intervals: int, device: torch.device, ledger: StateLedger) -> None:
        self.capacity = capacity
        self.intervals = intervals
        self.device = device
        self.ledger = ledger
        self._windows: dict[str, DeploymentWindow] = {}
        self._placements: dict[str, np.ndarray] = {}  # placements in force of deployments without a window
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="telemetry")

    async def _call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def window_bytes(self, topology: Topology) -> int:
        return window_bytes(topology, self.capacity, self.intervals)

    async def add(
        self,
        deployment_id: str,
        topology: Topology,
        loads: np.ndarray,
        layer_indices: np.ndarray | None,
        step: int,
        alive=lambda: True,
    ) -> None:
        """Add one validated report, creating the window first when the deployment has none.

        Raises ResourceExhausted when the window does not fit the budget (or cannot be allocated) and
        InvalidArgument when the report would overflow; neither leaves anything behind. `alive` is
        checked on the telemetry thread, so a report racing its deployment's deletion creates nothing.
        """
        charged = 0
        if deployment_id not in self._windows:
            charged = self.window_bytes(topology)
            self.ledger.charge(charged, f"the telemetry window of {deployment_id!r}")
        try:
            created = await self._call(self._add, deployment_id, topology, loads, layer_indices, step, alive)
        except BaseException as error:
            self.ledger.release(charged)
            if isinstance(error, WindowOverflow):
                raise InvalidArgument([("loads.data", str(error))]) from None
            if out_of_memory(error):
                raise ResourceExhausted(
                    f"cannot allocate the telemetry window of {deployment_id!r}: lower --window or raise memory"
                ) from None
            raise
        if charged and not created:  # another report created it meanwhile
            self.ledger.release(charged)

    def _add(self, deployment_id, topology, loads, layer_indices, step, alive) -> bool:
        """On the telemetry thread: add the report, creating the window; True when this call created it."""
        window = self._windows.get(deployment_id)
        if window is not None:
            window.add(loads, layer_indices, step)
            return False
        if not alive():
            raise KeyError(deployment_id)
        window = DeploymentWindow(topology, self.capacity, self.intervals, self.device)
        window.add(loads, layer_indices, step)  # a refused first report leaves no window behind
        placement = self._placements.pop(deployment_id, None)
        if placement is not None:
            window.set_placement(placement)
        self._windows[deployment_id] = window
        return True

    async def snapshot(self, deployment_id: str) -> Snapshot | None:
        """The window's loads and history; None when the deployment has no window (no reports yet)."""
        return await self._call(lambda: self._window_call(deployment_id, DeploymentWindow.snapshot))

    async def set_placement(self, deployment_id: str, phy2log: np.ndarray, relayout: Topology | None = None) -> None:
        """The placement in force, scored against the window; `relayout` is the deployment's new layout
        when the placement is on a changed GPU set (same layers and experts, so the window stays)."""

        def apply() -> None:
            window = self._windows.get(deployment_id)
            if window is None:
                self._placements[deployment_id] = phy2log
            else:
                if relayout is not None:
                    window.topology = relayout
                window.set_placement(phy2log)

        await self._call(apply)

    async def quality(self, deployment_id: str) -> Quality | None:
        return await self._call(lambda: self._window_call(deployment_id, DeploymentWindow.quality))

    def _window_call(self, deployment_id: str, method):
        window = self._windows.get(deployment_id)
        return None if window is None else method(window)

    def received(self, deployment_id: str) -> int:
        """Reports ever accepted (a plain int read; safe from the event loop)."""
        window = self._windows.get(deployment_id)
        return window.received if window is not None else 0

    def reports(self, deployment_id: str) -> int:
        window = self._windows.get(deployment_id)
        return window.reports if window is not None else 0

    async def drop(self, deployment_id: str) -> None:
        """Forget the deployment's window and release its memory."""

        def pop() -> DeploymentWindow | None:
            self._placements.pop(deployment_id, None)
            return self._windows.pop(deployment_id, None)

        window = await self._call(pop)
        if window is not None:
            self.ledger.release(self.window_bytes(window.topology))

    def close(self) -> None:
        self._executor.shutdown(wait=True)
