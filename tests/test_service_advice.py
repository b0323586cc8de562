"""AdviseSlots: the balancedness each slots-per-GPU count reaches, through the service, the client and
the CLI, equal to the library's fresh plan at that count; bad counts are refused naming the field."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
import torch
from rebalancer.solver import advise_slots, solve
from rebalancer_client import AsyncRebalancerClient, RebalancerClient, field_violations
from rebalancer_client.cli import main
from service_harness import real_service, skewed_loads

LAYERS, EXPERTS, GROUPS, NODES, GPUS = 3, 16, 4, 2, 8


@pytest.fixture(scope="module")
def server():
    with real_service() as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with RebalancerClient(server.target, timeout=60) as connected:
        yield connected


def library_balancedness(loads: np.ndarray, slots_per_gpu: int) -> float:
    weight = torch.from_numpy(loads.astype(np.float64))
    return float(solve(weight, slots_per_gpu * GPUS, GROUPS, NODES, GPUS, seed=3).balancedness.mean())


def test_inline_advice_is_the_library_plan_at_each_count(client):
    loads = skewed_loads(5, LAYERS, EXPERTS)
    counts = client.advise_slots(loads, num_gpus=GPUS, num_groups=GROUPS, num_nodes=NODES, seed=3)
    assert [c.slots_per_gpu for c in counts] == [2, 3, 4, 5, 6]  # smallest feasible (16 / 8) and 4 more
    assert [c.num_replicas for c in counts] == [16, 24, 32, 40, 48]
    for count in counts:
        assert count.balancedness == pytest.approx(library_balancedness(loads, count.slots_per_gpu), abs=1e-9)
        assert count.worst_layer_balancedness <= count.balancedness
    library = advise_slots(torch.from_numpy(loads.astype(np.float64)), GROUPS, NODES, GPUS, seed=3)
    assert [c.balancedness for c in counts] == pytest.approx(library.balancedness.tolist(), abs=1e-9)
    assert counts[-1].balancedness > counts[0].balancedness  # more slots balance the skew better


def test_async_client_gets_the_same_advice(server, client):
    loads = skewed_loads(6, LAYERS, EXPERTS)

    async def ask():
        async with AsyncRebalancerClient(server.target, timeout=60) as connected:
            return await connected.advise_slots(loads, num_gpus=GPUS, slots_per_gpu=[2, 3], seed=1)

    assert asyncio.run(ask()) == client.advise_slots(loads, num_gpus=GPUS, slots_per_gpu=[2, 3], seed=1)


def test_deployment_advice_uses_its_window(client):
    topology = {"num_replicas": 24, "num_groups": GROUPS, "num_nodes": NODES, "num_gpus": GPUS}
    window = [skewed_loads(seed, LAYERS, EXPERTS) for seed in range(3)]
    assert client.report_loads("advised", window, topology=topology).accepted == 3
    counts = client.advise_slots(deployment_id="advised", slots_per_gpu=[4, 2], seed=3)
    assert [c.slots_per_gpu for c in counts] == [2, 4]
    summed = np.sum(window, axis=0)
    assert counts[1].balancedness == pytest.approx(library_balancedness(summed, 4), abs=1e-6)
    versions = [info.version for info in client.list_deployments() if info.deployment_id == "advised"]
    assert versions == [0]  # advice commits nothing


@pytest.mark.parametrize(
    ("request_args", "field"),
    [
        ({"slots_per_gpu": [1]}, "slots_per_gpu"),  # 8 slots cannot host 16 experts
        ({"slots_per_gpu": list(range(2, 20))}, "slots_per_gpu"),  # more counts than one call may plan
    ],
)
def test_bad_advice_is_invalid_argument_naming_the_field(client, request_args, field):
    with pytest.raises(grpc.RpcError) as error:
        client.advise_slots(skewed_loads(1, LAYERS, EXPERTS), num_gpus=GPUS, **request_args)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in {name for name, _ in field_violations(error.value)}


def test_bad_options_are_refused_before_sending(client):
    with pytest.raises(ValueError, match="num_candidates"):
        client.advise_slots(skewed_loads(1, LAYERS, EXPERTS), num_gpus=GPUS, num_candidates=5000)


def test_unknown_deployment_is_not_found(client):
    with pytest.raises(grpc.RpcError) as error:
        client.advise_slots(deployment_id="never-registered")
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_cli_prints_one_row_per_count(server, tmp_path, capsys):
    np.save(tmp_path / "loads.npy", skewed_loads(2, LAYERS, EXPERTS))
    code = main(["advise", str(tmp_path / "loads.npy"), "--gpus", "8", "--slots", "2", "3", "--target", server.target])
    assert code == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[0].startswith("slots/GPU") and [row.split("\t")[:2] for row in rows[1:]] == [["2", "16"], ["3", "24"]]
