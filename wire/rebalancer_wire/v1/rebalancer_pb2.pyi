from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ElementType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ELEMENT_TYPE_UNSPECIFIED: _ClassVar[ElementType]
    ELEMENT_TYPE_FLOAT32: _ClassVar[ElementType]
    ELEMENT_TYPE_FLOAT64: _ClassVar[ElementType]
    ELEMENT_TYPE_FLOAT16: _ClassVar[ElementType]
    ELEMENT_TYPE_BFLOAT16: _ClassVar[ElementType]
    ELEMENT_TYPE_INT32: _ClassVar[ElementType]
    ELEMENT_TYPE_INT64: _ClassVar[ElementType]
    ELEMENT_TYPE_INT16: _ClassVar[ElementType]

class Policy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POLICY_UNSPECIFIED: _ClassVar[Policy]
    POLICY_AUTO: _ClassVar[Policy]
    POLICY_DEEPSEEK: _ClassVar[Policy]
    POLICY_GLOBAL: _ClassVar[Policy]
    POLICY_HIERARCHICAL: _ClassVar[Policy]
ELEMENT_TYPE_UNSPECIFIED: ElementType
ELEMENT_TYPE_FLOAT32: ElementType
ELEMENT_TYPE_FLOAT64: ElementType
ELEMENT_TYPE_FLOAT16: ElementType
ELEMENT_TYPE_BFLOAT16: ElementType
ELEMENT_TYPE_INT32: ElementType
ELEMENT_TYPE_INT64: ElementType
ELEMENT_TYPE_INT16: ElementType
POLICY_UNSPECIFIED: Policy
POLICY_AUTO: Policy
POLICY_DEEPSEEK: Policy
POLICY_GLOBAL: Policy
POLICY_HIERARCHICAL: Policy

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: ElementType
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[ElementType, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Topology(_message.Message):
    __slots__ = ("num_layers", "num_experts", "num_replicas", "num_groups", "num_nodes", "num_gpus", "cost_model")
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    NUM_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    NUM_GROUPS_FIELD_NUMBER: _ClassVar[int]
    NUM_NODES_FIELD_NUMBER: _ClassVar[int]
    NUM_GPUS_FIELD_NUMBER: _ClassVar[int]
    COST_MODEL_FIELD_NUMBER: _ClassVar[int]
    num_layers: int
    num_experts: int
    num_replicas: int
    num_groups: int
    num_nodes: int
    num_gpus: int
    cost_model: TransferCost
    def __init__(self, num_layers: _Optional[int] = ..., num_experts: _Optional[int] = ..., num_replicas: _Optional[int] = ..., num_groups: _Optional[int] = ..., num_nodes: _Optional[int] = ..., num_gpus: _Optional[int] = ..., cost_model: _Optional[_Union[TransferCost, _Mapping]] = ...) -> None: ...

class SolveOptions(_message.Message):
    __slots__ = ("policy", "num_candidates", "seed", "dry_run", "max_moves_per_layer", "balance_tolerance", "fresh", "locality_tolerance", "max_transfer_seconds", "max_incoming_copies_per_gpu", "new_num_gpus")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    NUM_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    MAX_MOVES_PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    BALANCE_TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    FRESH_FIELD_NUMBER: _ClassVar[int]
    LOCALITY_TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    MAX_TRANSFER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_INCOMING_COPIES_PER_GPU_FIELD_NUMBER: _ClassVar[int]
    NEW_NUM_GPUS_FIELD_NUMBER: _ClassVar[int]
    policy: Policy
    num_candidates: int
    seed: int
    dry_run: bool
    max_moves_per_layer: int
    balance_tolerance: float
    fresh: bool
    locality_tolerance: float
    max_transfer_seconds: float
    max_incoming_copies_per_gpu: int
    new_num_gpus: int
    def __init__(self, policy: _Optional[_Union[Policy, str]] = ..., num_candidates: _Optional[int] = ..., seed: _Optional[int] = ..., dry_run: _Optional[bool] = ..., max_moves_per_layer: _Optional[int] = ..., balance_tolerance: _Optional[float] = ..., fresh: _Optional[bool] = ..., locality_tolerance: _Optional[float] = ..., max_transfer_seconds: _Optional[float] = ..., max_incoming_copies_per_gpu: _Optional[int] = ..., new_num_gpus: _Optional[int] = ...) -> None: ...

class TransferCost(_message.Message):
    __slots__ = ("bytes_per_expert", "intra_node_bandwidth", "inter_node_bandwidth")
    BYTES_PER_EXPERT_FIELD_NUMBER: _ClassVar[int]
    INTRA_NODE_BANDWIDTH_FIELD_NUMBER: _ClassVar[int]
    INTER_NODE_BANDWIDTH_FIELD_NUMBER: _ClassVar[int]
    bytes_per_expert: float
    intra_node_bandwidth: float
    inter_node_bandwidth: float
    def __init__(self, bytes_per_expert: _Optional[float] = ..., intra_node_bandwidth: _Optional[float] = ..., inter_node_bandwidth: _Optional[float] = ...) -> None: ...

class RebalanceRequest(_message.Message):
    __slots__ = ("deployment_id", "loads", "topology", "options", "base_version", "prev_phy2log", "cost_model", "unavailable_gpus", "phy2log_only")
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    LOADS_FIELD_NUMBER: _ClassVar[int]
    TOPOLOGY_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREV_PHY2LOG_FIELD_NUMBER: _ClassVar[int]
    COST_MODEL_FIELD_NUMBER: _ClassVar[int]
    UNAVAILABLE_GPUS_FIELD_NUMBER: _ClassVar[int]
    PHY2LOG_ONLY_FIELD_NUMBER: _ClassVar[int]
    deployment_id: str
    loads: Tensor
    topology: Topology
    options: SolveOptions
    base_version: int
    prev_phy2log: Tensor
    cost_model: TransferCost
    unavailable_gpus: _containers.RepeatedScalarFieldContainer[int]
    phy2log_only: bool
    def __init__(self, deployment_id: _Optional[str] = ..., loads: _Optional[_Union[Tensor, _Mapping]] = ..., topology: _Optional[_Union[Topology, _Mapping]] = ..., options: _Optional[_Union[SolveOptions, _Mapping]] = ..., base_version: _Optional[int] = ..., prev_phy2log: _Optional[_Union[Tensor, _Mapping]] = ..., cost_model: _Optional[_Union[TransferCost, _Mapping]] = ..., unavailable_gpus: _Optional[_Iterable[int]] = ..., phy2log_only: _Optional[bool] = ...) -> None: ...

class PolicyLayers(_message.Message):
    __slots__ = ("policy", "layers")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    policy: str
    layers: int
    def __init__(self, policy: _Optional[str] = ..., layers: _Optional[int] = ...) -> None: ...

class PlacementStats(_message.Message):
    __slots__ = ("balancedness_before", "balancedness_after", "imbalance_before", "imbalance_after", "replicas_moved", "moved_per_layer", "solve_seconds", "device", "policies", "batch_layers", "batch_requests", "solver_path", "moved_bytes", "intra_node_share", "estimated_transfer_seconds", "deferred_layers")
    BALANCEDNESS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    BALANCEDNESS_AFTER_FIELD_NUMBER: _ClassVar[int]
    IMBALANCE_BEFORE_FIELD_NUMBER: _ClassVar[int]
    IMBALANCE_AFTER_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_MOVED_FIELD_NUMBER: _ClassVar[int]
    MOVED_PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    SOLVE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    BATCH_LAYERS_FIELD_NUMBER: _ClassVar[int]
    BATCH_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    SOLVER_PATH_FIELD_NUMBER: _ClassVar[int]
    MOVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    INTRA_NODE_SHARE_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_TRANSFER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DEFERRED_LAYERS_FIELD_NUMBER: _ClassVar[int]
    balancedness_before: float
    balancedness_after: float
    imbalance_before: float
    imbalance_after: float
    replicas_moved: int
    moved_per_layer: _containers.RepeatedScalarFieldContainer[int]
    solve_seconds: float
    device: str
    policies: _containers.RepeatedCompositeFieldContainer[PolicyLayers]
    batch_layers: int
    batch_requests: int
    solver_path: str
    moved_bytes: float
    intra_node_share: float
    estimated_transfer_seconds: float
    deferred_layers: int
    def __init__(self, balancedness_before: _Optional[float] = ..., balancedness_after: _Optional[float] = ..., imbalance_before: _Optional[float] = ..., imbalance_after: _Optional[float] = ..., replicas_moved: _Optional[int] = ..., moved_per_layer: _Optional[_Iterable[int]] = ..., solve_seconds: _Optional[float] = ..., device: _Optional[str] = ..., policies: _Optional[_Iterable[_Union[PolicyLayers, _Mapping]]] = ..., batch_layers: _Optional[int] = ..., batch_requests: _Optional[int] = ..., solver_path: _Optional[str] = ..., moved_bytes: _Optional[float] = ..., intra_node_share: _Optional[float] = ..., estimated_transfer_seconds: _Optional[float] = ..., deferred_layers: _Optional[int] = ...) -> None: ...

class Placement(_message.Message):
    __slots__ = ("deployment_id", "version", "topology", "phy2log", "logcnt", "log2phy", "stats", "trigger", "created_unix_ms", "transfers", "gpu_ids")
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TOPOLOGY_FIELD_NUMBER: _ClassVar[int]
    PHY2LOG_FIELD_NUMBER: _ClassVar[int]
    LOGCNT_FIELD_NUMBER: _ClassVar[int]
    LOG2PHY_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    GPU_IDS_FIELD_NUMBER: _ClassVar[int]
    deployment_id: str
    version: int
    topology: Topology
    phy2log: Tensor
    logcnt: Tensor
    log2phy: Tensor
    stats: PlacementStats
    trigger: str
    created_unix_ms: int
    transfers: Tensor
    gpu_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, deployment_id: _Optional[str] = ..., version: _Optional[int] = ..., topology: _Optional[_Union[Topology, _Mapping]] = ..., phy2log: _Optional[_Union[Tensor, _Mapping]] = ..., logcnt: _Optional[_Union[Tensor, _Mapping]] = ..., log2phy: _Optional[_Union[Tensor, _Mapping]] = ..., stats: _Optional[_Union[PlacementStats, _Mapping]] = ..., trigger: _Optional[str] = ..., created_unix_ms: _Optional[int] = ..., transfers: _Optional[_Union[Tensor, _Mapping]] = ..., gpu_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class RebalanceResponse(_message.Message):
    __slots__ = ("placement", "committed")
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    placement: Placement
    committed: bool
    def __init__(self, placement: _Optional[_Union[Placement, _Mapping]] = ..., committed: _Optional[bool] = ...) -> None: ...

class StreamLoadRequest(_message.Message):
    __slots__ = ("deployment_id", "loads", "layer_indices", "topology", "rank", "step")
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    LOADS_FIELD_NUMBER: _ClassVar[int]
    LAYER_INDICES_FIELD_NUMBER: _ClassVar[int]
    TOPOLOGY_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    deployment_id: str
    loads: Tensor
    layer_indices: _containers.RepeatedScalarFieldContainer[int]
    topology: Topology
    rank: int
    step: int
    def __init__(self, deployment_id: _Optional[str] = ..., loads: _Optional[_Union[Tensor, _Mapping]] = ..., layer_indices: _Optional[_Iterable[int]] = ..., topology: _Optional[_Union[Topology, _Mapping]] = ..., rank: _Optional[int] = ..., step: _Optional[int] = ...) -> None: ...

class ReportRejection(_message.Message):
    __slots__ = ("index", "field", "reason")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    index: int
    field: str
    reason: str
    def __init__(self, index: _Optional[int] = ..., field: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class StreamLoadResponse(_message.Message):
    __slots__ = ("accepted", "rejected", "rejections")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    REJECTIONS_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    rejected: int
    rejections: _containers.RepeatedCompositeFieldContainer[ReportRejection]
    def __init__(self, accepted: _Optional[int] = ..., rejected: _Optional[int] = ..., rejections: _Optional[_Iterable[_Union[ReportRejection, _Mapping]]] = ...) -> None: ...

class GetPlacementRequest(_message.Message):
    __slots__ = ("deployment_id",)
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    deployment_id: str
    def __init__(self, deployment_id: _Optional[str] = ...) -> None: ...

class GetPlacementResponse(_message.Message):
    __slots__ = ("placement",)
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    placement: Placement
    def __init__(self, placement: _Optional[_Union[Placement, _Mapping]] = ...) -> None: ...

class WatchPlacementRequest(_message.Message):
    __slots__ = ("deployment_id", "after_version")
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    deployment_id: str
    after_version: int
    def __init__(self, deployment_id: _Optional[str] = ..., after_version: _Optional[int] = ...) -> None: ...

class WatchPlacementResponse(_message.Message):
    __slots__ = ("placement",)
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    placement: Placement
    def __init__(self, placement: _Optional[_Union[Placement, _Mapping]] = ...) -> None: ...

class DeleteDeploymentRequest(_message.Message):
    __slots__ = ("deployment_id",)
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    deployment_id: str
    def __init__(self, deployment_id: _Optional[str] = ...) -> None: ...

class DeleteDeploymentResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: _Optional[bool] = ...) -> None: ...

class ListDeploymentsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeploymentInfo(_message.Message):
    __slots__ = ("deployment_id", "topology", "version", "reports", "imbalance")
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    TOPOLOGY_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    IMBALANCE_FIELD_NUMBER: _ClassVar[int]
    deployment_id: str
    topology: Topology
    version: int
    reports: int
    imbalance: float
    def __init__(self, deployment_id: _Optional[str] = ..., topology: _Optional[_Union[Topology, _Mapping]] = ..., version: _Optional[int] = ..., reports: _Optional[int] = ..., imbalance: _Optional[float] = ...) -> None: ...

class ListDeploymentsResponse(_message.Message):
    __slots__ = ("deployments",)
    DEPLOYMENTS_FIELD_NUMBER: _ClassVar[int]
    deployments: _containers.RepeatedCompositeFieldContainer[DeploymentInfo]
    def __init__(self, deployments: _Optional[_Iterable[_Union[DeploymentInfo, _Mapping]]] = ...) -> None: ...

class AdviseSlotsRequest(_message.Message):
    __slots__ = ("deployment_id", "loads", "topology", "slots_per_gpu", "options")
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    LOADS_FIELD_NUMBER: _ClassVar[int]
    TOPOLOGY_FIELD_NUMBER: _ClassVar[int]
    SLOTS_PER_GPU_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    deployment_id: str
    loads: Tensor
    topology: Topology
    slots_per_gpu: _containers.RepeatedScalarFieldContainer[int]
    options: SolveOptions
    def __init__(self, deployment_id: _Optional[str] = ..., loads: _Optional[_Union[Tensor, _Mapping]] = ..., topology: _Optional[_Union[Topology, _Mapping]] = ..., slots_per_gpu: _Optional[_Iterable[int]] = ..., options: _Optional[_Union[SolveOptions, _Mapping]] = ...) -> None: ...

class SlotAdvice(_message.Message):
    __slots__ = ("slots_per_gpu", "num_replicas", "balancedness", "worst_layer_balancedness")
    SLOTS_PER_GPU_FIELD_NUMBER: _ClassVar[int]
    NUM_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    BALANCEDNESS_FIELD_NUMBER: _ClassVar[int]
    WORST_LAYER_BALANCEDNESS_FIELD_NUMBER: _ClassVar[int]
    slots_per_gpu: int
    num_replicas: int
    balancedness: float
    worst_layer_balancedness: float
    def __init__(self, slots_per_gpu: _Optional[int] = ..., num_replicas: _Optional[int] = ..., balancedness: _Optional[float] = ..., worst_layer_balancedness: _Optional[float] = ...) -> None: ...

class AdviseSlotsResponse(_message.Message):
    __slots__ = ("counts",)
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    counts: _containers.RepeatedCompositeFieldContainer[SlotAdvice]
    def __init__(self, counts: _Optional[_Iterable[_Union[SlotAdvice, _Mapping]]] = ...) -> None: ...
