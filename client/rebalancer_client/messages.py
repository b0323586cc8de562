"""Request building and client-side argument checks, shared by the sync, asyncio and sharded clients.

Obviously bad input (NaN/inf/negative loads, not 2-D, missing or inconsistent topology) raises
`ValueError` naming the argument before anything is sent; the server validates everything again and
answers INVALID_ARGUMENT with field violations for what only it can judge.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping
from typing import Any

import grpc
import numpy as np
from google.rpc import error_details_pb2, status_pb2
from rebalancer_wire.codec import as_numpy, encode
from rebalancer_wire.cost import COST_FIELDS, CostModel
from rebalancer_wire.options import ArgumentError
from rebalancer_wire.options import check as check_options
from rebalancer_wire.options import fill_message as fill_options
from rebalancer_wire.topology import FIELDS as TOPOLOGY_FIELDS
from rebalancer_wire.topology import Topology
from rebalancer_wire.v1 import rebalancer_pb2 as pb

TopologyLike = Topology | Mapping[str, int] | pb.Topology


def loads_array(value: Any, name: str = "loads") -> np.ndarray:
    """Loads [L, E] as a numpy array (numpy, torch tensor or nested lists), checked finite and >= 0."""
    try:
        array = as_numpy(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a 2-D array of loads: {exc}") from exc
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D [layers, experts], got shape {list(array.shape)}")
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{name} must hold real numbers, got dtype {array.dtype}")
    if array.size == 0:
        raise ValueError(f"{name} must have at least one layer and one expert, got shape {list(array.shape)}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ValueError(f"{name} must be finite: found NaN or inf")
    if array.dtype.kind in "if" and (array < 0).any():
        raise ValueError(f"{name} must be non-negative: found negative loads")
    return array


def make_topology(
    num_layers: int,
    num_experts: int,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    cost_model: CostModel | Mapping[str, float] | None = None,
) -> Topology:
    """A Topology checked by the layout rules the server and solver apply (ArgumentError otherwise).
    `cost_model`: a CostModel or a mapping of its fields (the others keep their defaults)."""
    if isinstance(cost_model, Mapping):
        unknown = sorted(set(cost_model) - set(COST_FIELDS))
        if unknown:
            raise ValueError(f"cost_model has unknown keys {unknown} (known: {list(COST_FIELDS)})")
        cost_model = CostModel(**cost_model)
    topology = Topology(num_layers, num_experts, num_replicas, num_groups, num_nodes, num_gpus, cost_model)
    violations = topology.violations()
    if violations:
        raise ArgumentError(*violations[0])
    return Topology(*(int(getattr(topology, name)) for name in TOPOLOGY_FIELDS), cost_model=cost_model)


def as_topology(value: TopologyLike, loads_shape: tuple[int, ...] | None = None) -> Topology:
    """Topology from a Topology, mapping or message; num_layers/num_experts default to the loads' shape."""
    if isinstance(value, pb.Topology):
        fields = Topology.from_proto(value).__dict__
    elif isinstance(value, Topology):
        fields = dict(value.__dict__)
    elif isinstance(value, Mapping):
        unknown = set(value) - {f.name for f in pb.Topology.DESCRIPTOR.fields}
        if unknown:
            raise ValueError(f"topology has unknown keys {sorted(unknown)}")
        fields = {"num_groups": 1, "num_nodes": 1, **value}
    else:
        raise ValueError(f"topology must be a Topology or a mapping, got {type(value).__name__}")
    if loads_shape is not None and len(loads_shape) == 2:
        fields["num_layers"] = fields.get("num_layers") or loads_shape[0]
        fields["num_experts"] = fields.get("num_experts") or loads_shape[1]
    missing = [name for name in ("num_layers", "num_experts", "num_replicas", "num_gpus") if not fields.get(name)]
    if missing:
        raise ValueError(f"topology is missing {', '.join(missing)}")
    return make_topology(**fields)


def rebalance_request(
    loads: Any = None,
    *,
    num_replicas: int | None = None,
    num_groups: int = 1,
    num_nodes: int = 1,
    num_gpus: int | None = None,
    deployment_id: str | None = None,
    base_version: int | None = None,
    prev_phy2log: Any = None,
    unavailable_gpus: Iterable[int] | None = None,
    cost_model: Mapping[str, float] | None = None,
    phy2log_only: bool = False,
    **options: Any,
) -> pb.RebalanceRequest:
    """Build and check a RebalanceRequest; `options` are the solve options (`rebalancer_wire.options`,
    e.g. policy, num_candidates, seed, dry_run, max_moves_per_layer). `unavailable_gpus`: failed GPU ids
    (elastic EP); `cost_model`: any of bytes_per_expert, intra_node_bandwidth, inter_node_bandwidth
    (bytes/s per GPU) for the transfer plan and budgets; `phy2log_only`: the answer leaves out logcnt
    and log2phy (the client derives them). See `RebalancerClient.rebalance`."""
    if loads is None and not deployment_id:
        raise ValueError("loads are required without deployment_id")
    request = pb.RebalanceRequest(deployment_id=deployment_id or "", phy2log_only=phy2log_only)
    array = None if loads is None else loads_array(loads)
    if array is not None:
        request.loads.CopyFrom(encode(array))
    topology = _inline_topology(array, deployment_id, num_replicas, num_groups, num_nodes, num_gpus)
    if topology is not None:
        request.topology.CopyFrom(topology.to_proto())
    if prev_phy2log is not None:
        request.prev_phy2log.CopyFrom(encode(_phy2log_array(prev_phy2log)))
    if unavailable_gpus is not None:
        request.unavailable_gpus.extend(_gpu_ids(unavailable_gpus))
    for name, value in _cost_fields(cost_model or {}).items():
        setattr(request.cost_model, name, value)
    if base_version is not None:
        if base_version < 0:
            raise ValueError(f"base_version must be >= 0, got {base_version}")
        request.base_version = base_version
    fill_options(request.options, check_options(**options))
    return request


def _inline_topology(
    array: np.ndarray | None,
    deployment_id: str | None,
    num_replicas: int | None,
    num_groups: int,
    num_nodes: int,
    num_gpus: int | None,
) -> Topology | None:
    """The topology of inline loads [L, E]; None when the request plans from a deployment's own one."""
    if num_replicas is None and num_gpus is None:
        if array is not None and not deployment_id:
            raise ValueError("num_replicas and num_gpus are required with inline loads and no deployment_id")
        return None
    if num_replicas is None or num_gpus is None:
        raise ValueError("num_replicas and num_gpus must be given together")
    if array is None:
        raise ValueError("num_replicas/num_gpus describe inline loads; pass loads or omit them")
    layers, experts = array.shape
    return make_topology(layers, experts, num_replicas, num_groups, num_nodes, num_gpus)


def _phy2log_array(value: Any) -> np.ndarray:
    """A placement in force [L, R] as int64."""
    previous = as_numpy(value)
    if previous.ndim != 2:
        raise ValueError(f"prev_phy2log must be 2-D [layers, replicas], got shape {list(previous.shape)}")
    return previous.astype(np.int64)


def _gpu_ids(value: Iterable[int]) -> list[int]:
    """Failed GPU ids, each >= 0."""
    ids = [int(g) for g in value]
    if any(g < 0 for g in ids):
        raise ValueError(f"unavailable_gpus must be GPU ids >= 0, got {ids}")
    return ids


def _cost_fields(cost_model: Mapping[str, float | None]) -> dict[str, float]:
    """The cost model's given fields as floats (None: the server's default); unknown keys are refused."""
    known = {f.name for f in pb.TransferCost.DESCRIPTOR.fields}
    unknown = sorted(set(cost_model) - known)
    if unknown:
        raise ValueError(f"cost_model has unknown keys {unknown} (known: {sorted(known)})")
    return {name: float(value) for name, value in cost_model.items() if value is not None}


def advise_request(
    loads: Any = None,
    *,
    num_gpus: int | None = None,
    num_groups: int = 1,
    num_nodes: int = 1,
    num_replicas: int | None = None,
    deployment_id: str | None = None,
    slots_per_gpu: Iterable[int] = (),
    **options: Any,
) -> pb.AdviseSlotsRequest:
    """Build and check an AdviseSlotsRequest: inline loads [L, E] with num_gpus (num_replicas defaults to
    the smallest layout that hosts every expert), or a deployment's window; `options` as for rebalance."""
    if loads is None and not deployment_id:
        raise ValueError("loads are required without deployment_id")
    request = pb.AdviseSlotsRequest(deployment_id=deployment_id or "")
    if loads is not None:
        array = loads_array(loads)
        request.loads.CopyFrom(encode(array))
        if num_gpus is not None:
            layers, experts = array.shape
            replicas = num_replicas if num_replicas is not None else -(-experts // num_gpus) * num_gpus
            topology = make_topology(layers, experts, replicas, num_groups, num_nodes, num_gpus)
            request.topology.CopyFrom(topology.to_proto())
        elif not deployment_id:
            raise ValueError("num_gpus is required with inline loads and no deployment_id")
    counts = [int(count) for count in slots_per_gpu]
    if any(count < 1 for count in counts):
        raise ArgumentError("slots_per_gpu", f"must all be >= 1, got {counts}")
    request.slots_per_gpu.extend(counts)
    fill_options(request.options, check_options(**options))
    return request


def load_request(
    deployment_id: str, index: int, report: Any, *, topology: TopologyLike | None = None, rank: int = 0
) -> pb.StreamLoadRequest:
    """The StreamLoad message of the `index`-th report of a stream; the topology rides on report 0 (the
    server needs it there for a new deployment and checks that it matches afterwards).

    A report is an array [L, E] (all layers), a pair (layer_indices, array [k, E]), or a dict with
    `loads` and optional `layer_indices` and `step`. The step defaults to the report's position.
    """
    if not deployment_id:
        raise ValueError("deployment_id is required")
    layer_indices: Any = ()
    step = index
    if isinstance(report, Mapping):
        if "loads" not in report:
            raise ValueError(f"reports[{index}] has no 'loads'")
        loads, layer_indices, step = (
            report["loads"],
            report.get("layer_indices", ()),
            report.get("step", index),
        )
    elif isinstance(report, tuple) and len(report) == 2:
        layer_indices, loads = report
    else:
        loads = report
    array = loads_array(loads, name=f"reports[{index}]")
    indices = np.asarray(layer_indices if layer_indices is not None else (), dtype=np.int64).reshape(-1)
    if (indices < 0).any():
        raise ValueError(f"reports[{index}] has negative layer indices")
    if indices.size and indices.size != array.shape[0]:
        raise ValueError(f"reports[{index}] has {indices.size} layer indices for {array.shape[0]} rows of loads")
    request = pb.StreamLoadRequest(
        deployment_id=deployment_id,
        loads=encode(array),
        rank=rank,
        step=int(step),
        layer_indices=indices.tolist(),
    )
    if index == 0 and topology is not None:
        request.topology.CopyFrom(as_topology(topology, None if indices.size else array.shape).to_proto())
    return request


class _ReportStream:
    """StreamLoad messages of a stream of reports, remembering the error that ended it; `stream_args`
    (topology, rank) are those of `load_request`.

    gRPC consumes request iterators on its own thread and turns their exceptions into a CANCELLED
    status; the clients re-raise `error` instead, so a bad report reads as the ValueError it is.
    """

    def __init__(self, deployment_id: str, reports: Any, **stream_args: Any) -> None:
        if not deployment_id:
            raise ValueError("deployment_id is required")
        self._reports = reports
        self._make = functools.partial(load_request, deployment_id, **stream_args)
        self.error: Exception | None = None

    def request(self, index: int, report: Any) -> pb.StreamLoadRequest:
        """The message of the `index`-th report; a failure is kept in `error` before it propagates."""
        try:
            return self._make(index, report)
        except Exception as exc:
            self.error = exc
            raise


class LoadRequests(_ReportStream):
    """The messages of an iterable of reports (see `_ReportStream`), for the sync clients."""

    def __init__(self, deployment_id: str, reports: Iterable[Any], **stream_args: Any) -> None:
        super().__init__(deployment_id, enumerate(reports), **stream_args)

    def __iter__(self) -> Iterator[pb.StreamLoadRequest]:
        return self

    def __next__(self) -> pb.StreamLoadRequest:
        return self.request(*next(self._reports))


class AsyncLoadRequests(_ReportStream):
    """The messages of an async iterable of reports (see `_ReportStream`), for the asyncio client."""

    def __init__(self, deployment_id: str, reports: AsyncIterable[Any], **stream_args: Any) -> None:
        super().__init__(deployment_id, reports, **stream_args)

    async def __aiter__(self) -> AsyncIterator[pb.StreamLoadRequest]:
        index = 0
        async for report in self._reports:
            yield self.request(index, report)
            index += 1


def field_violations(error: grpc.RpcError) -> list[tuple[str, str]]:
    """(field, description) pairs of the `google.rpc.BadRequest` an INVALID_ARGUMENT error carries.

    Works for sync and asyncio errors alike: both expose the trailing `grpc-status-details-bin` entry.
    """
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            violations = []
            for detail in status.details:
                if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    bad_request = error_details_pb2.BadRequest()
                    detail.Unpack(bad_request)
                    violations += [(v.field, v.description) for v in bad_request.field_violations]
            return violations
    return []
