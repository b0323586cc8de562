"""A commit writes its SQLite row while the answer is encoded: the answer is the row, and a commit whose
answer fails is either wholly in force or not at all, so versions go on from what is served."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from rebalancer.service.model import PlacementRecord
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
