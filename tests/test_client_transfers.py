"""The client's view of transfer plans and elastic EP: `Placement.transfers` and `gpu_ids`, the raw JSON,
request building for unavailable GPUs and the cost model, and the CLI flags (no server involved)."""

from __future__ import annotations

import numpy as np
import pytest
from rebalancer_client import Placement
from rebalancer_client.cli import build_parser
from rebalancer_client.messages import rebalance_request
from rebalancer_wire.codec import encode
from rebalancer_wire.v1 import rebalancer_pb2 as pb


def _message(transfers: np.ndarray | None, gpu_ids=()) -> pb.Placement:
    phy2log = np.array([[0, 1, 2, 0]])
    message = pb.Placement(
        topology=pb.Topology(num_layers=1, num_experts=3, num_replicas=4, num_groups=1, num_nodes=1, num_gpus=2),
        phy2log=encode(phy2log),
        logcnt=encode(np.array([[2, 1, 1]])),
        log2phy=encode(np.array([[[0, 3], [1, -1], [2, -1]]])),
        stats=pb.PlacementStats(moved_bytes=88.0, intra_node_share=0.5, estimated_transfer_seconds=0.25),
        gpu_ids=list(gpu_ids),
    )
    if transfers is not None:
        message.transfers.CopyFrom(encode(transfers.astype(np.int32)))
    return message


def test_placement_reads_the_transfer_plan_and_its_cost():
    rows = np.array([[0, 0, 1, 3, 0], [0, 2, 1, 2, 0]])
    placement = Placement.from_proto(_message(rows, gpu_ids=[0, 2]))
    assert placement.transfers.dtype == np.int64 and placement.transfers.tolist() == rows.tolist()
    assert placement.gpu_ids == [0, 2]
    assert placement.stats.moved_bytes == 88.0 and placement.stats.estimated_transfer_seconds == 0.25
    raw = placement.to_json("raw")
    assert raw["transfers"] == rows.tolist() and raw["gpu_ids"] == [0, 2]
    assert raw["stats"]["intra_node_share"] == 0.5


def test_a_placement_without_one_in_force_has_an_empty_plan():
    placement = Placement.from_proto(_message(None))
    assert placement.transfers.shape == (0, 5) and placement.gpu_ids == []


def test_rebalance_request_carries_unavailable_gpus_and_the_cost_model():
    request = rebalance_request(
        deployment_id="d",
        unavailable_gpus=[3, 5],
        cost_model={"bytes_per_expert": 1e6, "inter_node_bandwidth": 2.5e10},
        max_transfer_seconds=0.5,
        max_incoming_copies_per_gpu=4,
        dry_run=True,
    )
    assert list(request.unavailable_gpus) == [3, 5]
    assert request.cost_model.bytes_per_expert == 1e6 and request.cost_model.inter_node_bandwidth == 2.5e10
    assert not request.cost_model.HasField("intra_node_bandwidth")
    assert request.options.max_transfer_seconds == 0.5 and request.options.max_incoming_copies_per_gpu == 4
    with pytest.raises(ValueError, match="cost_model"):
        rebalance_request(deployment_id="d", cost_model={"bandwidth": 1.0})
    with pytest.raises(ValueError, match="unavailable_gpus"):
        rebalance_request(deployment_id="d", unavailable_gpus=[-1])
    with pytest.raises(ValueError, match="max_transfer_seconds"):
        rebalance_request(deployment_id="d", max_transfer_seconds=-1.0)


def test_cli_flags_for_budgets_elastic_ep_and_the_cost_model():
    args = build_parser().parse_args(
        ["rebalance", "--deployment", "d", "--dry-run", "--unavailable-gpus", "1", "2"]
        + ["--max-transfer-seconds", "0.5", "--max-incoming", "3", "--new-num-gpus", "8"]
        + ["--bytes-per-expert", "1e6", "--inter-node-bandwidth", "5e10"]
    )
    assert args.unavailable_gpus == [1, 2]
    assert (args.max_transfer_seconds, args.max_incoming_copies_per_gpu, args.new_num_gpus) == (0.5, 3, 8)
    assert args.bytes_per_expert == 1e6 and args.inter_node_bandwidth == 5e10 and args.intra_node_bandwidth is None
