"""The background load reporter: never blocks the engine, coalesces or drops when the server is away,
reconnects with backoff, and flushes what it queued."""

from __future__ import annotations

import time

import numpy as np
import pytest
from client_helpers import fake_service, start_fake
from rebalancer_client import LoadReporter, RebalancerClient
from serving import free_port

TOPOLOGY = {"num_replicas": 6, "num_gpus": 3}


def test_reports_arrive_on_one_stream_and_flush_waits_for_the_server():
    with fake_service() as fake, LoadReporter(fake.target, "engine", topology=TOPOLOGY, rank=2) as reporter:
        buffer = np.ones((2, 4), dtype=np.int32)
        for _ in range(5):
            reporter.report(buffer)
            buffer += 1  # the engine reuses its counter buffer; queued reports must not change
        assert reporter.flush(10)
        stats = reporter.stats()
        assert (stats["reported"], stats["sent"], stats["accepted"], stats["dropped"]) == (5, 5, 5, 0)
        assert stats["streams"] <= 2 and stats["pending"] == 0
        deployment = fake.servicer.deployments["engine"]
        assert deployment.window.tolist() == [[15] * 4] * 2 and deployment.ranks == {2}


def test_subset_reports_and_a_later_topology_from_the_first_full_report():
    with fake_service() as fake:
        client = RebalancerClient(fake.target)
        with LoadReporter(client, "subset", topology=TOPOLOGY) as reporter:
            reporter.report(np.ones((2, 4)))
            reporter.report(np.full((1, 4), 3.0), layer_indices=[1])
            assert reporter.flush(10)
            with pytest.raises(ValueError, match="layer_indices has 2 entries"):
                reporter.report(np.ones((1, 4)), layer_indices=[0, 1])
            with pytest.raises(ValueError, match="finite"):
                reporter.report(np.full((2, 4), np.nan))
        assert fake.servicer.deployments["subset"].window.tolist() == [[1] * 4, [4] * 4]
        client.close()


def test_outage_coalesces_without_blocking_then_reconnects_and_delivers_everything():
    port = free_port()
    reporter = LoadReporter(
        f"127.0.0.1:{port}",
        "outage",
        topology=TOPOLOGY,
        max_pending=4,
        backoff_initial_s=0.05,
        backoff_max_s=0.2,
    )
    started = time.perf_counter()
    for _ in range(200):
        reporter.report(np.ones((2, 4)))
    assert time.perf_counter() - started < 1.0  # the engine's step never waits for the network
    stats = reporter.stats()
    assert stats["pending"] == 4 and stats["coalesced"] == 196 and stats["dropped"] == 0
    assert not reporter.flush(0.3)
    assert reporter.stats()["errors"] >= 1 and "not reachable" in reporter.stats()["last_error"]

    fake = start_fake(port)
    try:
        assert reporter.flush(15)
        assert fake.servicer.deployments["outage"].window.sum() == 200 * 8  # summed, nothing lost
        assert reporter.close(5)
    finally:
        fake.server.stop(None)


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


def test_streams_are_recycled_so_acceptance_counts_arrive_without_a_flush():
    with fake_service() as fake, LoadReporter(fake.target, "recycle", topology=TOPOLOGY, stream_max_s=0.1) as reporter:
        reporter.report(np.ones((2, 4)))
        deadline = time.monotonic() + 5
        while reporter.stats()["accepted"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert reporter.stats()["accepted"] == 1
        reporter.report(np.ones((2, 4)))
        assert reporter.flush(5) and reporter.stats()["streams"] == 2
