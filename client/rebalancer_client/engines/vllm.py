"""vLLM: an EPLB policy backed by the service, installed through vLLM's `vllm.general_plugins` entry point.

vLLM (0.33 and later) calls `EPLB_POLICIES[config.policy].rebalance_experts(weight, num_replicas,
num_groups, num_nodes, num_ranks, old_global_expert_indices)` on every EP rank with the same all-reduced
load window sum (`weight` [L, E], CPU) and the map in force ([L, R]), and installs the CPU int64
`phy2log` [L, R] it returns (its own rearrangement moves the weights and derives the logical maps). vLLM
accepts only the policy name "default", so `register()` puts `ServiceEplbPolicy` in that slot and keeps
the policy it replaced as a fallback. The plugin is inert unless REBALANCER_TARGET is set.

Every EP rank must install the same map, or the weight transfers that follow do not match up. Rank 0
of the group plans (service or fallback), commits, and broadcasts the map over a CPU (gloo) group: one
RPC per rearrangement and exact agreement, even when the service answers only some ranks. The group is
vLLM's EPLB group, on which vLLM runs its own EPLB collectives from both the synchronous rearrangement
(main thread) and the asynchronous EPLB worker thread (vLLM 0.33's default); an older vLLM without it
gets the EP group's CPU group on the main thread. Where no collective is safe (a worker thread without
the EPLB group), every rank sends the same request (window, map in force, topology): plans are a pure
function of it (per-layer seeds, no window history when loads are given), rank 0 commits and the others
ask for a dry run; there, an outage that reaches only some ranks leaves those with a local plan. When the service is
unreachable, slower than the deadline or answers something unusable, the policy plans locally (the
library solver when importable, else the replaced vLLM policy, else the map in force), logs once per
outage, counts it in `ServiceEplbPolicy.stats`, and never raises into vLLM's step (only slots that no plan
can fill raise, an AssertionError as from vLLM's own policy). When vLLM's elastic
EP changes the rank count, the deployment refuses the old topology and the policy re-plans elastically
(`new_num_gpus`) from the committed placement: the service moves the deployment to the new layout.

Environment (read when the plugin loads): REBALANCER_TARGET (host:port; turns the plugin on),
REBALANCER_DEPLOYMENT (commit versions to this deployment; without it plans are inline and uncommitted),
REBALANCER_DEADLINE_S (default 2), REBALANCER_TOKEN, REBALANCER_TLS_CA, REBALANCER_POLICY (solver
policy, for the local fallback plan too; the server's default otherwise), REBALANCER_COMMIT (1/0: force
whether this process commits), REBALANCER_VLLM=off (keep vLLM's own policy although REBALANCER_TARGET is set).
"""

from __future__ import annotations

import logging
import os
import pathlib
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import grpc
import numpy as np
from rebalancer_wire.codec import decode, encode_ids
from rebalancer_wire.options import ArgumentError
from rebalancer_wire.topology import topology_violations

from ..client import RebalancerClient
from ..messages import field_violations, rebalance_request

logger = logging.getLogger(__name__)

DEFAULT_DEADLINE_S = 2.0


@dataclass(frozen=True)
class ServiceConfig:
    """Where and how the policy asks the service; `commit` None means "only global rank 0 commits"."""

    target: str
    deployment_id: str | None = None
    deadline_s: float = DEFAULT_DEADLINE_S
    token: str | None = None
    tls_ca: str | None = None
    policy: str | None = None
    commit: bool | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServiceConfig | None:
        """The REBALANCER_* configuration, or None when the plugin should leave vLLM alone."""
        env = os.environ if environ is None else environ
        target = env.get("REBALANCER_TARGET", "").strip()
        if not target or env.get("REBALANCER_VLLM", "on").strip().lower() in ("off", "0", "false", "no"):
            return None
        commit = env.get("REBALANCER_COMMIT")
        return cls(
            target=target,
            deployment_id=env.get("REBALANCER_DEPLOYMENT") or None,
            deadline_s=float(env.get("REBALANCER_DEADLINE_S", DEFAULT_DEADLINE_S)),
            token=env.get("REBALANCER_TOKEN") or None,
            tls_ca=env.get("REBALANCER_TLS_CA") or None,
            policy=env.get("REBALANCER_POLICY") or None,
            commit=None if commit is None else commit.strip().lower() in ("1", "true", "yes", "on"),
        )


@dataclass
class PolicyStats:
    """What the policy did in this process: how its calls were answered, and the last of each kind."""

    calls: int = 0
    service_plans: int = 0  # answered by the service
    fallbacks: int = 0  # planned locally; `outages` counts the runs of them
    outages: int = 0
    agreed: int = 0  # maps shared by broadcast from the EP group's rank 0
    committed_version: int = 0  # the last version this process committed
    # The last service plan: RPC wall time, and the solve (with transfer planning) the service reports.
    last_round_trip_s: float = 0.0
    last_solve_s: float = 0.0
    # The last fallback: why, and what planned it ("library", "vllm" or "in force").
    last_error: str = ""
    last_fallback: str = ""
    in_outage: bool = field(default=False, repr=False)


@dataclass(frozen=True)
class PlanCall:
    """One `rebalance_experts` call as vLLM made it: `weight` as given, `loads` its numpy [L, E], and
    `old` the map in force [L, R] int64, or None where it cannot be a starting point."""

    weight: Any
    loads: np.ndarray
    num_replicas: int
    num_groups: int
    num_nodes: int
    num_ranks: int
    old: np.ndarray | None

    def valid(self, phy2log: np.ndarray) -> bool:
        """[L, R] integer expert ids in [0, E) hosting every expert of every layer."""
        num_layers, num_experts = self.loads.shape
        if phy2log.shape != (num_layers, self.num_replicas) or phy2log.dtype.kind not in "iu":
            return False
        if ((phy2log < 0) | (phy2log >= num_experts)).any():
            return False
        offsets = np.arange(num_layers, dtype=np.int64)[:, None] * num_experts
        return bool(np.bincount((phy2log + offsets).ravel(), minlength=num_layers * num_experts).all())

    def trivial(self) -> np.ndarray:
        """Slot p hosts expert p % E: the map of last resort."""
        num_layers, num_experts = self.loads.shape
        return np.tile(np.arange(self.num_replicas, dtype=np.int64) % num_experts, (num_layers, 1))


def _rescaled(error: grpc.RpcError, request: Any, call: PlanCall) -> Any:
    """The request again as an elastic re-plan, when the deployment refused the topology because vLLM
    changed its EP size (elastic EP: same slots per rank, `num_ranks` ranks now): from the committed
    placement, for `num_ranks` GPUs, committed like the first (the service moves the deployment to the
    new layout). None for any other refusal."""
    if not request.deployment_id or error.code() != grpc.StatusCode.INVALID_ARGUMENT:
        return None
    if "topology" not in (field for field, _ in field_violations(error)):
        return None
    rescaled = type(request)()
    rescaled.CopyFrom(request)
    rescaled.ClearField("topology")
    rescaled.ClearField("prev_phy2log")  # the engine's map is of the old size: the committed one serves
    rescaled.options.new_num_gpus = call.num_ranks
    return rescaled


def _narrow(loads: np.ndarray) -> np.ndarray:
    """Integer load sums as int32 when they fit (exact, and half the bytes on the wire: the service reads
    any integer type); anything else as it is."""
    if loads.dtype.kind in "iu" and loads.size and loads.min() >= 0 and loads.max() <= np.iinfo(np.int32).max:
        return loads.astype(np.int32)
    return loads


def planning_layout(num_groups: int, num_nodes: int, num_ranks: int) -> tuple[int, int]:
    """(groups, nodes) of the service's topology: the groups only when they split over the nodes (else one
    global plan, as the published algorithm reads them), the nodes whenever they split the ranks (the
    transfer plan fetches within a node and costs the links by them, even for a global plan)."""
    if num_nodes < 1 or num_groups < 1 or num_ranks % num_nodes:
        return 1, 1
    return (num_groups if num_groups % num_nodes == 0 else 1), num_nodes


def _is_leader(config: ServiceConfig) -> bool:
    if config.commit is not None:
        return config.commit
    try:
        import torch.distributed as dist
    except ImportError:
        return True
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def agreement_group() -> Any:
    """The process group whose ranks must install the same map, when a collective is safe here, else None.

    vLLM's EPLB group (`get_eplb_group().cpu_group`) first: vLLM runs its own EPLB collectives on it, from
    the asynchronous EPLB worker thread too (the all-reduce right after the policy call), so a broadcast
    there is ordered like them on every rank. Without it (an older vLLM, or outside vLLM), the EP CPU
    group or the default group, on the main thread only.
    """
    try:
        import torch.distributed as dist
    except ImportError:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = _eplb_cpu_group()
    if group is None:
        if threading.current_thread() is not threading.main_thread():
            return None
        group = _ep_cpu_group(dist)
    return group if dist.get_world_size(group) > 1 else None


def _eplb_cpu_group() -> Any:
    try:
        from vllm.distributed.parallel_state import get_eplb_group

        return get_eplb_group().cpu_group
    except Exception:  # no vLLM, a vLLM without the group, or EPLB off
        return None


def _ep_cpu_group(dist: Any) -> Any:
    try:
        from vllm.distributed.parallel_state import get_ep_group

        return get_ep_group().cpu_group
    except Exception:
        return dist.group.WORLD


class ServiceEplbPolicy:
    """vLLM EPLB policy whose plans come from the rebalancer service; configure with `configure()`."""

    config: ClassVar[ServiceConfig | None] = None
    fallback_policy: ClassVar[Any] = None
    stats: ClassVar[PolicyStats] = PolicyStats()
    _client: ClassVar[RebalancerClient | None] = None
    _lock: ClassVar[threading.Lock] = threading.Lock()
    # The deployment's topology as the service last answered (after an EP size change it is the layout the
    # service moved the deployment to, whose groups and nodes vLLM's arguments do not restate).
    _layout: ClassVar[Any] = None

    @classmethod
    def configure(cls, config: ServiceConfig, fallback_policy: Any = None) -> None:
        """Point the policy at a service; `fallback_policy` is the vLLM policy class it replaces."""
        with cls._lock:
            if cls._client is not None:
                cls._client.close()
            cls._client = None
            cls._layout = None
            cls.config = config
            cls.fallback_policy = fallback_policy
            cls.stats = PolicyStats()

    @classmethod
    def client(cls) -> RebalancerClient:
        with cls._lock:
            if cls._client is None:
                config = cls.config
                if config is None:
                    raise RuntimeError("ServiceEplbPolicy is not configured (REBALANCER_TARGET unset)")
                credentials = None
                if config.tls_ca:
                    credentials = grpc.ssl_channel_credentials(pathlib.Path(config.tls_ca).read_bytes())
                cls._client = RebalancerClient(
                    config.target, config.deadline_s, credentials=credentials, token=config.token
                )
            return cls._client

    @classmethod
    def rebalance_experts(
        cls,
        weight: Any,
        num_replicas: int,
        num_groups: int,
        num_nodes: int,
        num_ranks: int,
        old_global_expert_indices: Any = None,
    ) -> Any:
        """vLLM's policy signature: `weight` [L, E] window sum, `old_global_expert_indices` [L, R] or None
        -> CPU int64 `phy2log` [L, R] (a torch tensor: vLLM runs with torch)."""
        import torch

        cls.stats.calls += 1
        loads = weight.detach().cpu().numpy() if hasattr(weight, "detach") else np.asarray(weight)
        # Slots no plan can fill (fewer than the experts, or not a whole number per rank) are a configuration
        # error that vLLM's own policy asserts against, not an outage: raised the same way (an AssertionError)
        # before any planning, rather than answered with a map of last resort. Groups and nodes that do not
        # split stay lenient: the plan is global (`planning_layout`).
        if loads.ndim != 2:
            raise ArgumentError("weight", f"must be 2-D [layers, experts], got shape {loads.shape}")
        violations = topology_violations(*loads.shape, num_replicas, 1, 1, num_ranks)
        if violations:
            raise ArgumentError(*violations[0])
        call = PlanCall(weight, loads, num_replicas, num_groups, num_nodes, num_ranks, None)
        if old_global_expert_indices is not None:
            old = np.asarray(old_global_expert_indices.detach().cpu().numpy(), dtype=np.int64)
            # Elastic scale-up pads new slots with -1: such a map cannot be a starting point.
            if call.valid(old):
                call = replace(call, old=old)
        group = agreement_group()
        if group is None:
            return torch.from_numpy(cls._plan(call, commit=None))
        import torch.distributed as dist

        leader = dist.get_rank(group) == 0
        if leader:
            shared = torch.from_numpy(cls._plan(call, commit=True))
        else:
            shared = torch.empty((loads.shape[0], num_replicas), dtype=torch.int64)
        try:
            dist.broadcast(shared, src=dist.get_global_rank(group, 0), group=group)
        except Exception as exc:  # a broken group fails vLLM's own collectives next; plan alone meanwhile
            logger.error("could not share the EPLB map over the EP group: %s", exc)
            return torch.from_numpy(cls._plan(call, commit=False))
        cls.stats.agreed += 1
        return shared

    @classmethod
    def preserve_intragpu_slots(cls, phy2log: np.ndarray, num_ranks: int, old_phy2log: np.ndarray) -> np.ndarray:
        """vLLM's `DefaultEplbPolicy.preserve_intragpu_slots`, so the plugin stands in for that class's
        whole interface: each copy a rank keeps stays in its old slot, arrivals fill the freed ones in
        order (what the service's plans already do). phy2log unchanged when the ranks do not split it."""
        phy2log = np.asarray(phy2log)
        if num_ranks <= 0 or phy2log.shape[1] % num_ranks:
            return phy2log
        try:
            import torch
            from rebalancer.solver.migration import keep_old_slots
        except ImportError:  # the client alone: the replaced vLLM policy's own, else as planned
            fallback = getattr(cls.fallback_policy, "preserve_intragpu_slots", None)
            return phy2log if fallback is None else fallback(phy2log, num_ranks, old_phy2log)
        kept = keep_old_slots(torch.as_tensor(np.asarray(old_phy2log)), torch.as_tensor(phy2log), num_ranks)
        return kept.numpy()

    @classmethod
    def _plan(cls, call: PlanCall, *, commit: bool | None) -> np.ndarray:
        """The service's plan, else a local one: [L, R] int64. `commit` None: decided by rank."""
        try:
            phy2log = cls._plan_on_service(call, commit)
        except Exception as exc:  # never into the step loop: every failure is a fallback
            cls._outage(exc)
            phy2log = cls._plan_locally(call)
        else:
            cls._recovered()
        return np.ascontiguousarray(phy2log, dtype=np.int64)

    @classmethod
    def _plan_on_service(cls, call: PlanCall, commit: bool | None) -> np.ndarray:
        """One Rebalance with the window and the map in force; of the answer only phy2log is decoded."""
        config = cls.config
        if config is None:
            raise RuntimeError("not configured")
        if commit is None or config.commit is not None:
            commit = _is_leader(config)
        groups, nodes = planning_layout(call.num_groups, call.num_nodes, call.num_ranks)
        request = rebalance_request(
            _narrow(call.loads),
            num_replicas=call.num_replicas,
            num_groups=groups,
            num_nodes=nodes,
            num_gpus=call.num_ranks,
            deployment_id=config.deployment_id,
            dry_run=bool(config.deployment_id) and not commit,
            policy=config.policy,
            phy2log_only=True,  # vLLM installs phy2log and derives the rest itself
        )
        if call.old is not None:  # expert ids: int16 on the wire, a quarter of the int64 bytes
            request.prev_phy2log.CopyFrom(encode_ids(call.old))
        layout = cls._layout
        if layout is not None and (layout.num_replicas, layout.num_gpus) == (call.num_replicas, call.num_ranks):
            request.topology.CopyFrom(layout)  # the deployment's, as an elastic re-plan left it
        started = time.perf_counter()
        try:
            response = cls.client().rebalance_response(request, timeout=config.deadline_s)
        except grpc.RpcError as error:
            rescaled = _rescaled(error, request, call)
            if rescaled is None:
                raise
            response = cls.client().rebalance_response(rescaled, timeout=config.deadline_s)
        cls.stats.last_round_trip_s = time.perf_counter() - started
        placement = response.placement
        if config.deployment_id:
            cls._layout = placement.topology
        cls.stats.last_solve_s = placement.stats.solve_seconds
        phy2log = np.array(decode(placement.phy2log), dtype=np.int64)
        if not call.valid(phy2log):
            raise ValueError(f"the service returned an unusable map of shape {list(phy2log.shape)}")
        cls.stats.service_plans += 1
        if response.committed:
            cls.stats.committed_version = placement.version
        return phy2log

    @classmethod
    def _outage(cls, exc: Exception) -> None:
        stats = cls.stats
        stats.fallbacks += 1
        if isinstance(exc, grpc.RpcError):
            stats.last_error = f"{exc.code().name}: {exc.details()}"
        else:
            stats.last_error = f"{type(exc).__name__}: {exc}"
        if not stats.in_outage:
            stats.in_outage = True
            stats.outages += 1
            target = cls.config.target if cls.config else "?"
            logger.warning(
                "rebalancer service %s unusable (%s): planning locally until it answers", target, stats.last_error
            )

    @classmethod
    def _recovered(cls) -> None:
        if cls.stats.in_outage:
            cls.stats.in_outage = False
            logger.warning("rebalancer service answers again (%d local plans so far)", cls.stats.fallbacks)

    @classmethod
    def _plan_locally(cls, call: PlanCall) -> np.ndarray:
        """The library solver, else the replaced vLLM policy, else the map in force (or the trivial one)."""
        import torch

        previous = None if call.old is None else torch.from_numpy(call.old)
        # The policy the operator chose for the service (REBALANCER_POLICY) holds for the local plan too.
        chosen = {"policy": cls.config.policy} if cls.config is not None and cls.config.policy else {}
        try:
            from rebalancer.solver import solve

            result = solve(
                torch.as_tensor(call.loads, dtype=torch.float64),
                call.num_replicas,
                call.num_groups,
                call.num_nodes,
                call.num_ranks,
                device="cpu",
                prev_phy2log=previous,
                **chosen,
            )
            cls.stats.last_fallback = "library"
            return result.phy2log.cpu().numpy()
        except Exception as exc:
            logger.debug("library fallback failed: %s", exc)
        if cls.fallback_policy is not None:
            try:
                phy2log = cls.fallback_policy.rebalance_experts(
                    call.weight, call.num_replicas, call.num_groups, call.num_nodes, call.num_ranks, previous
                )
                phy2log = np.asarray(phy2log.cpu().numpy(), dtype=np.int64)
                if call.valid(phy2log):
                    cls.stats.last_fallback = "vllm"
                    return phy2log
            except Exception as exc:
                logger.debug("vLLM policy fallback failed: %s", exc)
        cls.stats.last_fallback = "in force"
        return call.old if call.old is not None else call.trivial()


def register() -> None:
    """The `vllm.general_plugins` entry point: runs in every vLLM process, possibly more than once.

    Takes the "default" slot of vLLM's EPLB_POLICIES when REBALANCER_TARGET is set; does nothing otherwise
    or outside vLLM.
    """
    try:
        config = ServiceConfig.from_env()
    except ValueError as exc:  # a typo in an environment variable must not stop vLLM from starting
        logger.error("REBALANCER_* settings unusable, keeping vLLM's own EPLB policy: %s", exc)
        return
    if config is None:
        return
    try:
        from vllm.distributed.eplb import policy as eplb_policy
    except ImportError as exc:
        logger.warning("REBALANCER_TARGET is set but vLLM's EPLB policies are not importable: %s", exc)
        return
    current = eplb_policy.EPLB_POLICIES.get("default")
    if current is not ServiceEplbPolicy:
        ServiceEplbPolicy.configure(config, fallback_policy=current)
        abstract = getattr(eplb_policy, "AbstractEplbPolicy", None)
        if abstract is not None:
            abstract.register(ServiceEplbPolicy)
        eplb_policy.EPLB_POLICIES["default"] = ServiceEplbPolicy
        logger.info("vLLM EPLB plans come from the rebalancer service at %s", config.target)
