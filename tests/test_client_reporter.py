"""The background load reporter: never blocks the engine, coalesces or drops when the server is away,
reconnects with backoff, and flushes what it queued (against the real server in-process)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from rebalancer_client import LoadReporter, RebalancerClient
from service_harness import free_port, real_service

TOPOLOGY = {"num_replicas": 6, "num_gpus": 3}


@pytest.fixture(scope="module")
def server():
    with real_service() as running:
        yield running


def test_reports_arrive_on_one_stream_and_flush_waits_for_the_server(server):
    with LoadReporter(server.target, "engine", topology=TOPOLOGY, rank=2) as reporter:
        buffer = np.ones((2, 4), dtype=np.int32)
        for _ in range(5):
            reporter.report(buffer)
            buffer += 1  # the engine reuses its counter buffer; queued reports must not change
        assert reporter.flush(10)
        stats = reporter.stats()
        assert (stats["reported"], stats["sent"], stats["accepted"], stats["dropped"]) == (5, 5, 5, 0)
        assert stats["streams"] <= 2 and stats["pending"] == 0
    assert server.window_loads("engine").tolist() == [[15] * 4] * 2


def test_subset_reports_and_a_later_topology_from_the_first_full_report(server):
    with RebalancerClient(server.target) as client, LoadReporter(client, "subset", topology=TOPOLOGY) as reporter:
        reporter.report(np.ones((2, 4)))
        reporter.report(np.full((1, 4), 3.0), layer_indices=[1])
        assert reporter.flush(10)
        with pytest.raises(ValueError, match="layer_indices has 2 entries"):
            reporter.report(np.ones((1, 4)), layer_indices=[0, 1])
        with pytest.raises(ValueError, match="finite"):
            reporter.report(np.full((2, 4), np.nan))
    assert server.window_loads("subset").tolist() == [[1] * 4, [4] * 4]


def test_reports_before_the_server_is_up_are_delivered_when_it_comes():
    port = free_port()
    with LoadReporter(
        f"127.0.0.1:{port}", "late", topology=TOPOLOGY, backoff_initial_s=0.05, backoff_max_s=0.1
    ) as reporter:
        reporter.report(np.ones((2, 4)))
        assert not reporter.flush(0.2)
        with real_service(port=port) as late:
            assert reporter.flush(15)
            assert late.window_loads("late").tolist() == [[1] * 4] * 2


def test_outage_coalesces_without_blocking_then_reconnects_and_delivers_everything(tmp_path):
    """The server stops (graceful, as on SIGTERM) and comes back on the same port and state: what the engine
    reported meanwhile arrives once, summed; the placement committed before the outage is still there."""
    options = dict(max_pending=4, backoff_initial_s=0.05, backoff_max_s=0.2)
    with real_service(str(tmp_path)) as before:
        port = before.server.port
        reporter = LoadReporter(before.target, "outage", topology=TOPOLOGY, **options)
        reporter.report(np.ones((2, 4)))
        assert reporter.flush(10)
        with RebalancerClient(before.target) as client:
            assert client.rebalance(deployment_id="outage").version == 1
    started = time.perf_counter()
    for _ in range(200):
        reporter.report(np.full((2, 4), 2.0))
    assert time.perf_counter() - started < 1.0  # the engine's step never waits for the network
    stats = reporter.stats()
    assert stats["pending"] == 4 and stats["coalesced"] == 196 and stats["dropped"] == 0
    assert not reporter.flush(0.3)
    assert reporter.stats()["errors"] >= 1 and "not reachable" in reporter.stats()["last_error"]

    with real_service(str(tmp_path), port=port) as after:
        assert reporter.flush(15)
        # Windows are soft state: only what was reported during the outage, every report of it once.
        assert after.window_loads("outage").tolist() == [[400.0] * 4] * 2
        assert reporter.close(5)
        assert reporter.stats()["dropped"] == 0
        with RebalancerClient(after.target) as client:
            assert client.get_placement("outage").version == 1


def test_full_queue_of_other_layer_sets_drops_the_oldest_and_counts_it():
    reporter = LoadReporter(f"127.0.0.1:{free_port()}", "drops", topology=TOPOLOGY, max_pending=2)
    for layer in (0, 1, 0, 1, 0):
        reporter.report(np.ones((1, 4)), layer_indices=[layer])
    stats = reporter.stats()
    assert stats["dropped"] == 3 and stats["pending"] == 2
    assert not reporter.close(0.2)
    assert reporter.stats()["dropped"] == 5  # what close could not send is counted too
    with pytest.raises(RuntimeError, match="closed"):
        reporter.report(np.ones((2, 4)))


def test_streams_are_recycled_so_acceptance_counts_arrive_without_a_flush(server):
    with LoadReporter(server.target, "recycle", topology=TOPOLOGY, stream_max_s=0.1) as reporter:
        reporter.report(np.ones((2, 4)))
        deadline = time.monotonic() + 5
        while reporter.stats()["accepted"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert reporter.stats()["accepted"] == 1
        reporter.report(np.ones((2, 4)))
        assert reporter.flush(5) and reporter.stats()["streams"] == 2
