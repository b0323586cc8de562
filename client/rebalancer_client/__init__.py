"""Python client of the moe-rebalancer service; needs numpy and grpcio, never torch.

`RebalancerClient` (sync) and `AsyncRebalancerClient` talk to one replica; `ShardedClient` routes each
deployment to its replica by rendezvous hash; `connect(target)` picks between them; `LoadReporter`
streams an engine's expert loads from a background thread.
"""

from .aio import AsyncRebalancerClient
from .client import RebalancerClient
from .messages import field_violations
from .placement import DeploymentInfo, LoadSummary, Placement, PlacementStats, SlotAdvice, Topology
from .reporter import LoadReporter
from .sharding import ShardedClient, connect, rendezvous_owner

__all__ = [
    "AsyncRebalancerClient",
    "DeploymentInfo",
    "LoadReporter",
    "LoadSummary",
    "Placement",
    "PlacementStats",
    "RebalancerClient",
    "ShardedClient",
    "SlotAdvice",
    "Topology",
    "connect",
    "field_violations",
    "rendezvous_owner",
]
