"""asyncio client of `rebalancer.v1.RebalancerService`, mirroring `RebalancerClient` method for method.

For controllers that already run an event loop: `async with AsyncRebalancerClient(target) as client`,
`await client.rebalance(...)`, `async for placement in client.watch(...)`. Errors are `grpc.aio.AioRpcError`
(a `grpc.RpcError`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import Any

import grpc
from rebalancer_wire.v1 import rebalancer_pb2 as pb

from .client import HEALTH_NAMES, Connection, unknown_service
from .messages import AsyncLoadRequests, LoadRequests, TopologyLike, advise_request, rebalance_request
from .placement import DeploymentInfo, LoadSummary, Placement, SlotAdvice


class AsyncRebalancerClient(Connection):
    """One grpc.aio channel to one service replica; an async context manager. Create it inside the
    running event loop. `timeout` is the default deadline (s) of unary calls; streams have none.
    """

    channels = grpc.aio

    async def __aenter__(self) -> AsyncRebalancerClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """Standard gRPC health: "SERVING", "NOT_SERVING", "UNKNOWN" or "SERVICE_UNKNOWN"."""
        try:
            response = await self._health.Check(**self._health_call(service, timeout))
        except grpc.RpcError as exc:
            return unknown_service(exc)
        return HEALTH_NAMES.get(response.status, "UNKNOWN")

    async def rebalance(self, loads: Any = None, *, timeout: float | None = None, **request: Any) -> Placement:
        """See `RebalancerClient.rebalance`."""
        return await self.send_rebalance(rebalance_request(loads, **request), timeout=timeout)

    async def advise_slots(
        self, loads: Any = None, *, timeout: float | None = None, **request: Any
    ) -> list[SlotAdvice]:
        """See `RebalancerClient.advise_slots`."""
        response = await self._stub.AdviseSlots(
            advise_request(loads, **request), timeout=self._deadline(timeout), metadata=self._metadata
        )
        return [SlotAdvice.from_proto(count) for count in response.counts]

    async def send_rebalance(self, request: pb.RebalanceRequest, *, timeout: float | None = None) -> Placement:
        """Send a prepared RebalanceRequest."""
        response = await self._stub.Rebalance(request, timeout=self._deadline(timeout), metadata=self._metadata)
        return Placement.from_proto(response.placement, committed=response.committed)

    async def report_loads(
        self,
        deployment_id: str,
        reports: Iterable[Any] | AsyncIterable[Any],
        *,
        topology: TopologyLike | None = None,
        rank: int = 0,
        timeout: float | None = None,
    ) -> LoadSummary:
        """See `RebalancerClient.report_loads`; `reports` may also be an async iterable."""
        stream = AsyncLoadRequests if isinstance(reports, AsyncIterable) else LoadRequests
        requests = stream(deployment_id, reports, topology=topology, rank=rank)
        try:
            response = await self._stub.StreamLoad(requests, timeout=timeout, metadata=self._metadata)
        except (grpc.RpcError, asyncio.CancelledError):  # grpc.aio cancels the call when the iterator fails
            if requests.error is not None:
                raise requests.error from None
            raise
        return LoadSummary.from_proto(response)

    async def get_placement(self, deployment_id: str, *, timeout: float | None = None) -> Placement:
        """The placement in force for a deployment (NOT_FOUND when it has none)."""
        response = await self._stub.GetPlacement(
            pb.GetPlacementRequest(deployment_id=deployment_id),
            timeout=self._deadline(timeout),
            metadata=self._metadata,
        )
        return Placement.from_proto(response.placement, committed=True)

    async def watch(
        self, deployment_id: str, after_version: int = 0, *, timeout: float | None = None
    ) -> AsyncIterator[Placement]:
        """Placements newer than `after_version` as they are committed; leaving the loop cancels it."""
        call = self._stub.WatchPlacement(
            pb.WatchPlacementRequest(deployment_id=deployment_id, after_version=after_version),
            timeout=timeout,
            metadata=self._metadata,
        )
        try:
            async for response in call:
                yield Placement.from_proto(response.placement, committed=True)
        finally:
            call.cancel()

    async def list_deployments(self, *, timeout: float | None = None) -> list[DeploymentInfo]:
        response = await self._stub.ListDeployments(
            pb.ListDeploymentsRequest(), timeout=self._deadline(timeout), metadata=self._metadata
        )
        return [DeploymentInfo.from_proto(info) for info in response.deployments]

    async def delete_deployment(self, deployment_id: str, *, timeout: float | None = None) -> bool:
        """Forget a deployment; False when it did not exist."""
        response = await self._stub.DeleteDeployment(
            pb.DeleteDeploymentRequest(deployment_id=deployment_id),
            timeout=self._deadline(timeout),
            metadata=self._metadata,
        )
        return response.deleted
