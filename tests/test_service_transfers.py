"""Transfers over the wire: the plan as a compact tensor in every placement made from one in force, its
cost in the stats, budgets and elastic EP as Rebalance options, and bad input refused naming the field
with nothing committed."""

from __future__ import annotations

from unittest import mock

import grpc
import numpy as np
import pytest
import torch
from rebalancer.solver import CostModel, apply_transfers, solve
from rebalancer_testkit.workloads import drift_series
from rebalancer_wire.codec import decode, encode
from rebalancer_wire.v1 import rebalancer_pb2 as pb
from service_harness import (
    GPUS,
    REPLICAS,
    TOPOLOGY,
    field_violations,
    library,
    maps_of,
    skewed_loads,
)

SLOTS_PER_GPU = REPLICAS // GPUS


def inline(loads, prev=None, **fields) -> pb.RebalanceRequest:
    options = fields.pop("options", {})
    request = pb.RebalanceRequest(loads=encode(loads), topology=TOPOLOGY, options=pb.SolveOptions(**options), **fields)
    if prev is not None:
        request.prev_phy2log.CopyFrom(encode(np.asarray(prev, dtype=np.int64)))
    return request


def test_inline_plan_carries_the_transfers_that_lead_to_it(server):
    prev = library(skewed_loads(31)).phy2log.numpy()
    loads = skewed_loads(32)
    placement = server.stub.Rebalance(inline(loads, prev)).placement
    transfers = decode(placement.transfers)
    assert transfers.dtype == np.int32 and transfers.ndim == 2 and transfers.shape[1] == 5
    phy2log = maps_of(placement)[0]
    replayed = apply_transfers(torch.tensor(prev), torch.from_numpy(transfers.astype(np.int64)), SLOTS_PER_GPU, GPUS)
    assert np.array_equal(replayed.numpy(), phy2log)
    expected = library(loads, prev=prev)
    assert np.array_equal(transfers, expected.transfers.numpy())
    stats = placement.stats
    assert stats.moved_bytes == pytest.approx(expected.moved_bytes)
    assert stats.estimated_transfer_seconds == pytest.approx(expected.estimated_transfer_seconds)
    assert stats.intra_node_share == pytest.approx(expected.intra_node_share)
    assert server.metric("rebalancer_transfer_estimated_seconds_count") >= 1


def test_cost_model_of_the_request_prices_the_plan(server):
    prev = library(skewed_loads(33)).phy2log.numpy()
    loads = skewed_loads(34)
    cost = pb.TransferCost(bytes_per_expert=1e6, intra_node_bandwidth=1e9, inter_node_bandwidth=1e8)
    stats = server.stub.Rebalance(inline(loads, prev, cost_model=cost)).placement.stats
    expected = library(
        loads,
        prev=prev,
        cost_model=CostModel(bytes_per_expert=1_000_000, intra_node_bandwidth=1e9, inter_node_bandwidth=1e8),
    )
    assert stats.moved_bytes == pytest.approx(expected.moved_bytes)
    assert stats.estimated_transfer_seconds == pytest.approx(expected.estimated_transfer_seconds)


def test_a_transfer_budget_defers_layers_per_request(server):
    prev = library(skewed_loads(35)).phy2log.numpy()
    loads = skewed_loads(36)
    full = library(loads, prev=prev)
    budget = 0.5 * full.estimated_transfer_seconds
    placement = server.stub.Rebalance(inline(loads, prev, options={"max_transfer_seconds": budget})).placement
    assert placement.stats.estimated_transfer_seconds <= budget + 1e-12
    expected = library(loads, prev=prev, max_transfer_seconds=budget)
    assert np.array_equal(maps_of(placement)[0], expected.phy2log.numpy())
    assert placement.stats.deferred_layers == expected.deferred_layers


def test_unavailable_gpus_plan_on_the_healthy_ones(server):
    prev = library(skewed_loads(37)).phy2log.numpy()
    loads = skewed_loads(38)
    placement = server.stub.Rebalance(inline(loads, prev, unavailable_gpus=[1])).placement
    assert list(placement.gpu_ids) == [0, 2, 3]
    assert placement.topology.num_gpus == 3 and placement.topology.num_replicas == 3 * SLOTS_PER_GPU
    phy2log = maps_of(placement)[0]
    transfers = decode(placement.transfers).astype(np.int64)
    assert not (transfers[:, 4] == 1).any()
    replayed = apply_transfers(
        torch.tensor(prev), torch.from_numpy(transfers), SLOTS_PER_GPU, 3, torch.tensor([0, 2, 3])
    )
    assert np.array_equal(replayed.numpy(), phy2log)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"unavailable_gpus": [4]}, "unavailable_gpus"),
        ({"unavailable_gpus": [0, 1, 2, 3]}, "unavailable_gpus"),
        ({"options": {"max_transfer_seconds": -1.0}}, "options.max_transfer_seconds"),
        ({"options": {"new_num_gpus": 3}}, "options.new_num_gpus"),
        ({"cost_model": pb.TransferCost(inter_node_bandwidth=0.0)}, "cost_model.inter_node_bandwidth"),
    ],
)
def test_bad_transfer_and_elastic_input_is_invalid_argument_naming_the_field(server, fields, field):
    prev = library(skewed_loads(39)).phy2log.numpy()
    with pytest.raises(grpc.RpcError) as error:
        server.stub.Rebalance(inline(skewed_loads(40), prev, **fields))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(error.value)


def test_the_service_returns_the_plan_with_its_nic_receivers_balanced_as_the_library_does(server):
    # 16 GPUs on 4 nodes: the rearrangement's receive balancing changes this plan (checked below), so the
    # placement the service returns must be the balanced one, maps and transfers alike.
    layers, experts, replicas, nodes, gpus = 16, 64, 128, 4, 16
    series = drift_series(layers, experts, 2, seed=1)
    prev = solve(series[0], replicas, 1, nodes, gpus, device="cpu").phy2log
    expected = solve(series[1], replicas, 1, nodes, gpus, device="cpu", prev_phy2log=prev)
    with mock.patch(
        "rebalancer.solver.rearrangement.balanced_receivers", new=lambda _l, _p, phy2log, *_, **__: phy2log
    ):
        unbalanced = solve(series[1], replicas, 1, nodes, gpus, device="cpu", prev_phy2log=prev)
    assert not torch.equal(expected.phy2log, unbalanced.phy2log)
    topology = pb.Topology(
        num_layers=layers, num_experts=experts, num_replicas=replicas, num_groups=1, num_nodes=nodes, num_gpus=gpus
    )
    request = pb.RebalanceRequest(loads=encode(series[1].numpy()), topology=topology)
    request.prev_phy2log.CopyFrom(encode(prev.numpy()))
    placement = server.stub.Rebalance(request).placement
    phy2log, _, logcnt = maps_of(placement)
    assert np.array_equal(phy2log, expected.phy2log.numpy())
    assert np.array_equal(logcnt, expected.logcnt.numpy())
    assert np.array_equal(decode(placement.transfers), expected.transfers.numpy())
    assert placement.stats.estimated_transfer_seconds == pytest.approx(expected.estimated_transfer_seconds)
