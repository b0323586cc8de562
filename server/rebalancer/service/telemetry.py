"""Per-deployment telemetry windows on the solver's device (soft state, never persisted).

A window is a ring of the last W reports [W, L, E] (float32) plus the window sums taken every W new
slots, kept as history [T, L, E] (float64, newest last) for the solver's `history=`. Reports that carry
the same nonzero `step` (one per engine rank) add into the same slot; step 0 always opens a new slot.

All windows live behind one single-thread executor: ingest costs one small torch op per report, runs
off the event loop and off the solver worker, and needs no locks because only that thread touches the
tensors.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from rebalancer.solver import maps

from .model import Topology


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
        if layer_indices is None:
            target.copy_(values) if fresh else target.add_(values)
        else:
            if fresh:
                target.zero_()
            target.index_add_(0, torch.from_numpy(layer_indices).to(self.device), values)
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
    """Every deployment's window, driven from the event loop through one dedicated thread."""

    def __init__(self, capacity: int, intervals: int, device: torch.device) -> None:
        self.capacity = capacity
        self.intervals = intervals
        self.device = device
        self._windows: dict[str, DeploymentWindow] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="telemetry")

    async def _call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def ensure(self, deployment_id: str, topology: Topology) -> None:
        """Create the window when missing (a restart or a new deployment)."""
        await self._call(self._ensure, deployment_id, topology)

    def _ensure(self, deployment_id: str, topology: Topology) -> DeploymentWindow:
        window = self._windows.get(deployment_id)
        if window is None or window.topology != topology:
            window = DeploymentWindow(topology, self.capacity, self.intervals, self.device)
            self._windows[deployment_id] = window
        return window

    async def add(self, deployment_id: str, loads: np.ndarray, layer_indices: np.ndarray | None, step: int) -> None:
        await self._call(lambda: self._windows[deployment_id].add(loads, layer_indices, step))

    async def snapshot(self, deployment_id: str) -> Snapshot:
        return await self._call(lambda: self._windows[deployment_id].snapshot())

    async def set_placement(self, deployment_id: str, phy2log: np.ndarray) -> None:
        await self._call(lambda: self._windows[deployment_id].set_placement(phy2log))

    async def quality(self, deployment_id: str) -> Quality | None:
        return await self._call(lambda: self._windows[deployment_id].quality())

    def received(self, deployment_id: str) -> int:
        """Reports ever accepted (a plain int read; safe from the event loop)."""
        window = self._windows.get(deployment_id)
        return window.received if window is not None else 0

    def reports(self, deployment_id: str) -> int:
        window = self._windows.get(deployment_id)
        return window.reports if window is not None else 0

    async def drop(self, deployment_id: str) -> None:
        await self._call(self._windows.pop, deployment_id, None)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
