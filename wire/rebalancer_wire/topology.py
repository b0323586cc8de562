"""The expert-parallel layout, one type and one set of rules for client, server and solver."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .cost import CostModel

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
    """R slots on G GPUs over N nodes for L layers of E experts in `num_groups` expert groups.

    `cost_model` is what moving a copy costs on this deployment; None when not stated (the defaults).
    It is not part of the layout, so it takes no part in equality: see `conflicts`.
    """

    num_layers: int
    num_experts: int
    num_replicas: int
    num_groups: int = 1
    num_nodes: int = 1
    num_gpus: int = 1
    cost_model: CostModel | None = field(default=None, compare=False)

    @property
    def slots_per_gpu(self) -> int:
        return self.num_replicas // self.num_gpus

    @property
    def transfer_cost(self) -> CostModel:
        """The cost model in effect: the stated one, else the defaults."""
        return self.cost_model or CostModel()

    def violations(self) -> list[tuple[str, str]]:
        violations = topology_violations(*(getattr(self, name) for name in FIELDS))
        if self.cost_model is not None:
            violations += [(f"cost_model.{name}", reason) for name, reason in self.cost_model.violations()]
        return violations

    def conflicts(self, registered: Topology) -> bool:
        """Whether this (a request's) topology contradicts a registered one: another layout, or a cost
        model stated and different from the registered one in effect."""
        if self != registered:
            return True
        return self.cost_model is not None and self.cost_model != registered.transfer_cost

    @classmethod
    def from_proto(cls, message: Any) -> Topology:
        cost = CostModel().overridden(message.cost_model) if message.HasField("cost_model") else None
        return cls(**{name: getattr(message, name) for name in FIELDS}, cost_model=cost)

    def to_proto(self) -> Any:
        from .v1 import rebalancer_pb2 as pb  # here, so the solver can use the rules without protobuf

        message = pb.Topology(**{name: getattr(self, name) for name in FIELDS})
        if self.cost_model is not None:
            message.cost_model.CopyFrom(self.cost_model.to_proto())
        return message

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Topology:
        values = json.loads(text)
        cost = values.pop("cost_model", None)
        return cls(**values, cost_model=None if cost is None else CostModel(**cost))
