"""Placements (SPEC §4): versions survive a restart, watchers get every new version (including auto
re-plans), and a deleted deployment is gone with its metric series."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
from rebalancer_wire.codec import encode
from rebalancer_wire.v1 import rebalancer_pb2 as pb
from service_harness import TOPOLOGY, ServerThread, maps_of, report, skewed_loads


def commit(server, deployment_id: str, seed: int) -> pb.Placement:
    request = pb.RebalanceRequest(deployment_id=deployment_id, loads=encode(skewed_loads(seed)), topology=TOPOLOGY)
    return server.stub.Rebalance(request).placement


def test_restart_keeps_placement(tmp_path):
    with ServerThread(str(tmp_path)) as server:
        commit(server, "durable", 1)
        last = commit(server, "durable", 2)
    with ServerThread(str(tmp_path)) as server:
        got = server.stub.GetPlacement(pb.GetPlacementRequest(deployment_id="durable")).placement
        assert got.version == last.version == 2
        for a, b in zip(maps_of(got), maps_of(last), strict=True):
            assert np.array_equal(a, b)
        assert got.stats == last.stats and got.trigger == last.trigger
        assert got.created_unix_ms == last.created_unix_ms
        assert server.metric("rebalancer_deployments") == 1
        assert commit(server, "durable", 3).version == 3  # versions continue


def test_watch_pushes_current_then_each_new_version(tmp_path):
    with ServerThread(str(tmp_path)) as server:
        commit(server, "watched", 1)
        stream = server.stub.WatchPlacement(pb.WatchPlacementRequest(deployment_id="watched"), timeout=30)
        assert next(stream).placement.version == 1
        commit(server, "watched", 2)
        assert next(stream).placement.version == 2
        commit(server, "watched", 3)
        assert next(stream).placement.version == 3
        stream.cancel()
        # after_version skips what the watcher already has
        stream = server.stub.WatchPlacement(
            pb.WatchPlacementRequest(deployment_id="watched", after_version=3), timeout=30
        )
        threading.Timer(0.3, commit, (server, "watched", 4)).start()
        assert next(stream).placement.version == 4
        stream.cancel()


def test_watch_ends_cleanly_on_shutdown(tmp_path):
    server = ServerThread(str(tmp_path)).start()
    commit(server, "closing", 1)
    stream = server.stub.WatchPlacement(pb.WatchPlacementRequest(deployment_id="closing", after_version=1))
    threading.Timer(0.3, server.stop).start()
    assert list(stream) == []  # the stream ends with OK, no error


def test_auto_rebalance_pushes_to_watchers(tmp_path):
    overrides = dict(auto_rebalance_threshold=1.0001, auto_rebalance_min_interval_s=0.0, auto_rebalance_hysteresis=0.0)
    with ServerThread(str(tmp_path), window=2, **overrides) as server:
        # A placement planned for one load, then telemetry with the hot experts elsewhere.
        placement = commit(server, "auto", 1)
        stream = server.stub.WatchPlacement(
            pb.WatchPlacementRequest(deployment_id="auto", after_version=placement.version), timeout=30
        )
        shifted = skewed_loads(99)
        server.stub.StreamLoad(iter([report("auto", shifted), report("auto", shifted)]))
        pushed = next(stream).placement
        stream.cancel()
        assert pushed.version == 2 and pushed.trigger == "auto"
        assert pushed.stats.imbalance_after < pushed.stats.imbalance_before
        assert server.metric("rebalancer_placements_total", trigger="auto") >= 1
        assert server.metric("rebalancer_imbalance_ratio", deployment="auto") > 0


def test_imbalance_is_exported_without_auto_rebalance(tmp_path):
    with ServerThread(str(tmp_path)) as server:
        commit(server, "scored", 1)
        server.stub.StreamLoad(iter([report("scored", skewed_loads(50))]))
        info = None
        for _ in range(100):
            info = server.stub.ListDeployments(pb.ListDeploymentsRequest()).deployments[0]
            if info.imbalance:
                break
        assert info.deployment_id == "scored" and info.version == 1 and info.reports == 1 and info.imbalance >= 1.0
        assert server.metric("rebalancer_imbalance_ratio", deployment="scored") == pytest.approx(info.imbalance)
        assert server.metric("rebalancer_balancedness", deployment="scored", placement="current") == pytest.approx(
            1 / info.imbalance, rel=0.2
        )


def test_delete_forgets_deployment_window_rows_and_series(tmp_path):
    with ServerThread(str(tmp_path)) as server:
        commit(server, "doomed", 1)
        server.stub.StreamLoad(iter([report("doomed", skewed_loads(1))]))
        assert server.metric("rebalancer_replicas_moved_total", deployment="doomed") == 0.0
        assert server.metric("rebalancer_telemetry_reports_total", deployment="doomed", outcome="accepted") == 1
        assert server.stub.DeleteDeployment(pb.DeleteDeploymentRequest(deployment_id="doomed")).deleted
        assert not server.stub.DeleteDeployment(pb.DeleteDeploymentRequest(deployment_id="doomed")).deleted
        with pytest.raises(grpc.RpcError) as error:
            server.stub.GetPlacement(pb.GetPlacementRequest(deployment_id="doomed"))
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        assert (
            server.server.metrics.registry.get_sample_value(
                "rebalancer_telemetry_reports_total", {"deployment": "doomed", "outcome": "accepted"}
            )
            is None
        )
        assert server.stub.ListDeployments(pb.ListDeploymentsRequest()).deployments == []
    with ServerThread(str(tmp_path)) as server:  # the rows are gone too
        assert server.stub.ListDeployments(pb.ListDeploymentsRequest()).deployments == []
