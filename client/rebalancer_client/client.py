"""Synchronous client of `rebalancer.v1.RebalancerService`: numpy (or torch, never imported) in, numpy out.

gRPC failures surface unchanged as `grpc.RpcError` (code and details kept); `field_violations(error)`
reads the `google.rpc.BadRequest` of an INVALID_ARGUMENT.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rebalancer_wire.v1 import rebalancer_pb2 as pb
from rebalancer_wire.v1 import rebalancer_pb2_grpc

from .messages import LoadRequests, TopologyLike, advise_request, rebalance_request
from .placement import DeploymentInfo, LoadSummary, Placement, SlotAdvice

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Large maps (58 x 288 x int64 and more) and long-lived telemetry streams behind load balancers.
DEFAULT_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 0),
)
HEALTH_NAMES = {
    health_pb2.HealthCheckResponse.SERVING: "SERVING",
    health_pb2.HealthCheckResponse.NOT_SERVING: "NOT_SERVING",
    health_pb2.HealthCheckResponse.UNKNOWN: "UNKNOWN",
    health_pb2.HealthCheckResponse.SERVICE_UNKNOWN: "SERVICE_UNKNOWN",
}


def channel_options(options: Sequence[tuple[str, Any]] | None) -> list[tuple[str, Any]]:
    """DEFAULT_OPTIONS overridden key by key by `options`."""
    merged = dict(DEFAULT_OPTIONS)
    merged.update(options or ())
    return list(merged.items())


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """Bearer token as call metadata: works on plaintext channels too (call credentials do not)."""
    return (("authorization", f"Bearer {token}"),) if token else None


def unknown_service(error: grpc.RpcError) -> str:
    """A health check's error as its answer: NOT_FOUND means the server does not know the service name."""
    if error.code() == grpc.StatusCode.NOT_FOUND:
        return "SERVICE_UNKNOWN"
    raise error


class Connection:
    """A channel to one service replica with its stubs, token and default deadline; `channels` is the grpc
    module that opens it (`grpc` for the sync client, `grpc.aio` for the asyncio one)."""

    channels: Any = grpc

    def __init__(
        self,
        target: str,
        timeout: float = 10.0,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        options: Sequence[tuple[str, Any]] | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        merged = channel_options(options)
        if credentials is None:
            self._channel = self.channels.insecure_channel(target, options=merged)
        else:
            self._channel = self.channels.secure_channel(target, credentials, options=merged)
        self._metadata = call_metadata(token)
        self._stub = rebalancer_pb2_grpc.RebalancerServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _deadline(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    def _health_call(self, service: str, timeout: float | None) -> dict[str, Any]:
        request = health_pb2.HealthCheckRequest(service=service)
        return {"request": request, "timeout": self._deadline(timeout), "metadata": self._metadata}


class RebalancerClient(Connection):
    """One channel to one service replica; a context manager. `timeout` is the default deadline (s) of
    unary calls; streams (`report_loads`, `watch`) have none unless given one.
    """

    def __enter__(self) -> RebalancerClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until the server is reachable; False after `timeout`. Lets streams start only when they can
        deliver, instead of failing after taking data from a caller's queue.

        A health call with wait_for_ready (any answer proves the connection) rather than
        `grpc.channel_ready_future`, whose polling thread races with `close()`.
        """
        try:
            self._health.Check(
                health_pb2.HealthCheckRequest(), timeout=timeout, wait_for_ready=True, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            return exc.code() not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
        return True

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """Standard gRPC health: "SERVING", "NOT_SERVING", "UNKNOWN" or "SERVICE_UNKNOWN"."""
        try:
            response = self._health.Check(**self._health_call(service, timeout))
        except grpc.RpcError as exc:
            return unknown_service(exc)
        return HEALTH_NAMES.get(response.status, "UNKNOWN")

    def rebalance(self, loads: Any = None, *, timeout: float | None = None, **request: Any) -> Placement:
        """Plan a placement from inline loads [L, E] (with the topology) or from a deployment's window.

        `request` takes the arguments of `messages.rebalance_request`: the topology (num_replicas,
        num_groups, num_nodes, num_gpus), deployment_id, base_version, prev_phy2log, and the solve options
        declared in `rebalancer_wire.options` (policy, num_candidates, seed, dry_run, fresh,
        max_moves_per_layer, balance_tolerance, locality_tolerance), all checked before anything is sent.
        With `deployment_id` the result starts from the placement in force (fewest moves) and is
        committed as a new version unless `dry_run`; `base_version` guards against concurrent planners
        (FAILED_PRECONDITION when it is not current).
        """
        return self.send_rebalance(rebalance_request(loads, **request), timeout=timeout)

    def send_rebalance(self, request: pb.RebalanceRequest, *, timeout: float | None = None) -> Placement:
        """Send a prepared RebalanceRequest (the sharded client routes these)."""
        response = self.rebalance_response(request, timeout=timeout)
        return Placement.from_proto(response.placement, committed=response.committed)

    def rebalance_response(self, request: pb.RebalanceRequest, *, timeout: float | None = None) -> pb.RebalanceResponse:
        """The undecoded answer to a prepared request, for callers that read one map of it (decoding
        log2phy [L, E, X] into numpy costs more than the rest of the response)."""
        return self._stub.Rebalance(request, timeout=self._deadline(timeout), metadata=self._metadata)

    def report_loads(
        self,
        deployment_id: str,
        reports: Iterable[Any],
        *,
        topology: TopologyLike | None = None,
        rank: int = 0,
        timeout: float | None = None,
    ) -> LoadSummary:
        """Stream telemetry reports for a deployment on one StreamLoad call; returns the server's summary.

        Reports are arrays [L, E], (layer_indices, array [k, E]) pairs or dicts (see `load_requests`);
        `topology` (a Topology or mapping of its fields) is required for a new deployment. Reports from
        several ranks add up on the server. Bad reports are rejected in-band (see the summary).
        """
        requests = LoadRequests(deployment_id, reports, topology=topology, rank=rank)
        try:
            response = self._stub.StreamLoad(requests, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError:
            if requests.error is not None:
                raise requests.error from None
            raise
        return LoadSummary.from_proto(response)

    def get_placement(self, deployment_id: str, *, timeout: float | None = None) -> Placement:
        """The placement in force for a deployment (NOT_FOUND when it has none)."""
        response = self._stub.GetPlacement(
            pb.GetPlacementRequest(deployment_id=deployment_id),
            timeout=self._deadline(timeout),
            metadata=self._metadata,
        )
        return Placement.from_proto(response.placement, committed=True)

    def watch(self, deployment_id: str, after_version: int = 0, *, timeout: float | None = None) -> Iterator[Placement]:
        """Placements newer than `after_version` as they are committed (the current one first when newer).

        Closing the iterator (or leaving a `for` loop early and dropping it) cancels the stream.
        """
        call = self._stub.WatchPlacement(
            pb.WatchPlacementRequest(deployment_id=deployment_id, after_version=after_version),
            timeout=timeout,
            metadata=self._metadata,
        )
        try:
            for response in call:
                yield Placement.from_proto(response.placement, committed=True)
        finally:
            call.cancel()

    def advise_slots(self, loads: Any = None, *, timeout: float | None = None, **request: Any) -> list[SlotAdvice]:
        """The balancedness each slots-per-GPU count would reach, ascending: `request` takes the arguments
        of `messages.advise_request` (num_gpus, num_groups, num_nodes, deployment_id, slots_per_gpu, and
        the solve options). Each count is a fresh plan on the server; nothing is committed."""
        response = self._stub.AdviseSlots(
            advise_request(loads, **request), timeout=self._deadline(timeout), metadata=self._metadata
        )
        return [SlotAdvice.from_proto(count) for count in response.counts]

    def list_deployments(self, *, timeout: float | None = None) -> list[DeploymentInfo]:
        response = self._stub.ListDeployments(
            pb.ListDeploymentsRequest(), timeout=self._deadline(timeout), metadata=self._metadata
        )
        return [DeploymentInfo.from_proto(info) for info in response.deployments]

    def delete_deployment(self, deployment_id: str, *, timeout: float | None = None) -> bool:
        """Forget a deployment (window, placements, metric series); False when it did not exist."""
        response = self._stub.DeleteDeployment(
            pb.DeleteDeploymentRequest(deployment_id=deployment_id),
            timeout=self._deadline(timeout),
            metadata=self._metadata,
        )
        return response.deleted
