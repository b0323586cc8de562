"""What moving expert weights costs: one type for the solver, the service and the client (torch-free).

A deployment registers its cost model with its topology; a Rebalance may override any field for itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from .options import ArgumentError

COST_FIELDS = ("bytes_per_expert", "intra_node_bandwidth", "inter_node_bandwidth")


@dataclass(frozen=True)
class CostModel:
    """Bytes of one expert copy and each GPU's bandwidth (bytes/s) per link class.

    Defaults: a DeepSeek-V3 expert in FP8 (3 matrices of 7168 x 2048 bytes), NVLink at 450 GB/s per
    direction (H100/H200) and one 400 Gb/s NIC per GPU.
    """

    bytes_per_expert: int = 3 * 7168 * 2048
    intra_node_bandwidth: float = 450e9
    inter_node_bandwidth: float = 50e9

    def violations(self) -> list[tuple[str, str]]:
        """(field, reason) for every field that is not a positive finite number."""
        return [
            (name, f"must be a positive finite number, got {value!r}")
            for name in COST_FIELDS
            if not _positive_finite(value := getattr(self, name))
        ]

    def validate(self) -> CostModel:
        """Raise ArgumentError (argument `cost_model`) naming the first field that is not positive and finite."""
        for name, reason in self.violations():
            raise ArgumentError("cost_model", f"{name} {reason}")
        return self

    def overridden(self, message: Any) -> CostModel:
        """This model with the fields set in a TransferCost message taken from it (unset ones kept)."""
        values = {name: getattr(message, name) for name in COST_FIELDS if message.HasField(name)}
        if "bytes_per_expert" in values and float(values["bytes_per_expert"]).is_integer():
            values["bytes_per_expert"] = int(values["bytes_per_expert"])
        return replace(self, **values)

    def to_proto(self) -> Any:
        from .v1 import rebalancer_pb2 as pb  # here, so the solver can use the type without protobuf

        return pb.TransferCost(**{name: float(getattr(self, name)) for name in COST_FIELDS})


def _positive_finite(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and value > 0 and math.isfinite(value)
