"""Domain records the service passes around: a deployment's topology and a committed placement.

Plain numpy and dataclasses, so the event loop, SQLite and protobuf conversion never touch torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np
from rebalancer_client.codec import encode_ids
from rebalancer_client.v1 import rebalancer_pb2 as pb


@dataclass(frozen=True)
class Topology:
    """The expert-parallel layout a deployment's placements are planned for (R slots on G GPUs)."""

    num_layers: int
    num_experts: int
    num_replicas: int
    num_groups: int
    num_nodes: int
    num_gpus: int

    @classmethod
    def from_proto(cls, message: pb.Topology) -> Topology:
        return cls(
            message.num_layers,
            message.num_experts,
            message.num_replicas,
            message.num_groups,
            message.num_nodes,
            message.num_gpus,
        )

    def to_proto(self) -> pb.Topology:
        return pb.Topology(**asdict(self))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Topology:
        return cls(**json.loads(text))


@dataclass
class PlacementRecord:
    """One placement version: maps as int64 numpy arrays, phy2log [L, R], logcnt [L, E], log2phy [L, E, X]."""

    deployment_id: str
    version: int
    topology: Topology
    phy2log: np.ndarray
    logcnt: np.ndarray
    log2phy: np.ndarray
    stats: pb.PlacementStats = field(default_factory=pb.PlacementStats)
    trigger: str = "request"
    created_unix_ms: int = 0

    def fill(self, message: pb.Placement) -> pb.Placement:
        """Write this record into `message` in place: maps are megabytes, and every nesting of a built
        message would copy them once more."""
        message.deployment_id = self.deployment_id
        message.version = self.version
        message.topology.CopyFrom(self.topology.to_proto())
        # The narrowest integer type on the wire: log2phy is most of a response's bytes.
        message.phy2log.CopyFrom(encode_ids(self.phy2log))
        message.logcnt.CopyFrom(encode_ids(self.logcnt))
        message.log2phy.CopyFrom(encode_ids(self.log2phy))
        message.stats.CopyFrom(self.stats)
        message.trigger = self.trigger
        message.created_unix_ms = self.created_unix_ms
        return message
