"""Assembly of the service: store, windows, batcher, registry, gRPC server, health, reflection, metrics.

`RebalancerServer` is what `main` runs and what tests start in-process on an ephemeral port.
Start-up order matters: the state directory and the TLS/token files are checked before any port is bound
(a bad one is a clear error, not a half-started server), and health says SERVING only after one warm-up
solve on the device.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
import numpy as np
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from rebalancer_wire.options import SolveSettings
from rebalancer_wire.v1 import rebalancer_pb2 as pb
from rebalancer_wire.v1 import rebalancer_pb2_grpc

from ..solver import host_arrivals, host_packing, host_swaps, host_transfers
from .admission import JobLimits
from .autorebalance import AutoRebalancer
from .batcher import Batcher, SolveJob
from .budget import MemoryShares, StateLedger
from .commands import RequestChecker
from .config import ServerConfig
from .deployments import Registry
from .interceptors import DecodeInterceptor, MetricsInterceptor, TokenAuthInterceptor
from .metrics import Metrics
from .model import Topology
from .security import auth_token, server_credentials
from .servicer import RebalancerServicer
from .store import Store
from .telemetry import TelemetryWindows

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RebalancerService"].full_name
HEALTH_NAMES = ("", SERVICE_NAME)


def device_from_flag(name: str) -> torch.device:
    """The --device flag (auto, cpu, cuda, cuda:N) -> the device the solver and windows live on."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available")
    return device


def channel_options(config: ServerConfig) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
    ]


class RebalancerServer:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.device = device_from_flag(config.device)
        self.metrics = Metrics()
        self.store = Store(config.state_dir)
        self.health = health_aio.HealthServicer()
        self.port = 0

    async def start(self) -> None:
        """Open the state, bind, serve (NOT_SERVING), warm the solver up, then report SERVING."""
        config = self.config
        credentials = server_credentials(config)
        token = auth_token(config)
        self.store.open()
        self.memory = MemoryShares.split(config.memory_budget_mb)
        limits = JobLimits(
            max_job_bytes=self.memory.large_job,
            max_job_seconds=config.max_job_seconds,
            small_job_bytes=self.memory.small_job,
            small_job_seconds=config.small_job_seconds,
            device_type=self.device.type,
        )
        ledger = StateLedger(self.memory.state, config.max_deployments, self.metrics)
        self.windows = TelemetryWindows(config.window, config.history_intervals, self.device, ledger)
        self.batcher = Batcher(
            self.metrics,
            self.device,
            window_s=config.batch_window_ms / 1000.0,
            wait_when=config.batch_window_when,
            max_layers=config.max_batch_layers,
            max_queue=config.max_queue,
            limits=limits,
            max_queued_bytes=self.memory.queue,
        )
        self.registry = Registry(
            self.store, self.windows, self.batcher, self.metrics, ledger, max_message_bytes=config.max_message_bytes
        )
        await self.registry.restore()
        self.auto = AutoRebalancer(
            self.registry,
            threshold=config.auto_rebalance_threshold,
            min_interval_s=config.auto_rebalance_min_interval_s,
            hysteresis=config.auto_rebalance_hysteresis,
            period_s=config.auto_rebalance_period_s,
        )
        interceptors: list[grpc.aio.ServerInterceptor] = [MetricsInterceptor(self.metrics)]
        if token is not None:
            interceptors.append(TokenAuthInterceptor(token))
        interceptors.append(DecodeInterceptor())
        self.server = grpc.aio.server(interceptors=interceptors, options=channel_options(config))
        checker = RequestChecker(config.max_tensor_elements, limits, config.max_message_bytes)
        servicer = RebalancerServicer(self.registry, self.windows, self.metrics, checker)
        rebalancer_pb2_grpc.add_RebalancerServiceServicer_to_server(servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self.server,
        )
        for name in HEALTH_NAMES:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{config.host}:{config.port}"
        if credentials is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, credentials)
        if config.metrics_port:
            self.metrics.serve(config.metrics_host or config.host, config.metrics_port)
        await self.server.start()
        self.batcher.start()
        await self._warm_up()
        self.auto.start()
        for name in HEALTH_NAMES:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "memory budget %.0f MiB (start-up %.0f MiB): state %.0f, large job %.0f, small job %.0f, queue %.0f MiB",
            *(value / 2**20 for value in (self.memory.total, self.memory.baseline, self.memory.state)),
            *(value / 2**20 for value in (self.memory.large_job, self.memory.small_job, self.memory.queue)),
        )
        log.info(
            "serving on %s:%d (%s, %s; device %s, metrics %s:%d)",
            config.host,
            self.port,
            "plaintext" if credentials is None else "mutual TLS" if config.tls_client_ca else "TLS",
            "bearer token required" if token is not None else "no token auth",
            self.device,
            config.metrics_host or config.host,
            config.metrics_port,
        )

    async def _warm_up(self) -> None:
        """Small solves on the device, so the first real request pays no start-up cost, and the compiled loops
        (seconds the first time, until Numba's disk cache has them): the migration and transfer steps run on
        the host for every device, the packing loops on the CPU only, in every dtype."""
        await asyncio.to_thread(host_transfers.warm_up)
        await asyncio.to_thread(host_arrivals.warm_up)
        await asyncio.to_thread(host_swaps.warm_up)
        if self.device.type == "cpu":
            await asyncio.to_thread(host_packing.warm_up)
        # Eight slots per GPU, then two (the exact search, and the climb beyond its table: compiled here).
        for experts, replicas, gpus in ((16, 32, 4), (12, 16, 8), (16, 32, 16)):
            topology = Topology(
                num_layers=2, num_experts=experts, num_replicas=replicas, num_groups=4, num_nodes=2, num_gpus=gpus
            )
            loads = np.random.default_rng(0).random((2, experts))
            await self.batcher.submit(SolveJob(topology=topology, settings=SolveSettings(), loads=loads))

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, stop accepting, let in-flight RPCs finish within the grace period, release all."""
        grace = self.config.grace_period_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        self.registry.stopping.set()
        await self.auto.stop()
        await self.server.stop(grace)
        await self.batcher.close()
        self.windows.close()
        self.store.close()
        self.metrics.close()
        log.info("stopped")

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


async def serve_until(config: ServerConfig, stop: asyncio.Event) -> None:
    """Run a server until `stop` is set, then shut it down gracefully."""
    server = RebalancerServer(config)
    await server.start()
    await stop.wait()
    log.info("shutting down (grace %.1f s)", config.grace_period_s)
    await server.stop()
