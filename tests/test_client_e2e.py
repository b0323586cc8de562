"""The client end to end on a realistic shape (groups and nodes matter) against the real server in-process,
and the `rebalancer` console script against it.

The test may import the solver library to compare; the client itself never does.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading

import grpc
import numpy as np
import pytest
import torch
from client_helpers import SERVER_BIN, assert_valid_maps
from rebalancer.solver import rebalance_experts
from rebalancer_client import AsyncRebalancerClient, LoadReporter, RebalancerClient, field_violations
from rebalancer_client.cli import main as cli_main
from rebalancer_client.messages import rebalance_request
from rebalancer_wire.codec import encode
from service_harness import real_service

# L, E, R, groups, nodes, G: small enough for CPU test time, large enough for groups and nodes to matter.
SHAPE = (6, 32, 40, 4, 2, 8)
TOPOLOGY = dict(zip(("num_replicas", "num_groups", "num_nodes", "num_gpus"), SHAPE[2:], strict=True))


@pytest.fixture(scope="module")
def server():
    with real_service() as running:
        yield running.target


@pytest.fixture
def client(server):
    with RebalancerClient(server, timeout=30) as client:
        yield client


def zipf_loads(seed: int, layers: int = SHAPE[0], experts: int = SHAPE[1]) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ranks = np.argsort(rng.random((layers, experts)), axis=1) + 1
    return (1000.0 / ranks**1.1).astype(np.float32)


def balancedness(loads: np.ndarray, phy2log: np.ndarray, logcnt: np.ndarray, num_gpus: int) -> float:
    """Mean over layers of mean/max GPU load, each copy carrying load / copies of its expert."""
    per_copy = np.take_along_axis(loads / logcnt, phy2log, axis=1)
    gpu = per_copy.reshape(loads.shape[0], num_gpus, -1).sum(axis=2)
    return float((gpu.mean(axis=1) / gpu.max(axis=1)).mean())


@pytest.mark.parametrize("policy", [None, "deepseek"])
def test_rebalance_equals_the_library_with_the_same_seed(client, policy):
    loads = zipf_loads(1)
    placement = client.rebalance(loads, **TOPOLOGY, seed=5, policy=policy)
    kwargs = {"seed": 5} if policy is None else {"seed": 5, "policy": policy}
    phy2log, log2phy, logcnt = rebalance_experts(torch.from_numpy(loads), *SHAPE[2:], **kwargs)
    assert np.array_equal(placement.phy2log, phy2log.numpy())
    assert np.array_equal(placement.logcnt, logcnt.numpy())
    assert_valid_maps(placement.phy2log, placement.log2phy, placement.logcnt, SHAPE[1])
    assert placement.version == 0 and not placement.committed and placement.stats.device


def test_two_ranks_add_up_then_rebalance_and_get_placement(client):
    rank0, rank1 = zipf_loads(2), zipf_loads(3)
    summaries = [
        client.report_loads("e2e-ranks", [rank0], topology=TOPOLOGY, rank=0),
        client.report_loads("e2e-ranks", [rank1], topology=TOPOLOGY, rank=1),
    ]
    assert [(s.accepted, s.rejected) for s in summaries] == [(1, 0), (1, 0)]
    placement = client.rebalance(deployment_id="e2e-ranks", seed=1)
    assert placement.committed and placement.version == 1 and placement.deployment_id == "e2e-ranks"
    assert_valid_maps(placement.phy2log, placement.log2phy, placement.logcnt, SHAPE[1])
    # The stats are measured on the window: it must be the sum of both ranks, not either one.
    on_sum = balancedness(rank0 + rank1, placement.phy2log, placement.logcnt, SHAPE[5])
    on_rank0 = balancedness(rank0, placement.phy2log, placement.logcnt, SHAPE[5])
    assert placement.stats.balancedness_after == pytest.approx(on_sum, abs=1e-3)
    assert abs(on_sum - on_rank0) > 1e-3
    current = client.get_placement("e2e-ranks")
    assert current.version == 1 and np.array_equal(current.phy2log, placement.phy2log)
    [info] = [d for d in client.list_deployments() if d.deployment_id == "e2e-ranks"]
    assert info.version == 1 and info.topology.num_gpus == SHAPE[5] and info.reports == 2
    # The listing scores the placement in force on the same window as the placement's own stats.
    assert info.imbalance > 1.0 and info.imbalance == pytest.approx(placement.stats.imbalance_after)
    assert client.delete_deployment("e2e-ranks")


def test_watch_receives_the_new_version(client):
    client.report_loads("e2e-watch", [zipf_loads(4)], topology=TOPOLOGY)
    client.rebalance(deployment_id="e2e-watch")
    versions, first = [], threading.Event()

    def follow():
        for placement in client.watch("e2e-watch", after_version=0, timeout=30):
            versions.append(placement.version)
            first.set()
            if placement.version >= 2:
                break

    reader = threading.Thread(target=follow)
    reader.start()
    assert first.wait(30)
    client.report_loads("e2e-watch", [zipf_loads(5)])
    assert client.rebalance(deployment_id="e2e-watch", base_version=1).version == 2
    reader.join(30)
    assert versions == [1, 2]


def test_server_errors_keep_their_codes(client):
    request = rebalance_request(zipf_loads(6), **TOPOLOGY)
    request.loads.CopyFrom(encode(np.full((SHAPE[0], SHAPE[1]), np.nan, dtype=np.float32)))
    with pytest.raises(grpc.RpcError) as invalid:
        client.send_rebalance(request)
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert any("loads" in field for field, _ in field_violations(invalid.value))
    with pytest.raises(grpc.RpcError) as missing:
        client.get_placement("e2e-nobody")
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    client.report_loads("e2e-stale", [zipf_loads(7)], topology=TOPOLOGY)
    client.rebalance(deployment_id="e2e-stale")
    with pytest.raises(grpc.RpcError) as stale:
        client.rebalance(deployment_id="e2e-stale", base_version=7)
    assert stale.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_reporter_and_async_client_against_the_server(server):
    with LoadReporter(server, "e2e-reporter", topology=TOPOLOGY, rank=0) as reporter:
        for seed in range(3):
            reporter.report(zipf_loads(seed))
        assert reporter.flush(20)
        assert reporter.stats()["accepted"] == 3

    async def scenario():
        async with AsyncRebalancerClient(server, timeout=30) as client:
            assert await client.health("rebalancer.v1.RebalancerService") == "SERVING"
            placement = await client.rebalance(deployment_id="e2e-reporter")
            current = await client.get_placement("e2e-reporter")
            return placement, current

    placement, current = asyncio.run(scenario())
    assert placement.committed and current.version == placement.version == 1


def test_cli_round_trip_writes_valid_engine_json(server, tmp_path):
    loads = zipf_loads(8)
    np.save(tmp_path / "loads.npy", loads)
    out = tmp_path / "placement.json"
    replicas, groups, nodes, gpus = (str(v) for v in SHAPE[2:])
    code = cli_main(
        [
            "rebalance",
            str(tmp_path / "loads.npy"),
            "--replicas",
            replicas,
            "--groups",
            groups,
            "--nodes",
            nodes,
        ]
        + ["--gpus", gpus, "--target", server, "--out", str(out), "--format", "vllm"]
    )
    assert code == 0
    document = json.loads(out.read_text())
    assert list(document) == ["physical_to_logical_map"]  # the one map vLLM installs; it derives the rest
    phy2log = np.array(document["physical_to_logical_map"])
    assert phy2log.shape == (SHAPE[0], SHAPE[2])
    assert all(set(row) == set(range(SHAPE[1])) for row in phy2log.tolist())
    env = {**os.environ, "REBALANCER_TARGET": server}
    health = subprocess.run(
        [str(SERVER_BIN.with_name("rebalancer")), "health"], env=env, capture_output=True, timeout=30
    )
    assert health.returncode == 0 and health.stdout.decode().strip() == "SERVING"
