"""`rebalancer.v1.RebalancerService`: one thin method per RPC.

Handlers validate (validation.py), call the domain (deployments.py, batcher.py, telemetry.py) and convert
records to messages; every ServiceError becomes its gRPC status through `errors.abort`.

A refused request or report changes no window and no placement. The one thing it may leave behind is
the registration of a new deployment whose topology was valid (empty window, no placement): a stream
whose first report, the one carrying the topology, has bad loads must still have its later reports taken.
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator

import grpc
import numpy as np
from rebalancer_wire.v1 import rebalancer_pb2 as pb
from rebalancer_wire.v1 import rebalancer_pb2_grpc

from .batcher import Batcher, SolveJob
from .deployments import Deployment, Registry, placement_stats
from .errors import InvalidArgument, NotFound, ServiceError, abort
from .metrics import Metrics
from .model import PlacementRecord
from .rearrangement import layout_after
from .telemetry import TelemetryWindows
from .validation import (
    SolveSettings,
    check_cost_model,
    check_loads,
    check_options,
    check_phy2log,
    check_topology,
    check_unavailable_gpus,
    decode_tensor,
    deployment_id_violations,
    load_violations,
)

MAX_LISTED_REJECTIONS = 64


def _maps_errors(handler):
    """Turn ServiceError raised by a handler into its status (unary and client-streaming handlers)."""

    @functools.wraps(handler)
    async def wrapper(self, request, context):
        try:
            return await handler(self, request, context)
        except ServiceError as error:
            await abort(context, error)

    return wrapper


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class RebalancerServicer(rebalancer_pb2_grpc.RebalancerServiceServicer):
    def __init__(
        self,
        registry: Registry,
        batcher: Batcher,
        windows: TelemetryWindows,
        metrics: Metrics,
        *,
        max_tensor_elements: int,
    ) -> None:
        self.registry = registry
        self.batcher = batcher
        self.windows = windows
        self.metrics = metrics
        self.max_elements = max_tensor_elements

    @_maps_errors
    async def Rebalance(self, request: pb.RebalanceRequest, context: grpc.aio.ServicerContext) -> pb.RebalanceResponse:
        settings = check_options(request.options)
        cost_model = check_cost_model(request.cost_model)
        loads = check_loads(request.loads, self.max_elements) if request.HasField("loads") else None
        if not request.deployment_id:
            return await self._rebalance_inline(request, loads, settings, cost_model, context)
        violations = deployment_id_violations(request.deployment_id)
        if violations:
            raise InvalidArgument(violations)
        if request.HasField("topology"):
            shape = loads.shape if loads is not None else None
            topology = check_topology(request.topology, self.max_elements, shape=shape)
            deployment = await self.registry.register(request.deployment_id, topology)
        else:
            deployment = self.registry.get(request.deployment_id)
        expected = (deployment.topology.num_layers, deployment.topology.num_experts)
        if loads is not None and loads.shape != expected:
            raise InvalidArgument(
                [("loads.shape", f"must be {list(expected)} for this deployment, got {list(loads.shape)}")]
            )
        unavailable = check_unavailable_gpus(request.unavailable_gpus, deployment.topology)
        if (unavailable or settings.new_num_gpus is not None) and not settings.dry_run:
            field = "unavailable_gpus" if unavailable else "options.new_num_gpus"
            reason = "changes the deployment's GPU set: plan it with options.dry_run, then register its new layout"
            raise InvalidArgument([(field, reason)])
        # An engine that says which placement it runs (it may have fallen back to a local plan) plans from that.
        in_force = None
        if request.HasField("prev_phy2log"):
            in_force = check_phy2log(request.prev_phy2log, deployment.topology, self.max_elements)
        outcome = await self.registry.plan(
            deployment,
            settings,
            loads=loads,
            base_version=request.base_version,
            deadline=_deadline(context),
            cost_model=cost_model,
            unavailable_gpus=unavailable,
            in_force=in_force,
        )
        if settings.dry_run:
            record = PlacementRecord(
                deployment_id=deployment.deployment_id,
                version=0,
                topology=layout_after(deployment.topology, outcome.gpu_ids),
                phy2log=outcome.phy2log,
                logcnt=outcome.logcnt,
                log2phy=outcome.log2phy,
                stats=placement_stats(outcome),
                transfers=outcome.transfers,
                gpu_ids=outcome.gpu_ids,
            )
            response = pb.RebalanceResponse(committed=False)
            record.fill(response.placement)
            return response
        record = await self.registry.commit(deployment, outcome, trigger="request", base_version=request.base_version)
        response = pb.RebalanceResponse(committed=True)
        record.fill(response.placement)
        return response

    async def _rebalance_inline(
        self,
        request: pb.RebalanceRequest,
        loads: np.ndarray | None,
        settings: SolveSettings,
        cost_model,
        context: grpc.aio.ServicerContext,
    ) -> pb.RebalanceResponse:
        violations = []
        if loads is None:
            violations.append(("loads", "required without deployment_id"))
        if not request.HasField("topology"):
            violations.append(("topology", "required without deployment_id"))
        if request.base_version:
            violations.append(("base_version", "only meaningful with deployment_id"))
        if violations:
            raise InvalidArgument(violations)
        topology = check_topology(request.topology, self.max_elements, shape=loads.shape)
        prev = None
        if request.HasField("prev_phy2log"):
            prev = check_phy2log(request.prev_phy2log, topology, self.max_elements)
        unavailable = check_unavailable_gpus(request.unavailable_gpus, topology)
        job = SolveJob(
            topology=topology,
            settings=settings,
            loads=loads,
            prev_phy2log=prev,
            deadline=_deadline(context),
            unavailable_gpus=unavailable,
            cost_model=cost_model,
        )
        outcome = await self.batcher.submit(job)
        record = PlacementRecord(
            deployment_id="",
            version=0,
            topology=layout_after(topology, outcome.gpu_ids),
            phy2log=outcome.phy2log,
            logcnt=outcome.logcnt,
            log2phy=outcome.log2phy,
            stats=placement_stats(outcome),
            transfers=outcome.transfers,
            gpu_ids=outcome.gpu_ids,
        )
        response = pb.RebalanceResponse(committed=False)
        record.fill(response.placement)
        return response

    @_maps_errors
    async def StreamLoad(
        self, request_iterator: AsyncIterator[pb.StreamLoadRequest], context: grpc.aio.ServicerContext
    ) -> pb.StreamLoadResponse:
        response = pb.StreamLoadResponse()
        index = 0
        async for report in request_iterator:
            label = ""
            try:
                label = await self._ingest(report)
            except InvalidArgument as error:
                response.rejected += 1
                if len(response.rejections) < MAX_LISTED_REJECTIONS:
                    field, reason = error.violations[0]
                    response.rejections.add(index=index, field=field, reason=reason)
                known = report.deployment_id in self.registry.deployments
                self.metrics.telemetry_reports.labels(report.deployment_id if known else "", "rejected").inc()
            else:
                response.accepted += 1
                self.metrics.telemetry_reports.labels(label, "accepted").inc()
            index += 1
        return response

    async def _ingest(self, report: pb.StreamLoadRequest) -> str:
        """Validate one report and add it to its deployment's window; raises InvalidArgument to reject it."""
        violations = deployment_id_violations(report.deployment_id)
        if violations:
            raise InvalidArgument(violations)
        deployment = self.registry.deployments.get(report.deployment_id)
        if report.HasField("topology"):
            topology = check_topology(report.topology, self.max_elements)
            if deployment is None:
                deployment = await self.registry.register(report.deployment_id, topology)
            elif deployment.topology != topology:
                raise InvalidArgument([("topology", f"does not match the deployment's {deployment.topology}")])
        elif deployment is None:
            raise InvalidArgument(
                [("topology", f"unknown deployment {report.deployment_id!r}: send its topology first")]
            )
        topology = deployment.topology
        loads = decode_tensor(report.loads, "loads", self.max_elements)
        indices = None
        rows = topology.num_layers
        if report.layer_indices:
            indices = np.array(report.layer_indices, dtype=np.int64)
            if (indices >= topology.num_layers).any():
                raise InvalidArgument([("layer_indices", f"indices must be < num_layers ({topology.num_layers})")])
            if np.unique(indices).size != indices.size:
                raise InvalidArgument([("layer_indices", "duplicate layer index")])
            rows = indices.size
        if loads.shape != (rows, topology.num_experts):
            raise InvalidArgument([("loads.shape", f"must be {[rows, topology.num_experts]}, got {list(loads.shape)}")])
        violations = load_violations(loads, "loads")
        if violations:
            raise InvalidArgument(violations)
        try:
            # A writable float32 copy: torch will not wrap the read-only view of the message bytes.
            await self.windows.add(report.deployment_id, np.array(loads, dtype=np.float32), indices, report.step)
        except KeyError:
            raise InvalidArgument([("deployment_id", "deployment was deleted")]) from None
        return report.deployment_id

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
        async for record in self.registry.watch(deployment, request.after_version):
            response = pb.WatchPlacementResponse()
            record.fill(response.placement)
            yield response

    @_maps_errors
    async def ListDeployments(
        self, request: pb.ListDeploymentsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListDeploymentsResponse:
        response = pb.ListDeploymentsResponse()
        for deployment_id, deployment in sorted(self.registry.deployments.items()):
            quality = await self.registry.quality(deployment)
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
        violations = deployment_id_violations(request.deployment_id)
        if violations:
            raise InvalidArgument(violations)
        return pb.DeleteDeploymentResponse(deleted=await self.registry.delete(request.deployment_id))

    def _known(self, deployment_id: str) -> Deployment:
        violations = deployment_id_violations(deployment_id)
        if violations:
            raise InvalidArgument(violations)
        return self.registry.get(deployment_id)
