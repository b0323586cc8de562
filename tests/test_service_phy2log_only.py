"""`phy2log_only`: the answer leaves out logcnt and log2phy (most of its bytes) for callers that derive
them; the committed version keeps every map, and the client derives the same counts and a valid log2phy."""

from __future__ import annotations

import numpy as np
from rebalancer_client import RebalancerClient
from rebalancer_client.placement import Placement
from rebalancer_wire.codec import encode
from rebalancer_wire.v1 import rebalancer_pb2 as pb
from service_harness import EXPERTS, TOPOLOGY, maps_of, skewed_loads


def test_the_answer_carries_phy2log_only_and_the_committed_version_every_map(server):
    request = pb.RebalanceRequest(
        deployment_id="slim", loads=encode(skewed_loads(71)), topology=TOPOLOGY, phy2log_only=True
    )
    response = server.stub.Rebalance(request)
    slim = response.placement
    assert response.committed and not slim.HasField("log2phy") and not slim.HasField("logcnt")
    stored = server.stub.GetPlacement(pb.GetPlacementRequest(deployment_id="slim")).placement
    assert stored.HasField("log2phy") and stored.version == slim.version
    assert np.array_equal(maps_of(stored)[0], Placement.from_proto(slim).phy2log)
    assert slim.ByteSize() < stored.ByteSize()
    assert slim.stats == stored.stats


def test_the_client_derives_the_maps_left_out(server):
    loads = skewed_loads(72)
    with RebalancerClient(server.target) as client:
        full = client.rebalance(loads, num_replicas=TOPOLOGY.num_replicas, num_gpus=TOPOLOGY.num_gpus, seed=3)
        slim = client.rebalance(
            loads, num_replicas=TOPOLOGY.num_replicas, num_gpus=TOPOLOGY.num_gpus, seed=3, phy2log_only=True
        )
    assert np.array_equal(slim.phy2log, full.phy2log)
    assert np.array_equal(slim.logcnt, full.logcnt)
    assert slim.log2phy.shape == full.log2phy.shape
    for layer in range(slim.phy2log.shape[0]):
        for expert in range(EXPERTS):
            slots = slim.log2phy[layer, expert]
            slots = slots[slots >= 0]
            assert len(slots) == slim.logcnt[layer, expert] and list(slots) == sorted(slots)
            assert (slim.phy2log[layer, slots] == expert).all()
