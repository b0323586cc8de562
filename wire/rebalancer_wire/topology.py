"""The expert-parallel layout, one type and one set of rules for client, server and solver."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

FIELDS = ("num_layers", "num_experts", "num_replicas", "num_groups", "num_nodes", "num_gpus")


def topology_violations(
    num_layers: int, num_experts: int, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> list[tuple[str, str]]:
    """(argument, reason) for every rule a layout breaks: all counts >= 1, R >= E, G divides R and, where
    the plan is hierarchical (see `planning_layout`), the groups divide the experts and the nodes the GPUs.
    Empty when the layout is valid. These are the published DeepSeek function's rules, so every input it
    accepts is accepted here."""
    values = dict(zip(FIELDS, (num_layers, num_experts, num_replicas, num_groups, num_nodes, num_gpus), strict=True))
    violations = [
        (name, f"must be an integer >= 1, got {value!r}")
        for name, value in values.items()
        if isinstance(value, bool) or not hasattr(value, "__index__") or value < 1
    ]
    if violations:
        return violations
    if num_replicas < num_experts:
        violations.append(("num_replicas", f"({num_replicas}) must be >= the number of experts ({num_experts})"))
    if num_replicas % num_gpus:
        violations.append(("num_gpus", f"({num_gpus}) must divide num_replicas ({num_replicas})"))
    groups, nodes = planning_layout(num_groups, num_nodes)
    if num_experts % groups:
        violations.append(("num_groups", f"({num_groups}) must divide the number of experts ({num_experts})"))
    if num_gpus % nodes:
        violations.append(("num_nodes", f"({num_nodes}) must divide num_gpus ({num_gpus})"))
    return violations


def planning_layout(num_groups: int, num_nodes: int) -> tuple[int, int]:
    """(groups, nodes) a plan honours: hierarchical planning needs the groups to split evenly over the
    nodes; otherwise the plan is global and ignores both, as the published DeepSeek function does."""
    if num_groups % num_nodes:
        return 1, 1
    return num_groups, num_nodes


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

    def violations(self) -> list[tuple[str, str]]:
        return topology_violations(*(getattr(self, name) for name in FIELDS))

    @classmethod
    def from_proto(cls, message: Any) -> Topology:
        return cls(**{name: getattr(message, name) for name in FIELDS})

    def to_proto(self) -> Any:
        from .v1 import rebalancer_pb2 as pb  # here, so the solver can use the rules without protobuf

        return pb.Topology(**asdict(self))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Topology:
        return cls(**json.loads(text))
