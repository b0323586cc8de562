"""The asyncio client mirrors the sync one: same methods, same results, same error mapping."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from client_helpers import assert_valid_maps, fake_service
from rebalancer_client import AsyncRebalancerClient, field_violations
from rebalancer_client.messages import rebalance_request

TOPOLOGY = {"num_replicas": 6, "num_gpus": 3}


@pytest.fixture(scope="module")
def fake():
    with fake_service() as server:
        yield server


def run(coroutine_function, target):
    async def main():
        async with AsyncRebalancerClient(target, timeout=5.0, token="t") as client:
            return await coroutine_function(client)

    return asyncio.run(main())


def test_async_health_and_inline_rebalance(fake):
    async def scenario(client):
        assert await client.health() == "SERVING"
        assert await client.health("nope") == "SERVICE_UNKNOWN"
        return await client.rebalance(np.ones((2, 4)), num_replicas=6, num_gpus=3, seed=1)

    placement = run(scenario, fake.target)
    assert_valid_maps(placement.phy2log, placement.log2phy, placement.logcnt, 4)
    assert fake.servicer.metadata[-1]["authorization"] == "Bearer t"


def test_async_report_from_sync_and_async_iterables_then_rebalance_get_watch(fake):
    async def reports():
        for _ in range(3):
            yield np.ones((2, 4))

    async def scenario(client):
        first = await client.report_loads("aio", [np.ones((2, 4))], topology=TOPOLOGY)
        second = await client.report_loads("aio", reports(), rank=1)
        placement = await client.rebalance(deployment_id="aio")
        current = await client.get_placement("aio")
        watched = []
        async for update in client.watch("aio", after_version=0, timeout=5):
            watched.append(update.version)
            break
        listed = [d.deployment_id for d in await client.list_deployments()]
        deleted = await client.delete_deployment("aio")
        return first, second, placement, current, watched, listed, deleted

    first, second, placement, current, watched, listed, deleted = run(scenario, fake.target)
    assert (first.accepted, second.accepted) == (1, 3)
    assert placement.committed and current.version == placement.version == 1
    assert watched == [1] and "aio" in listed and deleted


def test_async_errors_are_rpc_errors_with_codes_and_violations(fake):
    async def scenario(client):
        errors = []
        for call in (
            lambda: client.get_placement("ghost"),
            lambda: client._stub.Rebalance(_without_topology()),
        ):
            try:
                await call()
            except grpc.RpcError as exc:
                errors.append(exc)
        with pytest.raises(ValueError, match="finite"):
            await client.rebalance(np.full((1, 4), np.inf), num_replicas=4, num_gpus=1)

        async def bad_reports():
            yield np.full((1, 4), np.nan)

        with pytest.raises(ValueError, match=r"reports\[0\] must be finite"):
            await client.report_loads("aio-bad", bad_reports(), topology=TOPOLOGY)
        return errors

    not_found, invalid = run(scenario, fake.target)
    assert not_found.code() == grpc.StatusCode.NOT_FOUND
    assert invalid.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(invalid) == [("topology", "required with inline loads")]


def _without_topology():
    request = rebalance_request(np.ones((2, 4)), num_replicas=4, num_gpus=2)
    request.ClearField("topology")
    return request
