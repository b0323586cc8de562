"""Placement objects, engine JSON exporters and client-side argument checks (no server involved)."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
from client_helpers import assert_valid_maps
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from rebalancer_client import Placement, Topology, field_violations
from rebalancer_client.engines.layers import LayerNumbering
from rebalancer_client.messages import as_topology, load_request, loads_array, rebalance_request
from rebalancer_wire.codec import encode
from rebalancer_wire.v1 import rebalancer_pb2 as pb

TOPOLOGY = Topology(num_layers=2, num_experts=4, num_replicas=6, num_groups=1, num_nodes=1, num_gpus=3)

# A hand-built valid placement of TOPOLOGY (2 layers of 4 experts on 3 GPUs x 2 slots): layer 0 gives
# expert 0 three copies, layer 1 gives experts 2 and 3 two each; log2phy is padded with -1.
PHY2LOG = np.array([[0, 1, 0, 2, 0, 3], [2, 0, 3, 2, 1, 3]], dtype=np.int64)
LOGCNT = np.array([[3, 1, 1, 1], [1, 1, 2, 2]], dtype=np.int64)
LOG2PHY = np.array(
    [
        [[0, 2, 4], [1, -1, -1], [3, -1, -1], [5, -1, -1]],
        [[1, -1, -1], [4, -1, -1], [0, 3, -1], [2, 5, -1]],
    ],
    dtype=np.int64,
)


def placement_message() -> pb.Placement:
    return pb.Placement(
        deployment_id="dep",
        version=3,
        topology=TOPOLOGY.to_proto(),
        phy2log=encode(PHY2LOG),
        log2phy=encode(LOG2PHY),
        logcnt=encode(LOGCNT),
        stats=pb.PlacementStats(
            balancedness_after=0.9,
            replicas_moved=2,
            moved_per_layer=[1, 1],
            device="cpu",
            policies=[pb.PolicyLayers(policy="global", layers=2)],
        ),
        trigger="request",
    )


def test_placement_from_proto_gives_writable_int64_maps_and_plain_stats():
    placement = Placement.from_proto(placement_message(), committed=True)
    assert placement.phy2log.dtype == np.int64 and placement.phy2log.shape == (2, 6)
    placement.phy2log[0, 0] = placement.phy2log[0, 0]  # writable copy, not a view of the message bytes
    assert_valid_maps(placement.phy2log, placement.log2phy, placement.logcnt, 4)
    assert placement.version == 3 and placement.deployment_id == "dep" and placement.committed
    assert placement.topology == TOPOLOGY and placement.topology.slots_per_gpu == 2
    assert placement.stats.policies == {"global": 2} and placement.stats.moved_per_layer == [1, 1]
    assert list(placement.gpu_experts(0, 0)) == list(placement.phy2log[0, :2])


def test_sglang_json_is_exactly_the_init_expert_location_file():
    placement = Placement.from_proto(placement_message())
    document = json.loads(json.dumps(placement.to_json("sglang", LayerNumbering.dense_prefix(2, 0))))
    assert list(document) == ["physical_to_logical_map"]  # SGLang passes the keys as keyword arguments
    assert np.array_equal(np.array(document["physical_to_logical_map"]), placement.phy2log)


def test_vllm_json_is_the_one_map_vllm_installs():
    placement = Placement.from_proto(placement_message())
    document = json.loads(json.dumps(placement.to_json("vllm")))
    # vLLM derives logical_to_physical_map ([L, E, 1024] in 0.33) from this map itself: nothing narrower is written.
    assert list(document) == ["physical_to_logical_map"]
    assert np.array_equal(np.array(document["physical_to_logical_map"]), placement.phy2log)


def test_decoder_layer_files_need_the_numbering_and_put_moe_rows_in_place():
    placement = Placement.from_proto(placement_message())
    with pytest.raises(ValueError, match="SGLang numbers its maps by decoder layer"):
        placement.to_json("sglang")
    with pytest.raises(ValueError, match="TensorRT-LLM numbers its maps by decoder layer"):
        placement.to_text("trtllm")
    numbering = LayerNumbering.parse_ids("1,3", 4)  # dense, MoE, dense, MoE
    rows = np.array(json.loads(placement.to_text("sglang", numbering))["physical_to_logical_map"])
    assert rows.shape == (4, 6)
    assert np.array_equal(rows[[1, 3]], placement.phy2log)
    assert np.array_equal(rows[[0, 2]], np.tile(np.arange(6) % 4, (2, 1)))  # dense rows: a valid trivial map
    assert placement.to_text("trtllm", numbering).splitlines()[:3] == [
        "num_slots: 6",
        "layer_updates_per_iter: 0",
        "initial_global_assignments:",
    ]


def test_raw_json_round_trips_every_field():
    placement = Placement.from_proto(placement_message())
    document = json.loads(json.dumps(placement.to_json("raw")))
    assert document["version"] == 3 and document["topology"]["num_gpus"] == 3
    assert document["stats"]["policies"] == {"global": 2}
    assert np.array_equal(np.array(document["log2phy"]), placement.log2phy)
    with pytest.raises(ValueError, match="format"):
        placement.to_json("trtllm")


@pytest.mark.parametrize(
    ("loads", "match"),
    [
        (np.full((2, 4), np.nan), "loads must be finite"),
        (np.array([[1.0, np.inf, 0, 0]]), "loads must be finite"),
        (np.array([[1.0, -1.0, 0, 0]]), "loads must be non-negative"),
        (np.ones(4), "loads must be 2-D"),
        (np.ones((2, 2, 2)), "loads must be 2-D"),
        (np.zeros((0, 4)), "at least one layer"),
        (np.array([["a", "b"]]), "real numbers"),
        ([[1, 2], [3]], "loads must be"),
    ],
)
def test_bad_loads_raise_value_error_naming_loads(loads, match):
    with pytest.raises(ValueError, match=match):
        loads_array(loads)


def test_nested_lists_and_integer_loads_are_accepted():
    assert loads_array([[1, 2], [3, 4]]).shape == (2, 2)
    request = rebalance_request([[1, 2], [3, 4]], num_replicas=4, num_gpus=2)
    assert request.topology.num_layers == 2 and request.topology.num_experts == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "num_replicas and num_gpus are required"),
        ({"num_replicas": 8}, "num_replicas and num_gpus must be given together"),
        ({"num_replicas": 2, "num_gpus": 2}, r"num_replicas \(2\) must be >= "),
        ({"num_replicas": 9, "num_gpus": 2}, r"num_gpus \(2\) must divide num_replicas \(9\)"),
        ({"num_replicas": 8, "num_gpus": 2, "num_groups": 4, "num_nodes": 4}, r"num_nodes \(4\) must divide num_gpus"),
        ({"num_replicas": 8, "num_gpus": 2, "num_groups": 3}, r"num_groups \(3\) must divide the number of experts"),
        ({"num_replicas": 8, "num_gpus": 0}, "num_gpus must be an integer >= 1"),
        ({"num_replicas": 8, "num_gpus": 2, "policy": "fastest"}, "policy must be one of"),
        ({"num_replicas": 8, "num_gpus": 2, "balance_tolerance": 2.0}, "balance_tolerance"),
        ({"num_replicas": 8, "num_gpus": 2, "prev_phy2log": [1, 2]}, "prev_phy2log must be 2-D"),
    ],
)
def test_inline_rebalance_needs_a_consistent_topology(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rebalance_request(np.ones((2, 4)), **kwargs)


def test_rebalance_request_carries_every_option():
    request = rebalance_request(
        np.ones((2, 4), dtype=np.float64),
        num_replicas=8,
        num_groups=2,
        num_nodes=1,
        num_gpus=4,
        deployment_id="dep",
        policy="deepseek",
        num_candidates=16,
        seed=7,
        dry_run=True,
        max_moves_per_layer=3,
        balance_tolerance=0.01,
        fresh=True,
        locality_tolerance=0.02,
        base_version=5,
        prev_phy2log=np.zeros((2, 8), dtype=np.int32),
    )
    options = request.options
    assert options.policy == pb.POLICY_DEEPSEEK and options.num_candidates == 16 and options.seed == 7
    assert options.dry_run and options.fresh and options.max_moves_per_layer == 3
    assert options.balance_tolerance == pytest.approx(0.01) and options.locality_tolerance == pytest.approx(0.02)
    assert request.base_version == 5 and request.prev_phy2log.dtype == pb.ELEMENT_TYPE_INT64
    assert request.loads.dtype == pb.ELEMENT_TYPE_FLOAT64  # the loads keep their precision on the wire
    assert not rebalance_request(deployment_id="dep").HasField("loads")
    with pytest.raises(ValueError, match="loads are required"):
        rebalance_request()


def test_report_messages_carry_subsets_steps_and_topology_on_the_first_only():
    topology = {"num_replicas": 6, "num_gpus": 3}
    first = load_request("dep", 0, np.ones((2, 4)), topology=topology, rank=3)
    assert first.topology.num_layers == 2 and first.topology.num_experts == 4 and first.rank == 3
    pair = load_request("dep", 1, ([1], np.ones((1, 4))), topology=topology)
    assert list(pair.layer_indices) == [1] and not pair.HasField("topology") and pair.step == 1
    mapping = load_request("dep", 2, {"loads": np.ones((1, 4)), "layer_indices": [0], "step": 99})
    assert mapping.step == 99
    with pytest.raises(ValueError, match="layer indices for 2 rows"):
        load_request("dep", 0, ([0], np.ones((2, 4))))
    with pytest.raises(ValueError, match="topology is missing num_layers"):
        load_request("dep", 0, ([0], np.ones((1, 4))), topology=topology)
    with pytest.raises(ValueError, match="deployment_id"):
        load_request("", 0, np.ones((1, 4)))
    assert as_topology(TOPOLOGY.to_proto()) == TOPOLOGY
    with pytest.raises(ValueError, match="unknown keys"):
        as_topology({"gpus": 3})


class _Error(grpc.RpcError):
    def __init__(self, trailing):
        self._trailing = trailing

    def trailing_metadata(self):
        return self._trailing


def test_field_violations_reads_the_bad_request_detail():
    detail = any_pb2.Any()
    detail.Pack(
        error_details_pb2.BadRequest(
            field_violations=[error_details_pb2.BadRequest.FieldViolation(field="loads", description="NaN")]
        )
    )
    status = status_pb2.Status(code=3, message="bad", details=[detail])
    error = _Error((("grpc-status-details-bin", status.SerializeToString()),))
    assert field_violations(error) == [("loads", "NaN")]
    assert field_violations(_Error(None)) == []
