"""Domain records the service passes around: a deployment's topology and a committed placement.

Plain numpy and dataclasses, so the event loop, SQLite and protobuf conversion never touch torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from rebalancer_wire.codec import encode, encode_ids
from rebalancer_wire.topology import Topology
from rebalancer_wire.v1 import rebalancer_pb2 as pb

__all__ = ["PlacementRecord", "Topology"]


@dataclass
class PlacementRecord:
    """One placement version: maps as integer numpy arrays, phy2log [L, R], logcnt [L, E], log2phy [L, E, X]
    (a fresh plan's log2phy comes in the narrowest type of its slot ids, the one it is sent in)."""

    deployment_id: str
    version: int
    topology: Topology
    phy2log: np.ndarray
    logcnt: np.ndarray
    log2phy: np.ndarray
    stats: pb.PlacementStats = field(default_factory=pb.PlacementStats)
    trigger: str = "request"
    created_unix_ms: int = 0
    # How to get here from the previous placement, [T, 5] int32, and the GPU ids of a changed GPU set
    # (both persisted with the version, so a watcher that reconnects after a restart still gets them).
    transfers: np.ndarray | None = None
    gpu_ids: np.ndarray | None = None

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
        if self.transfers is not None:
            message.transfers.CopyFrom(encode(np.ascontiguousarray(self.transfers, dtype=np.int32)))
        if self.gpu_ids is not None:
            message.gpu_ids.extend(int(g) for g in self.gpu_ids)
        return message
