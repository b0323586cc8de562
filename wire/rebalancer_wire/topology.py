"""The expert-parallel layout, one type for client and server (`rebalancer.v1.Topology`)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from .v1 import rebalancer_pb2 as pb


@dataclass(frozen=True)
class Topology:
    """R slots on G GPUs over N nodes for L layers of E experts in `num_groups` expert groups."""

    num_layers: int
    num_experts: int
    num_replicas: int
    num_groups: int = 1
    num_nodes: int = 1
    num_gpus: int = 1

    @property
    def slots_per_gpu(self) -> int:
        return self.num_replicas // self.num_gpus

    @classmethod
    def from_proto(cls, message: pb.Topology) -> Topology:
        return cls(
            num_layers=message.num_layers,
            num_experts=message.num_experts,
            num_replicas=message.num_replicas,
            num_groups=message.num_groups,
            num_nodes=message.num_nodes,
            num_gpus=message.num_gpus,
        )

    def to_proto(self) -> pb.Topology:
        return pb.Topology(**asdict(self))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Topology:
        return cls(**json.loads(text))
