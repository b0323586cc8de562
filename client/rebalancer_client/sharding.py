"""Deployment sharding over several service replicas by rendezvous (highest-random-weight) hashing.

Each replica keeps the telemetry window and SQLite state of the deployments it owns, so every call and
telemetry stream of one deployment must reach the same replica. The owner of `deployment_id` is the
target with the highest `blake2b(target, deployment_id)` score: every client computes the same owner from
the same target list with no coordination, and adding an n-th replica moves only the ~1/n of deployments
that it now wins; none move between the replicas that were already there. Removing a replica moves only
its own deployments. Inline `Rebalance` without a deployment is stateless and goes round robin.

Targets are a list (or comma-separated string) of `host:port`, or `dns:///name:port` for a Kubernetes
headless Service, resolved to the pod addresses and re-resolved every `refresh_s` seconds (the
StatefulSet's stable addresses keep ownership steady across pod restarts).

Non-Python controllers can get the same affinity without this module: put Envoy (or an Envoy-based
mesh / Gateway API GRPCRoute) in front of the replicas with a `RING_HASH` (or `MAGLEV`) load-balancing
policy and a `hash_policy` on a request header, and send `x-deployment-id: <id>` as gRPC metadata with
each call. Ring hashing is also consistent (~1/n moves on scale-out) but its assignment differs from the
rendezvous hash here, so one fleet should use one scheme, not both.
"""

from __future__ import annotations

import hashlib
import itertools
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import grpc

from .client import RebalancerClient
from .messages import rebalance_request
from .placement import DeploymentInfo, LoadSummary, Placement, SlotAdvice


def _score(target: str, key: str) -> int:
    digest = hashlib.blake2b(f"{target}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous_owner(key: str, targets: Sequence[str]) -> str:
    """The target that owns `key`: the highest rendezvous score (ties broken by target name)."""
    if not targets:
        raise ValueError("targets must not be empty")
    return max(targets, key=lambda target: (_score(target, key), target))


def parse_targets(spec: str | Sequence[str]) -> list[str]:
    """Targets from a comma-separated string or a list; `dns:///name:port` entries resolved to addresses."""
    entries = [part.strip() for part in spec.split(",")] if isinstance(spec, str) else list(spec)
    targets: list[str] = []
    for entry in filter(None, entries):
        targets += resolve_dns(entry) if entry.startswith("dns:") else [entry]
    if not targets:
        raise ValueError(f"no targets in {spec!r}")
    return sorted(set(targets))


def resolve_dns(target: str) -> list[str]:
    """`dns:///name:port` (or `dns:name:port`) -> sorted `host:port` of every replica behind the name.

    Each address is named by its reverse-DNS host name when it has one: a StatefulSet pod behind a
    headless Service resolves back to its stable `pod-N.service.namespace.svc...` name, which survives
    restarts that change the pod's IP, so the rendezvous hash (and every deployment's owner) stays put.
    Addresses without a reverse name are used as they are.
    """
    name = target.removeprefix("dns:").lstrip("/")
    host, sep, port = name.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"target {target!r} needs a port: dns:///name:port")
    host = host.strip("[]")
    infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    addresses = {info[4][0] for info in infos}
    return sorted(_stable_name(ip, port) for ip in addresses)


def _stable_name(ip: str, port: str) -> str:
    try:
        hostname = socket.gethostbyaddr(ip)[0]
    except OSError:
        hostname = ""
    if hostname and hostname not in ("localhost", "localhost.localdomain"):
        return f"{hostname}:{port}"
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class ShardedClient:
    """`RebalancerClient` over several replicas: per-deployment calls go to the deployment's owner by
    rendezvous hash, inline rebalances round robin, `list_deployments` asks everyone.

    A replica that is down fails only the calls for the deployments it owns (UNAVAILABLE); the others go on.
    """

    def __init__(
        self,
        targets: str | Sequence[str],
        timeout: float = 10.0,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        options: Sequence[tuple[str, Any]] | None = None,
        refresh_s: float = 30.0,
    ) -> None:
        self.timeout = timeout
        self._spec = targets
        self._client_args = {"credentials": credentials, "token": token, "options": options}
        self._dynamic = any(
            entry.strip().startswith("dns:") for entry in (targets.split(",") if isinstance(targets, str) else targets)
        )
        self._refresh_s = refresh_s
        self._lock = threading.Lock()
        self._clients: dict[str, RebalancerClient] = {}
        self._targets: list[str] = []
        self._round_robin: Iterator[int] = itertools.count()
        self.refresh()

    def __enter__(self) -> ShardedClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def targets(self) -> list[str]:
        """The replicas in use, sorted."""
        self._maybe_refresh()
        return list(self._targets)

    def refresh(self) -> list[str]:
        """Re-resolve the targets (DNS names); clients of vanished replicas are closed."""
        targets = parse_targets(self._spec)
        with self._lock:
            for gone in set(self._clients) - set(targets):
                self._clients.pop(gone).close()
            self._targets = targets
            self._resolved_at = time.monotonic()
        return list(targets)

    def set_targets(self, targets: str | Sequence[str]) -> None:
        """Replace the replica list (scale-out or scale-in); deployments move as the hash says."""
        self._spec = targets
        self.refresh()

    def _maybe_refresh(self) -> None:
        if self._dynamic and time.monotonic() - self._resolved_at > self._refresh_s:
            self.refresh()

    def client_for_target(self, target: str) -> RebalancerClient:
        with self._lock:
            client = self._clients.get(target)
            if client is None:
                client = RebalancerClient(target, self.timeout, **self._client_args)
                self._clients[target] = client
            return client

    def target_for(self, deployment_id: str) -> str:
        """The replica that owns `deployment_id`."""
        if not deployment_id:
            raise ValueError("deployment_id is required")
        return rendezvous_owner(deployment_id, self.targets)

    def client_for(self, deployment_id: str) -> RebalancerClient:
        return self.client_for_target(self.target_for(deployment_id))

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()

    def health(self, service: str = "", *, timeout: float | None = None) -> dict[str, str]:
        """Health of every replica; an unreachable one reads as its status code's name (e.g. UNAVAILABLE)."""
        statuses = {}
        for target in self.targets:
            try:
                statuses[target] = self.client_for_target(target).health(service, timeout=timeout)
            except grpc.RpcError as exc:
                statuses[target] = exc.code().name
        return statuses

    def rebalance(self, loads: Any = None, *, timeout: float | None = None, **kwargs: Any) -> Placement:
        """See `RebalancerClient.rebalance`: a deployment's owner plans it; inline plans go round robin."""
        request = rebalance_request(loads, **kwargs)
        return self._client_for_request(request.deployment_id).send_rebalance(request, timeout=timeout)

    def advise_slots(self, loads: Any = None, *, timeout: float | None = None, **request: Any) -> list[SlotAdvice]:
        """See `RebalancerClient.advise_slots`: a deployment's owner answers; inline advice goes round robin."""
        client = self._client_for_request(request.get("deployment_id"))
        return client.advise_slots(loads, timeout=timeout, **request)

    def _client_for_request(self, deployment_id: str | None) -> RebalancerClient:
        """The deployment's owner; a request without one goes round robin."""
        if deployment_id:
            return self.client_for(deployment_id)
        targets = self.targets
        return self.client_for_target(targets[next(self._round_robin) % len(targets)])

    def report_loads(self, deployment_id: str, reports: Iterable[Any], **stream: Any) -> LoadSummary:
        """See `RebalancerClient.report_loads` (topology, rank, timeout): the deployment's owner takes them."""
        return self.client_for(deployment_id).report_loads(deployment_id, reports, **stream)

    def get_placement(self, deployment_id: str, *, timeout: float | None = None) -> Placement:
        return self.client_for(deployment_id).get_placement(deployment_id, timeout=timeout)

    def watch(self, deployment_id: str, after_version: int = 0, *, timeout: float | None = None) -> Iterator[Placement]:
        return self.client_for(deployment_id).watch(deployment_id, after_version, timeout=timeout)

    def delete_deployment(self, deployment_id: str, *, timeout: float | None = None) -> bool:
        return self.client_for(deployment_id).delete_deployment(deployment_id, timeout=timeout)

    def list_deployments(self, *, timeout: float | None = None) -> list[DeploymentInfo]:
        """Deployments of every replica (all must answer)."""
        infos: list[DeploymentInfo] = []
        for target in self.targets:
            infos += self.client_for_target(target).list_deployments(timeout=timeout)
        return sorted(infos, key=lambda info: info.deployment_id)


def connect(target: str | Sequence[str], timeout: float = 10.0, **kwargs: Any) -> RebalancerClient | ShardedClient:
    """A plain client for one `host:port`, a `ShardedClient` for a list, a comma list or `dns:///`."""
    if isinstance(target, str) and "," not in target and not target.startswith("dns:"):
        return RebalancerClient(target, timeout, **kwargs)
    return ShardedClient(target, timeout, **kwargs)
