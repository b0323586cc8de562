"""Background expert-load reporter for engine processes.

An engine calls `reporter.report(loads)` once per step or interval from its hot loop; the call copies the
array into a bounded queue and returns at once. One thread keeps one long-lived StreamLoad stream to the
deployment's replica and feeds it from the queue. When the server is slow or away, the queue fills; then
a new report is added into the newest queued one of the same layer set (loads sum, nothing is lost but
granularity) or, when that is impossible, the oldest report is dropped and counted. The engine never
blocks on the network. Broken streams are reopened with exponential backoff (with jitter).

Delivery is at most once: reports written to a stream that breaks before the server's summary may be
lost; `stats()["accepted"]` counts what the server confirmed.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from .client import RebalancerClient
from .messages import TopologyLike, as_topology, loads_array
from .placement import Topology
from .sharding import ShardedClient, connect

logger = logging.getLogger(__name__)


@dataclass
class _Report:
    loads: np.ndarray
    layer_indices: tuple[int, ...]
    step: int

    def absorb(self, loads: np.ndarray, layer_indices: tuple[int, ...], step: int) -> bool:
        """Add a report of the same layer set into this one (loads sum); False when the sets differ."""
        if layer_indices != self.layer_indices or loads.shape != self.loads.shape:
            return False
        integral = self.loads.dtype.kind in "biu" and loads.dtype.kind in "biu"
        self.loads = self.loads.astype(np.int64 if integral else np.float64) + loads
        self.step = step
        return True


class _Stream:
    """One StreamLoad attempt; `closed` stops its request iterator once the call has ended."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.closed = False


def _complete_topology(spec: TopologyLike | None) -> Topology | None:
    """The topology when `spec` gives the layer and expert counts; None while they must come from a report."""
    if spec is None:
        return None
    get = spec.get if isinstance(spec, Mapping) else lambda name: getattr(spec, name, 0)
    if not (get("num_layers") and get("num_experts")):
        return None
    return as_topology(spec)


class LoadReporter:
    """Thread + bounded queue + one StreamLoad stream per deployment and rank; a context manager.

    `client` is a RebalancerClient, a ShardedClient (the stream goes to the deployment's owner) or a
    target string (the reporter then owns and closes its client). `topology` (a Topology or a mapping of
    its fields; num_layers/num_experts may come from the first full report) is sent on the first report
    of every stream, so a restarted server relearns the deployment. A stream is ended after `stream_max_s`
    (and reopened when reports are queued) so the server's acceptance counts reach `stats()` regularly.
    """

    def __init__(
        self,
        client: RebalancerClient | ShardedClient | str,
        deployment_id: str,
        *,
        topology: TopologyLike | None = None,
        rank: int = 0,
        max_pending: int = 64,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 10.0,
        stream_max_s: float = 300.0,
    ) -> None:
        if not deployment_id:
            raise ValueError("deployment_id is required")
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self._owns_client = isinstance(client, str)
        self._client = connect(client) if isinstance(client, str) else client
        self.deployment_id = deployment_id
        self.rank = rank
        self._topology_spec = topology
        self._topology = _complete_topology(topology)
        self._max_pending = max_pending
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._stream_max_s = stream_max_s
        self._pending: deque[_Report] = deque()
        self._cond = threading.Condition()
        self._stream: _Stream | None = None
        self._flush_wanted = False
        self._closing = False
        self._step = 0
        self._counters = dict.fromkeys(
            ("reported", "coalesced", "dropped", "sent", "accepted", "rejected", "streams", "errors"), 0
        )
        self._last_error = ""
        self._thread = threading.Thread(
            target=self._run, name=f"rebalancer-reporter-{deployment_id}-{rank}", daemon=True
        )
        self._thread.start()

    def __enter__(self) -> LoadReporter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def report(self, loads: Any, layer_indices: Sequence[int] | None = None) -> None:
        """Queue loads [L, E] (or [k, E] for `layer_indices`); copies the data, never blocks on the network.

        Raises ValueError at once for malformed loads (an engine bug, not a network condition).
        """
        array = np.array(loads_array(loads), copy=True)  # engines reuse their counters' buffers
        indices = tuple(int(i) for i in layer_indices) if layer_indices is not None else ()
        if indices and len(indices) != array.shape[0]:
            raise ValueError(f"layer_indices has {len(indices)} entries for {array.shape[0]} rows of loads")
        with self._cond:
            if self._closing:
                raise RuntimeError("the reporter is closed")
            if self._topology is None and self._topology_spec is not None and not indices:
                self._topology = as_topology(self._topology_spec, array.shape)
            self._counters["reported"] += 1
            self._step += 1
            if len(self._pending) >= self._max_pending:
                if self._pending[-1].absorb(array, indices, self._step):
                    self._counters["coalesced"] += 1
                    return
                self._pending.popleft()
                self._counters["dropped"] += 1
            self._pending.append(_Report(array, indices, self._step))
            self._cond.notify_all()

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Send everything queued and end the current stream so the server has accounted for it.

        Returns False when that did not happen within `timeout` (e.g. the server is unreachable).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._flush_wanted = True
            self._cond.notify_all()
            while self._pending or self._stream is not None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def close(self, timeout: float | None = 10.0) -> bool:
        """Flush (up to `timeout`), stop the thread and close an owned client. True when all was sent."""
        flushed = self.flush(timeout)
        with self._cond:
            self._closing = True
            self._counters["dropped"] += len(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._owns_client:
            self._client.close()
        return flushed

    def stats(self) -> dict[str, Any]:
        """Counters: reported, coalesced, dropped, sent, accepted, rejected (by the server), streams,
        errors (broken streams), pending, last_error."""
        with self._cond:
            return {**self._counters, "pending": len(self._pending), "last_error": self._last_error}

    def _run(self) -> None:
        backoff = self._backoff_initial_s
        while self._wait_for_work():
            stream = None
            try:
                owner = self._client
                if isinstance(owner, ShardedClient):
                    owner = owner.client_for(self.deployment_id)
                # Open a stream only on a connected channel, so an outage costs no queued report.
                if not owner.wait_ready(backoff):
                    raise ConnectionError(f"{owner.target} is not reachable")
                with self._cond:
                    stream = self._stream = _Stream(time.monotonic())
                    self._counters["streams"] += 1
                summary = self._client.report_loads(
                    self.deployment_id, self._requests(stream), topology=self._topology, rank=self.rank
                )
            except Exception as exc:  # the thread must outlive any failure; the engine never sees it
                if isinstance(exc, grpc.RpcError):
                    error = f"{exc.code().name}: {exc.details()}"
                else:
                    error = f"{type(exc).__name__}: {exc}"
                logger.warning("load stream for %s failed: %s", self.deployment_id, error)
                self._end(stream, error=error)
                with self._cond:
                    self._cond.wait_for(lambda: self._closing, backoff * random.uniform(0.5, 1.0))
                backoff = min(2 * backoff, self._backoff_max_s)
                continue
            backoff = self._backoff_initial_s
            with self._cond:
                self._counters["accepted"] += summary.accepted
                self._counters["rejected"] += summary.rejected
            for index, field, reason in summary.rejections:
                logger.warning("report %d of %s rejected: %s: %s", index, self.deployment_id, field, reason)
            self._end(stream)

    def _wait_for_work(self) -> bool:
        """Block until reports are queued (True) or the reporter closes (False); settle idle flushes."""
        with self._cond:
            while not self._pending and not self._closing:
                if self._flush_wanted:
                    self._flush_wanted = False
                    self._cond.notify_all()
                self._cond.wait()
            return not self._closing

    def _end(self, stream: _Stream | None, error: str = "") -> None:
        with self._cond:
            if stream is not None:
                stream.closed = True
            self._stream = None
            if error:
                self._counters["errors"] += 1
                self._last_error = error
            self._cond.notify_all()

    def _requests(self, stream: _Stream) -> Iterator[dict[str, Any]]:
        """The reports of one stream, taken from the queue until a flush, close, expiry or a broken call."""
        while True:
            with self._cond:
                while True:
                    age = time.monotonic() - stream.started
                    if stream.closed or age >= self._stream_max_s:
                        return
                    if self._pending:
                        break
                    if self._flush_wanted or self._closing:
                        return
                    self._cond.wait(self._stream_max_s - age)
                report = self._pending.popleft()
                self._counters["sent"] += 1
            yield {"loads": report.loads, "layer_indices": report.layer_indices, "step": report.step}
