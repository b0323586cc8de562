"""Batching (SPEC §4): concurrent same-shape requests share solver calls, and a layer's result does not
depend on its batch mates."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from rebalancer_wire.codec import encode
from rebalancer_wire.v1 import rebalancer_pb2 as pb
from service_harness import TOPOLOGY, ServerThread, library, maps_of, skewed_loads


def request(seed: int, **options) -> pb.RebalanceRequest:
    return pb.RebalanceRequest(
        loads=encode(skewed_loads(seed)), topology=TOPOLOGY, options=pb.SolveOptions(seed=seed, **options)
    )


def solver_calls(server: ServerThread) -> float:
    return server.metric("rebalancer_solver_calls_total", path="torch") + server.metric(
        "rebalancer_solver_calls_total", path="triton"
    )


def test_concurrent_requests_share_solver_calls(tmp_path):
    with ServerThread(str(tmp_path), batch_window_ms=50) as server:
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
    with ServerThread(str(tmp_path), batch_window_ms=50) as server:
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
    with ServerThread(str(tmp_path), batch_window_ms=50, max_batch_layers=8) as server:
        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(lambda seed: server.stub.Rebalance(request(seed), timeout=30), range(6)))
        assert all(r.placement.stats.batch_layers <= 8 for r in responses)


def test_requests_with_and_without_prev_placement_are_not_mixed(tmp_path):
    with ServerThread(str(tmp_path), batch_window_ms=50) as server:
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
