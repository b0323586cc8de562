"""Plain-Python views of the service's results: `Placement` (numpy maps + stats) and the JSON forms
inference engines read.

Maps follow the DeepSeek EPLB `rebalance_experts` convention: `phy2log` [L, R] (slot p lives on GPU
p // (R / G)), `log2phy` [L, E, X] padded with -1, `logcnt` [L, E].

Engine files (written by `rebalancer rebalance/get/watch --format ...`; `to_text` renders them):

* ``vllm``: ``{"physical_to_logical_map": [L rows of R ints]}``, one row per MoE layer, the one map vLLM
  installs. vLLM 0.33 keeps ``logical_to_physical_map`` as [L, E, 1024] (``MAX_EXPERT_REDUNDANCY + 1``)
  and derives it and ``logical_replica_count`` from this map itself (``compute_logical_maps``), so a
  narrower copy of those could not be ``copy_``'d into ``EplbState`` and is not written. Install it with
  ``EplbState.update_mapping(model_config, torch.tensor(doc["physical_to_logical_map"]))`` (what
  ``GPUModelRunner.setup_eplb_from_mapping`` does) when the expert weights are laid out that way; a
  running vLLM moves its weights to new placements through the policy plugin
  (`rebalancer_client.engines.vllm`), not through a file.
* ``sglang``: ``{"physical_to_logical_map": [D rows of R ints]}``, the ``--init-expert-location`` file,
  one row per *decoder* layer (dense layers get the trivial map); needs the model's layer numbering.
* ``trtllm``: TensorRT-LLM's ``MoeLoadBalancerConfig`` YAML (``num_slots``,
  ``initial_global_assignments`` keyed by decoder layer, ``layer_updates_per_iter``); needs the numbering.
* ``raw``: everything the service returned (maps, version, topology, stats) for tools and archives.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

import numpy as np
from rebalancer_wire.codec import decode
from rebalancer_wire.topology import Topology
from rebalancer_wire.v1 import rebalancer_pb2 as pb

from .engines import sglang, trtllm
from .engines.layers import LayerNumbering

FORMATS = ("vllm", "sglang", "trtllm", "raw")
_View = TypeVar("_View")


def _from_message(cls: type[_View], message: Any, **converted: Any) -> _View:
    """`cls` built from `message`: each dataclass field not in `converted` takes the message's field of the
    same name as it is (the views mirror the proto's names), so a new scalar needs only its declaration."""
    copied = {f.name: getattr(message, f.name) for f in fields(cls) if f.name not in converted}
    return cls(**copied, **converted)


@dataclass(frozen=True)
class PlacementStats:
    """What the service measured about a placement; balancedness = mean/max GPU load (1.0 is perfect)."""

    balancedness_before: float = 0.0
    balancedness_after: float = 0.0
    imbalance_before: float = 0.0
    imbalance_after: float = 0.0
    replicas_moved: int = 0
    moved_per_layer: list[int] = field(default_factory=list)
    solve_seconds: float = 0.0
    device: str = ""
    policies: dict[str, int] = field(default_factory=dict)
    batch_layers: int = 0
    batch_requests: int = 0
    solver_path: str = ""
    # The transfer plan's cost (cost model of the request): bytes over links, their intra-node share,
    # the estimated rearrangement seconds, and layers a transfer budget kept on the placement in force.
    moved_bytes: float = 0.0
    intra_node_share: float = 1.0
    estimated_transfer_seconds: float = 0.0
    deferred_layers: int = 0

    @classmethod
    def from_proto(cls, message: pb.PlacementStats) -> PlacementStats:
        return _from_message(
            cls,
            message,
            moved_per_layer=list(message.moved_per_layer),
            policies={p.policy: p.layers for p in message.policies},
        )


@dataclass(frozen=True)
class Placement:
    """One placement version: numpy maps (writable copies, int64) plus where it came from.

    phy2log [L, R], log2phy [L, E, X] padded with -1, logcnt [L, E]. `version` is 0 and `deployment_id`
    empty for an inline, uncommitted plan; `committed` says whether the service stored it.
    `transfers` [T, 5] int64: the copies to ship from the placement in force, rows (layer, expert,
    destination GPU, destination slot, source GPU; the destination itself for a local copy, -1 for host
    memory), empty without one. `gpu_ids`: GPU k of this placement is GPU gpu_ids[k] of the previous
    numbering when the GPU set changed (elastic EP), else empty.
    """

    phy2log: np.ndarray
    log2phy: np.ndarray
    logcnt: np.ndarray
    version: int
    deployment_id: str
    topology: Topology
    stats: PlacementStats
    trigger: str = ""
    created_unix_ms: int = 0
    committed: bool = False
    transfers: np.ndarray = field(default_factory=lambda: np.zeros((0, 5), dtype=np.int64))
    gpu_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_proto(cls, message: pb.Placement, *, committed: bool = False) -> Placement:
        """The placement of a message; logcnt and log2phy (slot order) are derived from phy2log when the
        answer left them out (`phy2log_only`)."""
        phy2log = np.array(decode(message.phy2log), dtype=np.int64)
        if message.HasField("log2phy"):
            maps = {name: np.array(decode(getattr(message, name)), dtype=np.int64) for name in ("log2phy", "logcnt")}
        else:
            logcnt = logcnt_from_phy2log(phy2log, message.topology.num_experts)
            maps = {"logcnt": logcnt, "log2phy": log2phy_from_phy2log(phy2log, logcnt)}
        return _from_message(
            cls,
            message,
            phy2log=phy2log,
            **maps,
            topology=Topology.from_proto(message.topology),
            stats=PlacementStats.from_proto(message.stats),
            committed=committed,
            transfers=np.array(decode(message.transfers), dtype=np.int64).reshape(-1, 5)
            if message.HasField("transfers")
            else np.zeros((0, 5), dtype=np.int64),
            gpu_ids=list(message.gpu_ids),
        )

    def gpu_experts(self, layer: int, gpu: int) -> np.ndarray:
        """Logical experts hosted by `gpu` in `layer`, one entry per slot: [R / G]."""
        per_gpu = self.topology.slots_per_gpu
        return self.phy2log[layer, gpu * per_gpu : (gpu + 1) * per_gpu]

    def to_sglang_json(self, numbering: LayerNumbering | None = None) -> dict[str, Any]:
        """SGLang's `--init-expert-location` file: one key, `physical_to_logical_map` [D, R] by decoder layer."""
        return sglang.init_expert_location(self.phy2log, self.topology.num_experts or self.logcnt.shape[1], numbering)

    def to_vllm_json(self) -> dict[str, Any]:
        """vLLM's installable map: `physical_to_logical_map` [L, R] (vLLM derives the others)."""
        return {"physical_to_logical_map": self.phy2log.tolist()}

    def to_trtllm_yaml(self, numbering: LayerNumbering | None = None, *, layer_updates_per_iter: int = 0) -> str:
        """TensorRT-LLM's `MoeLoadBalancerConfig` YAML keyed by decoder layer."""
        return trtllm.load_balancer_yaml(self.phy2log, numbering, layer_updates_per_iter=layer_updates_per_iter)

    def to_raw_json(self) -> dict[str, Any]:
        """Everything the service returned, JSON-ready."""
        return {
            "deployment_id": self.deployment_id,
            "version": self.version,
            "committed": self.committed,
            "trigger": self.trigger,
            "created_unix_ms": self.created_unix_ms,
            "topology": asdict(self.topology),
            "stats": asdict(self.stats),
            "phy2log": self.phy2log.tolist(),
            "log2phy": self.log2phy.tolist(),
            "logcnt": self.logcnt.tolist(),
            "transfers": self.transfers.tolist(),
            "gpu_ids": list(self.gpu_ids),
        }

    def to_json(self, format: str = "raw", numbering: LayerNumbering | None = None) -> dict[str, Any]:
        """The JSON form named by `format` ("vllm", "sglang" or "raw")."""
        if format == "vllm":
            return self.to_vllm_json()
        if format == "sglang":
            return self.to_sglang_json(numbering)
        if format == "raw":
            return self.to_raw_json()
        raise ValueError(f"format must be one of vllm, sglang, raw for JSON, got {format!r}")

    def to_text(self, format: str = "raw", numbering: LayerNumbering | None = None, **options: Any) -> str:
        """The engine file named by `format` (one of FORMATS) as text; trtllm takes `layer_updates_per_iter`."""
        if format == "trtllm":
            return self.to_trtllm_yaml(numbering, **options)
        return json.dumps(self.to_json(format, numbering), separators=(",", ":")) + "\n"


@dataclass(frozen=True)
class SlotAdvice:
    """What one slots-per-GPU count reaches on the advised loads (a fresh plan, nothing committed)."""

    slots_per_gpu: int
    num_replicas: int
    balancedness: float
    worst_layer_balancedness: float

    @classmethod
    def from_proto(cls, message: pb.SlotAdvice) -> SlotAdvice:
        return _from_message(cls, message)


@dataclass(frozen=True)
class DeploymentInfo:
    """A deployment the service knows: its layout, current version and telemetry window fill."""

    deployment_id: str
    topology: Topology
    version: int
    reports: int
    imbalance: float

    @classmethod
    def from_proto(cls, message: pb.DeploymentInfo) -> DeploymentInfo:
        return _from_message(cls, message, topology=Topology.from_proto(message.topology))


@dataclass(frozen=True)
class LoadSummary:
    """The server's answer to one StreamLoad stream: counts and the first few rejections."""

    accepted: int
    rejected: int
    rejections: list[tuple[int, str, str]] = field(default_factory=list)

    @classmethod
    def from_proto(cls, message: pb.StreamLoadResponse) -> LoadSummary:
        return _from_message(cls, message, rejections=[(r.index, r.field, r.reason) for r in message.rejections])


def logcnt_from_phy2log(phy2log: np.ndarray, num_experts: int) -> np.ndarray:
    """phy2log [L, R] -> copies per expert [L, E] int64."""
    num_layers = phy2log.shape[0]
    offsets = np.arange(num_layers, dtype=np.int64)[:, None] * num_experts
    counts = np.bincount((phy2log + offsets).ravel(), minlength=num_layers * num_experts)
    return counts.reshape(num_layers, num_experts).astype(np.int64)


def log2phy_from_phy2log(phy2log: np.ndarray, logcnt: np.ndarray) -> np.ndarray:
    """phy2log [L, R] -> log2phy [L, E, X] (X = max copies), each expert's slots in slot order, -1 padded."""
    num_layers, num_slots = phy2log.shape
    width = max(int(logcnt.max()), 1) if logcnt.size else 1
    order = np.argsort(phy2log, axis=1, kind="stable")  # slots grouped by expert, in slot order
    experts = np.take_along_axis(phy2log, order, axis=1)
    first = np.cumsum(logcnt, axis=1) - logcnt
    rank = np.arange(num_slots)[None, :] - np.take_along_axis(first, experts, axis=1)
    log2phy = np.full((num_layers, logcnt.shape[1], width), -1, dtype=np.int64)
    log2phy[np.arange(num_layers)[:, None], experts, rank] = order
    return log2phy
