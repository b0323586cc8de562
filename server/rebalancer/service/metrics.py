"""Every Prometheus family the server exports, in one place.

Each server owns its own `CollectorRegistry`, so several servers (tests, benchmarks) can live in one
process. Names and label sets are a contract with `deploy/` dashboards and alert rules: change them
there too. No label ever carries a layer index; deployment labels are dropped on DeleteDeployment.
"""

from __future__ import annotations

import contextlib
import functools

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

SOLVE_BUCKETS = (
    5e-5,
    1e-4,
    2.5e-4,
    5e-4,
    1e-3,
    2.5e-3,
    5e-3,
    1e-2,
    2.5e-2,
    5e-2,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
)
BATCH_LAYER_BUCKETS = tuple(float(2**k) for k in range(13))  # 1 .. 4096
BATCH_REQUEST_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# Estimated rearrangement time of a plan: engines report 0.6-15 s on wide EP for a full re-plan.
TRANSFER_BUCKETS = (0.0, 1e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
GRPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")
TRIGGERS = ("request", "auto")
DROP_REASONS = ("cancelled", "deadline", "shutdown", "overrun")


class Metrics:
    """The server's metric families; `registry` is what /metrics serves."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # Every family registers in this server's own registry (see the module doc).
        counter, gauge, histogram = (
            functools.partial(kind, registry=self.registry) for kind in (Counter, Gauge, Histogram)
        )
        self.solve_duration = histogram(
            "rebalancer_solve_duration_seconds",
            "Wall time of one solver call (a whole batch), by device and kernel path.",
            ("device", "path"),
            buckets=SOLVE_BUCKETS,
        )
        self.transfer_seconds = histogram(
            "rebalancer_transfer_estimated_seconds",
            "Estimated rearrangement time of each plan made from a placement in force (cost model: busiest"
            " GPU's sending or receiving time on the slower link class).",
            buckets=TRANSFER_BUCKETS,
        )
        self.batch_layers = histogram(
            "rebalancer_batch_layers", "Layers in one solver call.", buckets=BATCH_LAYER_BUCKETS
        )
        self.batch_requests = histogram(
            "rebalancer_batch_requests", "Requests in one solver call.", buckets=BATCH_REQUEST_BUCKETS
        )
        self.queue_depth = gauge("rebalancer_queue_depth", "Solve requests waiting for the solver.")
        self.imbalance_ratio = gauge(
            "rebalancer_imbalance_ratio",
            "Max/mean GPU load of the placement in force on the telemetry window (mean over layers).",
            ("deployment",),
        )
        self.balancedness = gauge(
            "rebalancer_balancedness",
            "Mean/max GPU load (mean over layers): placement in force on the window, or the last plan.",
            ("deployment", "placement"),
        )
        self.replicas_moved = counter(
            "rebalancer_replicas_moved_total",
            "Expert copies GPUs had to receive because of committed placements.",
            ("deployment",),
        )
        self.telemetry_reports = counter(
            "rebalancer_telemetry_reports_total",
            "Telemetry reports received, by outcome (deployment is empty when the id itself was bad).",
            ("deployment", "outcome"),
        )
        self.placements = counter("rebalancer_placements_total", "Placements committed, by trigger.", ("trigger",))
        self.solver_calls = counter(
            "rebalancer_solver_calls_total", "Solver calls (one per batch), by kernel path.", ("path",)
        )
        self.deployments = gauge("rebalancer_deployments", "Registered deployments.")
        self.state_bytes = gauge(
            "rebalancer_state_bytes",
            "Memory reserved by soft state (telemetry windows, placements in force) against its budget.",
        )
        self.state_budget_bytes = gauge(
            "rebalancer_state_budget_bytes", "Memory budget of soft state (share of --memory-budget-mb)."
        )
        self.dropped_requests = counter(
            "rebalancer_dropped_requests_total",
            "Solve requests dropped unsolved, before or during their solve: the caller had gone (cancelled), "
            "its deadline passed, the server shut down, or the solve ran far past the per-job limit (overrun).",
            ("reason",),
        )

        self.grpc_started = counter("grpc_server_started_total", "RPCs started.", GRPC_LABELS)
        self.grpc_handled = counter(
            "grpc_server_handled_total", "RPCs completed, by status code.", (*GRPC_LABELS, "grpc_code")
        )
        self.grpc_handling_seconds = histogram(
            "grpc_server_handling_seconds", "RPC handling time until the status is sent.", GRPC_LABELS
        )
        self.grpc_msg_received = counter("grpc_server_msg_received_total", "Request messages received.", GRPC_LABELS)
        self.grpc_msg_sent = counter("grpc_server_msg_sent_total", "Response messages sent.", GRPC_LABELS)
        for trigger in TRIGGERS:
            self.placements.labels(trigger)
        for reason in DROP_REASONS:
            self.dropped_requests.labels(reason)
        self._http = None

    def forget_deployment(self, deployment_id: str) -> None:
        """Drop every series labelled with `deployment_id` (its label values are unbounded)."""
        series = (
            (self.imbalance_ratio, (deployment_id,)),
            (self.balancedness, (deployment_id, "current")),
            (self.balancedness, (deployment_id, "proposed")),
            (self.replicas_moved, (deployment_id,)),
            (self.telemetry_reports, (deployment_id, "accepted")),
            (self.telemetry_reports, (deployment_id, "rejected")),
        )
        for family, labels in series:
            with contextlib.suppress(KeyError):
                family.remove(*labels)

    def serve(self, host: str, port: int) -> None:
        """Start the /metrics HTTP endpoint in a daemon thread."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
