"""The asyncio client mirrors the sync one: same methods, same results, same error mapping."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from client_helpers import assert_valid_maps, library_phy2log
from rebalancer_client import AsyncRebalancerClient, field_violations
from rebalancer_client.messages import rebalance_request
from service_harness import real_service

TOPOLOGY = {"num_replicas": 6, "num_gpus": 3}


@pytest.fixture(scope="module")
def server():
    with real_service(token="t") as running:
        yield running


def run(coroutine_function, target, token="t"):
    async def main():
        async with AsyncRebalancerClient(target, timeout=5.0, token=token) as client:
            return await coroutine_function(client)

    return asyncio.run(main())


def test_async_health_and_inline_rebalance(server):
    loads = np.array([[4, 1, 1, 2], [1, 1, 6, 1]], dtype=np.float32)

    async def scenario(client):
        assert await client.health() == "SERVING"
        assert await client.health("nope") == "SERVICE_UNKNOWN"
        return await client.rebalance(loads, num_replicas=6, num_gpus=3, seed=1)

    placement = run(scenario, server.target)  # the server requires the token: an answer means it was sent
    assert_valid_maps(placement.phy2log, placement.log2phy, placement.logcnt, 4)
    assert np.array_equal(placement.phy2log, library_phy2log(loads, 6, 3, seed=1))


def test_async_calls_without_the_token_are_unauthenticated(server):
    async def scenario(client):
        assert await client.health() == "SERVING"  # health needs no token
        with pytest.raises(grpc.RpcError) as info:
            await client.list_deployments()
        return info.value

    assert run(scenario, server.target, token=None).code() == grpc.StatusCode.UNAUTHENTICATED
    assert run(scenario, server.target, token="not-t").code() == grpc.StatusCode.UNAUTHENTICATED


def test_async_report_from_sync_and_async_iterables_then_rebalance_get_watch(server):
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

    first, second, placement, current, watched, listed, deleted = run(scenario, server.target)
    assert (first.accepted, second.accepted) == (1, 3)
    assert placement.committed and current.version == placement.version == 1
    assert watched == [1] and "aio" in listed and deleted


def test_async_errors_are_rpc_errors_with_codes_and_violations(server):
    async def scenario(client):
        errors = []
        for call in (
            lambda: client.get_placement("ghost"),
            # No send_rebalance on the async client: the raw stub, with the client's token metadata.
            lambda: client._stub.Rebalance(_without_topology(), metadata=client._metadata),
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

    not_found, invalid = run(scenario, server.target)
    assert not_found.code() == grpc.StatusCode.NOT_FOUND
    assert invalid.code() == grpc.StatusCode.INVALID_ARGUMENT
    [(field, description)] = field_violations(invalid)
    assert field == "topology" and description in invalid.details()


def _without_topology():
    request = rebalance_request(np.ones((2, 4)), num_replicas=4, num_gpus=2)
    request.ClearField("topology")
    return request
