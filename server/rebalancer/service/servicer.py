"""`rebalancer.v1.RebalancerService`: one thin method per RPC.

Each handler checks its request once into a command (commands.py), hands it to the domain
(deployments.py) and converts the record it gets back (Rebalance lets the domain write the placement
into its response, so the maps are encoded once for the size check and the answer); every ServiceError
becomes its gRPC status through `errors.abort`, and any other exception becomes a bare INTERNAL
(logged, its text never sent).

A refused request or report changes no window and no placement, and registers nothing: a deployment is
created only by a report or request that is accepted.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator

import grpc
from rebalancer_wire.v1 import rebalancer_pb2 as pb
from rebalancer_wire.v1 import rebalancer_pb2_grpc

from .commands import RequestChecker
from .deployments import Deployment, Registry
from .errors import Internal, InvalidArgument, NotFound, ServiceError, abort
from .interceptors import Undecodable
from .metrics import Metrics
from .telemetry import TelemetryWindows

MAX_LISTED_REJECTIONS = 64
log = logging.getLogger(__name__)


def _maps_errors(handler):
    """Turn what a unary or client-streaming handler raises into its status: ServiceError as itself,
    anything else as INTERNAL without its text."""

    @functools.wraps(handler)
    async def wrapper(self, request, context):
        try:
            return await handler(self, request, context)
        except ServiceError as error:
            await abort(context, error)
        except Exception:
            log.exception("%s failed", handler.__name__)
            await abort(context, Internal())

    return wrapper


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class RebalancerServicer(rebalancer_pb2_grpc.RebalancerServiceServicer):
    def __init__(
        self, registry: Registry, windows: TelemetryWindows, metrics: Metrics, checker: RequestChecker
    ) -> None:
        self.registry = registry
        self.windows = windows
        self.metrics = metrics
        self.checker = checker

    @_maps_errors
    async def Rebalance(self, request: pb.RebalanceRequest, context: grpc.aio.ServicerContext) -> pb.RebalanceResponse:
        command = self.checker.rebalance(request, self.registry.topology_of(request.deployment_id))
        response = pb.RebalanceResponse()
        response.committed = await self.registry.rebalance(command, response.placement, _deadline(context))
        if request.phy2log_only:
            response.placement.ClearField("logcnt")
            response.placement.ClearField("log2phy")
        return response

    @_maps_errors
    async def AdviseSlots(
        self, request: pb.AdviseSlotsRequest, context: grpc.aio.ServicerContext
    ) -> pb.AdviseSlotsResponse:
        command = self.checker.advise(request, self.registry.topology_of(request.deployment_id))
        response = pb.AdviseSlotsResponse()
        for count, outcome in await self.registry.advise(command, _deadline(context)):
            response.counts.add(
                slots_per_gpu=count,
                num_replicas=count * command.topology.num_gpus,
                balancedness=float(outcome.balancedness.mean()),
                worst_layer_balancedness=float(outcome.balancedness.min()),
            )
        return response

    @_maps_errors
    async def StreamLoad(
        self, request_iterator: AsyncIterator[pb.StreamLoadRequest], context: grpc.aio.ServicerContext
    ) -> pb.StreamLoadResponse:
        response = pb.StreamLoadResponse()
        index = 0
        async for report in request_iterator:
            try:
                await self._ingest(report)
            except ServiceError as error:
                self._reject(response, index, report, error)
            except Exception:  # a fault of the server: logged, and refused in-band without its text
                log.exception("report %d of a StreamLoad failed", index)
                self._reject(response, index, report, Internal())
            else:
                response.accepted += 1
                self.metrics.telemetry_reports.labels(report.deployment_id, "accepted").inc()
            index += 1
        return response

    async def _ingest(self, report: pb.StreamLoadRequest | Undecodable) -> None:
        if isinstance(report, Undecodable):
            raise InvalidArgument([("", f"undecodable StreamLoadRequest: {report.reason}")])
        command = self.checker.report(report, self.registry.topology_of(report.deployment_id))
        await self.registry.ingest(command)

    def _reject(self, response: pb.StreamLoadResponse, index: int, report, error: ServiceError) -> None:
        """Count and list one refused report; a refusal that is not about a field (the budget, the
        store) is listed against the deployment id."""
        response.rejected += 1
        if len(response.rejections) < MAX_LISTED_REJECTIONS:
            field, reason = error.violations[0] if isinstance(error, InvalidArgument) else ("deployment_id", str(error))
            response.rejections.add(index=index, field=field, reason=reason)
        deployment_id = getattr(report, "deployment_id", "")
        known = deployment_id in self.registry.deployments
        self.metrics.telemetry_reports.labels(deployment_id if known else "", "rejected").inc()

    @_maps_errors
    async def GetPlacement(
        self, request: pb.GetPlacementRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetPlacementResponse:
        deployment = self._known(request.deployment_id)
        if deployment.current is None:
            raise NotFound(f"deployment {request.deployment_id!r} has no placement yet")
        response = pb.GetPlacementResponse()
        deployment.current.fill(response.placement)
        return response

    async def WatchPlacement(
        self, request: pb.WatchPlacementRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchPlacementResponse]:
        try:
            deployment = self._known(request.deployment_id)
        except ServiceError as error:
            await abort(context, error)
        try:
            async for record in self.registry.watch(deployment, request.after_version):
                response = pb.WatchPlacementResponse()
                record.fill(response.placement)
                yield response
        except Exception:
            log.exception("WatchPlacement failed")
            await abort(context, Internal())

    @_maps_errors
    async def ListDeployments(
        self, request: pb.ListDeploymentsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListDeploymentsResponse:
        response = pb.ListDeploymentsResponse()
        for deployment_id, deployment in sorted(self.registry.deployments.items()):
            quality = await self.registry.quality(deployment)
            if deployment.deleted:  # deleted while this listing waited for the window
                continue
            response.deployments.add(
                deployment_id=deployment_id,
                topology=deployment.topology.to_proto(),
                version=deployment.version,
                reports=self.windows.reports(deployment_id),
                imbalance=quality.imbalance if quality is not None else 0.0,
            )
        return response

    @_maps_errors
    async def DeleteDeployment(
        self, request: pb.DeleteDeploymentRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteDeploymentResponse:
        deployment_id = self.checker.deployment_id(request.deployment_id)
        return pb.DeleteDeploymentResponse(deleted=await self.registry.delete(deployment_id))

    def _known(self, deployment_id: str) -> Deployment:
        return self.registry.get(self.checker.deployment_id(deployment_id))
