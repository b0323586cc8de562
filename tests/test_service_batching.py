"""Batching: concurrent same-shape requests share solver calls, and a layer's result does not depend on
its batch mates. With --batch-window-when always every first request waits the window (what the window
tests below need, to make bursts batch deterministically); by default (busy) a request alone in an idle
server is solved at once, while requests that queue up behind a solve still batch."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from rebalancer.service.config import parse_args
from rebalancer_wire.codec import encode
from rebalancer_wire.v1 import rebalancer_pb2 as pb
from service_harness import TOPOLOGY, ServerThread, library, maps_of, skewed_loads, slow_solver


def request(seed: int, **options) -> pb.RebalanceRequest:
    return pb.RebalanceRequest(
        loads=encode(skewed_loads(seed)), topology=TOPOLOGY, options=pb.SolveOptions(seed=seed, **options)
    )


def solver_calls(server: ServerThread) -> float:
    return server.metric("rebalancer_solver_calls_total", path="torch") + server.metric(
        "rebalancer_solver_calls_total", path="triton"
    )


def test_concurrent_requests_share_solver_calls(tmp_path):
    with ServerThread(str(tmp_path), batch_window_ms=50, batch_window_when="always") as server:
        before = solver_calls(server)
        batches_before = server.metric("rebalancer_batch_requests_count")
        with ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(lambda seed: server.stub.Rebalance(request(seed), timeout=30), range(16)))
        calls = solver_calls(server) - before
        assert calls <= 4, f"16 concurrent requests took {calls} solver calls"
        assert server.metric("rebalancer_batch_requests_count") - batches_before == calls
        assert max(r.placement.stats.batch_requests for r in responses) >= 4
        for seed, response in enumerate(responses):  # every request got its own layers back
            assert np.array_equal(
                maps_of(response.placement)[0], library(skewed_loads(seed), seed=seed).phy2log.numpy()
            )


def test_layer_result_is_the_same_alone_and_in_a_batch(tmp_path):
    with ServerThread(str(tmp_path), batch_window_ms=50, batch_window_when="always") as server:
        alone = server.stub.Rebalance(request(3))
        assert alone.placement.stats.batch_requests == 1
        with ThreadPoolExecutor(8) as pool:
            batched = list(
                pool.map(lambda seed: server.stub.Rebalance(request(seed), timeout=30), [3, 4, 5, 6, 7, 8, 9, 10])
            )
        assert batched[0].placement.stats.batch_requests > 1
        for a, b in zip(maps_of(alone.placement), maps_of(batched[0].placement), strict=True):
            assert np.array_equal(a, b)


def test_layer_cap_splits_batches(tmp_path):
    with ServerThread(str(tmp_path), batch_window_ms=50, batch_window_when="always", max_batch_layers=8) as server:
        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(lambda seed: server.stub.Rebalance(request(seed), timeout=30), range(6)))
        assert all(r.placement.stats.batch_layers <= 8 for r in responses)


def test_requests_with_and_without_prev_placement_are_not_mixed(tmp_path):
    with ServerThread(str(tmp_path), batch_window_ms=50, batch_window_when="always") as server:
        prev = maps_of(server.stub.Rebalance(request(1)).placement)[0]
        with_prev = request(2)
        with_prev.prev_phy2log.CopyFrom(encode(prev))
        with ThreadPoolExecutor(4) as pool:
            responses = list(
                pool.map(lambda r: server.stub.Rebalance(r, timeout=30), [with_prev, request(3), with_prev, request(4)])
            )
        assert [r.placement.stats.batch_requests for r in responses] == [2, 2, 2, 2]
        expected = library(skewed_loads(2), prev=prev, seed=2)
        assert np.array_equal(maps_of(responses[0].placement)[0], expected.phy2log.numpy())
        assert list(responses[0].placement.stats.moved_per_layer) == expected.moved_copies.tolist()


def test_idle_server_solves_a_lone_request_without_waiting_the_window(tmp_path):
    with ServerThread(str(tmp_path), batch_window_ms=600_000) as server:  # a window no request could outwait
        response = server.stub.Rebalance(request(1), timeout=30)
        assert response.placement.stats.batch_requests == 1
        assert np.array_equal(maps_of(response.placement)[0], library(skewed_loads(1), seed=1).phy2log.numpy())


def test_busy_server_batches_the_requests_that_queue_up_behind_a_solve(tmp_path):
    with ServerThread(str(tmp_path), batch_window_ms=50) as server:
        gate, entered = slow_solver(server)
        calls = solver_calls(server)
        first = server.stub.Rebalance.future(request(1), timeout=30)
        assert entered.wait(30)  # dispatched at once: nothing else was in flight
        queued = [server.stub.Rebalance.future(request(seed), timeout=30) for seed in (2, 3, 4)]
        deadline = time.monotonic() + 10
        while server.metric("rebalancer_queue_depth") < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        gate.set()
        assert first.result().placement.stats.batch_requests == 1
        assert [f.result().placement.stats.batch_requests for f in queued] == [3, 3, 3]
        assert solver_calls(server) == calls + 2
        for seed, future in zip((2, 3, 4), queued, strict=True):
            assert np.array_equal(
                maps_of(future.result().placement)[0], library(skewed_loads(seed), seed=seed).phy2log.numpy()
            )


def test_batch_window_when_flag_takes_busy_or_always_from_flag_or_environment():
    assert parse_args([], environ={}).batch_window_when == "busy"
    assert parse_args(["--batch-window-when", "always"], environ={}).batch_window_when == "always"
    assert parse_args([], environ={"REBALANCER_BATCH_WINDOW_WHEN": "always"}).batch_window_when == "always"
    with pytest.raises(SystemExit):
        parse_args(["--batch-window-when", "sometimes"], environ={})
