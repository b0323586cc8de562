"""A commit writes its SQLite row while the answer is encoded: the answer is the row, and a commit whose
answer fails is either wholly in force or not at all, so versions go on from what is served."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from rebalancer.service.model import PlacementRecord
from rebalancer.service.server import SERVICE_NAME
from rebalancer_wire.codec import encode
from rebalancer_wire.v1 import rebalancer_pb2 as pb
from service_harness import TOPOLOGY, ServerThread, maps_of, skewed_loads


def commit(server: ServerThread, seed: int) -> pb.Placement:
    request = pb.RebalanceRequest(deployment_id="written", loads=encode(skewed_loads(seed)), topology=TOPOLOGY)
    return server.stub.Rebalance(request, timeout=30).placement


def test_answer_of_a_commit_is_the_placement_stored_and_served(tmp_path):
    with ServerThread(str(tmp_path)) as server:
        answered = commit(server, 1)
        served = server.stub.GetPlacement(pb.GetPlacementRequest(deployment_id="written")).placement
    with ServerThread(str(tmp_path)) as restarted:
        stored = restarted.stub.GetPlacement(pb.GetPlacementRequest(deployment_id="written")).placement
    assert answered.version == served.version == stored.version == 1
    for ours, theirs in zip(maps_of(answered), maps_of(served), strict=True):
        assert np.array_equal(ours, theirs)
    assert np.array_equal(maps_of(answered)[0], maps_of(stored)[0])


def test_a_commit_whose_answer_fails_leaves_versions_that_go_on(tmp_path, monkeypatch):
    with ServerThread(str(tmp_path)) as server:
        commit(server, 1)
        fill, failures = PlacementRecord.fill, []

        def fill_failing_once(record, message):
            if not failures:
                failures.append(record.version)
                raise RuntimeError("encoding failed")
            return fill(record, message)

        monkeypatch.setattr(PlacementRecord, "fill", fill_failing_once)
        with pytest.raises(grpc.RpcError) as error:
            commit(server, 2)
        assert error.value.code() == grpc.StatusCode.INTERNAL and failures == [2]
        served = server.stub.GetPlacement(pb.GetPlacementRequest(deployment_id="written")).placement
        assert served.version in (1, 2)
        assert commit(server, 3).version == served.version + 1  # no version written but not served
    with ServerThread(str(tmp_path)) as restarted:
        stored = restarted.stub.GetPlacement(pb.GetPlacementRequest(deployment_id="written")).placement
        assert stored.version == served.version + 1


def test_a_commit_whose_caller_goes_away_while_its_row_is_written_completes(tmp_path):
    with ServerThread(str(tmp_path)) as server:
        commit(server, 1)
        store, gate, entered = server.server.store, threading.Event(), threading.Event()
        write = store._commit

        def held_write(record, relayout=None):
            entered.set()
            gate.wait(30)
            write(record, relayout)

        store._commit = held_write
        request = pb.RebalanceRequest(deployment_id="written", loads=encode(skewed_loads(2)), topology=TOPOLOGY)
        call = server.stub.Rebalance.future(request, timeout=30)
        assert entered.wait(30)
        call.cancel()
        cancelled = server.settled_metric(
            "grpc_server_handled_total",
            1,
            grpc_type="unary",
            grpc_service=SERVICE_NAME,
            grpc_method="Rebalance",
            grpc_code="CANCELLED",
        )
        assert cancelled == 1  # the handler has gone: the row is still being written
        gate.set()
        store._commit = write
        deadline = time.monotonic() + 10
        while served_version(server) != 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert served_version(server) == 2  # the row was written, so it is the version in force
        assert commit(server, 3).version == 3


def served_version(server: ServerThread) -> int:
    return server.stub.GetPlacement(pb.GetPlacementRequest(deployment_id="written")).placement.version
