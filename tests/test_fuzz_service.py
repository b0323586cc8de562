"""Fuzzing the service with malformed input (issue 7): over a thousand bad requests and a thousand bad
telemetry reports per run against one in-process server.

Every bad request must come back with the right status (INVALID_ARGUMENT with a `google.rpc.BadRequest`
naming the field, NOT_FOUND, FAILED_PRECONDITION), every bad report must be rejected in-band naming
its field while the good report in the same stream is accepted, the server must stay SERVING, and no
rejected input may change a window or a placement: the deployments, their versions, window sums and
placements are compared before and after every example; a refused input registers nothing.

Raw bytes, truncated and corrupted messages go to every RPC of the server (the rebalancer service,
health and reflection) through a raw channel: whatever arrives, the status is never UNKNOWN or
INTERNAL, an undecodable message is INVALID_ARGUMENT (in StreamLoad: rejected in-band while the reports
around it are taken), and nothing changes.

Messages beyond --max-message-bytes are refused by gRPC itself with RESOURCE_EXHAUSTED before any
handler runs, so they carry no BadRequest; `test_oversized_messages_are_resource_exhausted` covers them.
The totals are written to the terminal (under -q too) for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import math
from collections import Counter

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rebalancer.service.validation import DEPLOYMENT_ID
from rebalancer_wire.codec import encode
from rebalancer_wire.v1 import rebalancer_pb2 as pb
from service_harness import (
    EXPERTS,
    LAYERS,
    REPLICAS,
    TOPOLOGY,
    ServerThread,
    field_violations,
    report,
    skewed_loads,
    tampered_tensor,
)

MAX_MESSAGE_BYTES = 1 << 20
MAX_ELEMENTS = 1 << 16
BASE = "fuzz-base"  # has a window and a committed placement (version 1): must never change
SINK = "fuzz-sink"  # receives the one good report of every fuzzed stream
# A small valid inline problem: 2 layers of 8 experts on 12 slots, 2 groups, 2 nodes, 4 GPUs.
INLINE = dict(num_layers=2, num_experts=8, num_replicas=12, num_groups=2, num_nodes=2, num_gpus=4)
INVALID = grpc.StatusCode.INVALID_ARGUMENT
TOPOLOGY_FIELDS = ("num_layers", "num_experts", "num_replicas", "num_groups", "num_nodes", "num_gpus")
FUZZ_SETTINGS = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck))

totals: Counter = Counter()


@pytest.fixture(scope="module")
def server(tmp_path_factory, pytestconfig):
    config = dict(max_message_bytes=MAX_MESSAGE_BYTES, max_tensor_elements=MAX_ELEMENTS, batch_window_ms=0.0)
    with ServerThread(str(tmp_path_factory.mktemp("fuzz")), **config) as running:
        running.stub.StreamLoad(iter([report(BASE, skewed_loads(1), topology=TOPOLOGY), report(BASE, skewed_loads(2))]))
        running.stub.StreamLoad(iter([report(SINK, skewed_loads(3), topology=TOPOLOGY)]))
        assert running.stub.Rebalance(pb.RebalanceRequest(deployment_id=BASE)).placement.version == 1
        yield running
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
    if capture is None or not totals["requests"]:
        return
    with capture.global_and_fixture_disabled():
        print(
            f"\nfuzz totals: {totals['requests']} malformed requests "
            f"({', '.join(f'{k[5:]} {v}' for k, v in sorted(totals.items()) if k.startswith('code:'))}), "
            f"{totals['reports']} malformed reports rejected in-band in {totals['streams']} streams, "
            f"{totals['oversized']} oversized messages, {totals['raw']} raw messages on every RPC "
            f"({totals['raw_undecodable']} undecodable), 0 UNKNOWN or INTERNAL; "
            "server SERVING, no window or placement changed"
        )


def state(server: ServerThread) -> dict:
    """What a rejected input must not change: per deployment its topology, version, window (report count
    and exact sum) and placement maps. Deployments that appeared must be empty (see the module doc)."""
    listing = server.stub.ListDeployments(pb.ListDeploymentsRequest(), timeout=10)
    seen = {}
    for info in listing.deployments:
        if info.deployment_id == SINK:
            continue
        window = server.call(server.server.windows.snapshot(info.deployment_id))
        seen[info.deployment_id] = (
            info.topology.SerializeToString(),
            info.version,
            info.reports,
            window.loads.numpy().tobytes() if window is not None else b"",
        )
    placement = server.stub.GetPlacement(pb.GetPlacementRequest(deployment_id=BASE), timeout=10).placement
    return {"deployments": seen, "placement": placement.SerializeToString()}


def assert_unchanged(server: ServerThread, before: dict) -> None:
    after = state(server)
    assert after["placement"] == before["placement"]
    assert after["deployments"] == before["deployments"]


def assert_serving(server: ServerThread) -> None:
    health = health_pb2_grpc.HealthStub(server.channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    dry_run = pb.RebalanceRequest(deployment_id=BASE, options=pb.SolveOptions(dry_run=True))
    assert server.stub.Rebalance(dry_run, timeout=30).placement.stats.balancedness_after > 0


# ---- malformed tensors: (Tensor message, violated subfield) --------------------------------------------


@st.composite
def bad_tensor(draw, shape: tuple[int, int]) -> tuple[pb.Tensor, str]:
    """A loads tensor for `shape` broken in one way; returns it with the subfield the server must name."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    loads = rng.random(shape).astype(draw(st.sampled_from([np.float32, np.float64, np.float16])))
    kind = draw(st.sampled_from(["dtype", "bytes", "ndim", "zero_dim", "negative_dim", "many_dims", "huge", "value"]))
    if kind == "dtype":
        unknown = st.integers(max(pb.ElementType.values()) + 1, 2**31 - 1)
        return tampered_tensor(loads, dtype=draw(st.just(pb.ELEMENT_TYPE_UNSPECIFIED) | unknown)), "dtype"
    if kind == "bytes":
        data = encode(loads).data
        cut = draw(st.integers(1, len(data)))
        data = data[:-cut] if draw(st.booleans()) else data + bytes(draw(st.integers(1, 64)))
        return tampered_tensor(loads, data=data), "data"
    if kind == "ndim":
        flat = loads.reshape(-1) if draw(st.booleans()) else loads.reshape(1, *shape)
        return encode(flat), "shape"
    if kind == "zero_dim":
        empty = np.zeros((0, shape[1]) if draw(st.booleans()) else (shape[0], 0), loads.dtype)
        return encode(empty), "shape"
    if kind == "negative_dim":
        return tampered_tensor(loads, shape=[-draw(st.integers(1, 2**40)), shape[1]]), "shape"
    if kind == "many_dims":
        return tampered_tensor(loads, shape=[1] * draw(st.integers(9, 64))), "shape"
    if kind == "huge":  # declared >= 10**9 elements over a few bytes: refused before anything is allocated
        rows = draw(st.integers(10**9 // shape[1] + 1, 2**40))
        return tampered_tensor(loads, shape=[rows, shape[1]]), "shape"
    index = (draw(st.integers(0, shape[0] - 1)), draw(st.integers(0, shape[1] - 1)))
    loads[index] = draw(st.sampled_from([math.nan, math.inf, -math.inf]) | st.floats(-6e4, -1e-3))
    return encode(loads), "data"


def valid_loads(draw, shape: tuple[int, int]) -> np.ndarray:
    return np.random.default_rng(draw(st.integers(0, 2**32 - 1))).random(shape).astype(np.float32)


# ---- malformed requests: (RPC name, request, expected code, expected field or None) -------------------


@st.composite
def bad_inline_request(draw):
    shape = (INLINE["num_layers"], INLINE["num_experts"])
    request = pb.RebalanceRequest(loads=encode(valid_loads(draw, shape)), topology=pb.Topology(**INLINE))
    kind = draw(st.sampled_from(["loads", "topology", "mismatch", "options", "prev", "missing"]))
    if kind == "loads":
        message, part = draw(bad_tensor(shape))
        request.loads.CopyFrom(message)
        return request, INVALID, f"loads.{part}"
    if kind == "topology":
        name, value = draw(
            st.sampled_from(
                [
                    ("num_replicas", 0),
                    ("num_groups", 0),
                    ("num_nodes", 0),
                    ("num_gpus", 0),
                    ("num_replicas", 4),  # fewer slots than experts
                    ("num_gpus", 5),  # does not divide 12 slots
                    ("num_groups", 6),  # splits over the 2 nodes (hierarchical path) but not 8 experts
                ]
            )
        )
        setattr(request.topology, name, value)
        return request, INVALID, f"topology.{name}"
    if kind == "mismatch":
        if draw(st.booleans()):  # declared layers/experts disagree with the loads
            name = draw(st.sampled_from(["num_layers", "num_experts"]))
            setattr(request.topology, name, getattr(request.topology, name) + draw(st.integers(1, 2**20)))
            return request, INVALID, f"topology.{name}"
        request.topology.num_replicas = 4 * draw(st.integers(2**20, 2**29))  # L x R past the element limit
        return request, INVALID, "topology.num_layers"
    if kind == "options":
        name = draw(st.sampled_from(["policy", "num_candidates", "balance_tolerance", "locality_tolerance"]))
        if name == "policy":
            request.options.policy = draw(st.integers(5, 2**31 - 1))
        elif name == "num_candidates":
            request.options.num_candidates = draw(st.integers(4097, 2**32 - 1))
        else:
            value = draw(st.just(math.nan) | st.floats(max_value=-1e-9) | st.floats(min_value=1.0))
            setattr(request.options, name, value)
        return request, INVALID, f"options.{name}"
    if kind == "prev":
        layers, replicas, experts = INLINE["num_layers"], INLINE["num_replicas"], INLINE["num_experts"]
        good = np.tile(np.arange(replicas) % experts, (layers, 1))
        broken = draw(st.sampled_from(["shape", "dtype", "range", "uncovered", "bytes"]))
        if broken == "shape":
            message, part = encode(good[:, : draw(st.integers(0, replicas - 1))]), "shape"
        elif broken == "dtype":
            message, part = encode(good.astype(np.float32)), "dtype"
        elif broken == "range":
            bad = good.copy()
            bad[draw(st.integers(0, layers - 1)), draw(st.integers(0, replicas - 1))] = draw(
                st.integers(experts, 2**62) | st.integers(-(2**62), -1)
            )
            message, part = encode(bad), "data"
        elif broken == "uncovered":
            message, part = encode(np.zeros((layers, replicas), np.int64)), "data"
        else:
            message, part = tampered_tensor(good, data=encode(good).data[:-8]), "data"
        request.prev_phy2log.CopyFrom(message)
        return request, INVALID, f"prev_phy2log.{part}"
    missing = draw(st.sampled_from(["loads", "topology", "everything", "base_version"]))
    if missing == "loads":
        request.ClearField("loads")
    elif missing == "topology":
        request.ClearField("topology")
    elif missing == "everything":
        request = pb.RebalanceRequest()
        missing = "loads"
    else:
        request.base_version = draw(st.integers(1, 2**64 - 1))
    return request, INVALID, missing


bad_ids = st.text(max_size=200).filter(lambda text: text and not DEPLOYMENT_ID.fullmatch(text))


@st.composite
def bad_deployment_request(draw):
    kind = draw(st.sampled_from(["bad_id", "unknown", "stale", "prev", "loads_shape", "topology", "loads"]))
    if kind == "bad_id":
        return pb.RebalanceRequest(deployment_id=draw(bad_ids)), INVALID, "deployment_id"
    if kind == "unknown":
        ghost = "ghost-" + draw(st.from_regex(r"[a-z0-9]{1,20}", fullmatch=True))
        return pb.RebalanceRequest(deployment_id=ghost), grpc.StatusCode.NOT_FOUND, None
    if kind == "stale":
        version = draw(st.integers(2, 2**64 - 1))
        return pb.RebalanceRequest(deployment_id=BASE, base_version=version), grpc.StatusCode.FAILED_PRECONDITION, None
    if kind == "prev":
        # A deployment plan may start from the caller's map, which must then be a placement of it.
        request = pb.RebalanceRequest(deployment_id=BASE, prev_phy2log=encode(np.zeros((LAYERS, REPLICAS), np.int64)))
        return request, INVALID, "prev_phy2log.data"
    if kind == "loads_shape":
        shape = draw(st.tuples(st.integers(1, 8), st.integers(1, 32)).filter(lambda s: s != (LAYERS, EXPERTS)))
        return pb.RebalanceRequest(deployment_id=BASE, loads=encode(valid_loads(draw, shape))), INVALID, "loads.shape"
    if kind == "topology":
        other = pb.Topology()
        other.CopyFrom(TOPOLOGY)
        other.num_replicas, other.num_gpus = 64, 8  # a valid topology, not this deployment's
        loads = encode(skewed_loads(draw(st.integers(0, 1000))))
        return pb.RebalanceRequest(deployment_id=BASE, topology=other, loads=loads), INVALID, "topology"
    message, part = draw(bad_tensor((LAYERS, EXPERTS)))
    return pb.RebalanceRequest(deployment_id=BASE, loads=message), INVALID, f"loads.{part}"


@st.composite
def bad_lookup(draw):
    rpc = draw(st.sampled_from(["GetPlacement", "WatchPlacement", "DeleteDeployment"]))
    request_type = {
        "GetPlacement": pb.GetPlacementRequest,
        "WatchPlacement": pb.WatchPlacementRequest,
        "DeleteDeployment": pb.DeleteDeploymentRequest,
    }[rpc]
    if rpc != "DeleteDeployment" and draw(st.booleans()):
        ghost = "ghost-" + draw(st.from_regex(r"[a-z0-9]{1,20}", fullmatch=True))
        return rpc, request_type(deployment_id=ghost), grpc.StatusCode.NOT_FOUND, None
    return rpc, request_type(deployment_id=draw(bad_ids | st.just(""))), INVALID, "deployment_id"


bad_requests = (
    st.tuples(st.just("Rebalance"), bad_inline_request()).map(lambda t: (t[0], *t[1]))
    | st.tuples(st.just("Rebalance"), bad_deployment_request()).map(lambda t: (t[0], *t[1]))
    | bad_lookup()
)


def call(server: ServerThread, rpc: str, request):
    if rpc == "WatchPlacement":
        return next(iter(server.stub.WatchPlacement(request, timeout=10)))
    return getattr(server.stub, rpc)(request, timeout=10)


def test_malformed_requests_get_the_right_status_and_change_nothing(server):
    sent = Counter()

    @settings(max_examples=1100, **FUZZ_SETTINGS)
    @given(case=bad_requests)
    def one(case):
        rpc, request, code, field = case
        before = state(server)
        with pytest.raises(grpc.RpcError) as error:
            call(server, rpc, request)
        assert error.value.code() == code, (rpc, request, error.value.details())
        if code == INVALID:
            violations = field_violations(error.value)
            assert field in violations, (field, violations)
        assert_unchanged(server, before)
        sent[code.name] += 1

    one()
    assert_serving(server)
    assert sum(sent.values()) >= 1000, sent
    totals["requests"] += sum(sent.values())
    totals.update({f"code:{name}": count for name, count in sent.items()})


# ---- malformed reports: (StreamLoadRequest, field named in the rejection) ------------------------------


@st.composite
def bad_report(draw):
    kind = draw(
        st.sampled_from(["bad_id", "unknown", "new_bad_topology", "topology", "loads", "indices", "empty", "no_loads"])
    )
    loads = valid_loads(draw, (LAYERS, EXPERTS))
    if kind == "bad_id":
        return pb.StreamLoadRequest(deployment_id=draw(bad_ids), loads=encode(loads)), "deployment_id"
    if kind == "unknown":
        ghost = "ghost-" + draw(st.from_regex(r"[a-z0-9]{1,20}", fullmatch=True))
        return report(ghost, loads), "topology"
    if kind == "new_bad_topology":
        broken = pb.Topology()
        broken.CopyFrom(TOPOLOGY)
        name = draw(st.sampled_from(TOPOLOGY_FIELDS))
        setattr(broken, name, 0)
        new = "new-" + draw(st.from_regex(r"[a-z0-9]{1,20}", fullmatch=True))
        return report(new, loads, topology=broken), f"topology.{name}"
    if kind == "topology":
        other = pb.Topology()
        other.CopyFrom(TOPOLOGY)
        other.num_experts, other.num_groups = 32, 8
        return report(BASE, loads, topology=other), "topology"
    if kind == "loads":
        message, part = draw(bad_tensor((LAYERS, EXPERTS)))
        return pb.StreamLoadRequest(deployment_id=BASE, loads=message), f"loads.{part}"
    if kind == "indices":
        broken = draw(st.sampled_from(["range", "duplicate", "rows"]))
        if broken == "range":
            indices = [0, draw(st.integers(LAYERS, 2**32 - 1))]
            return report(BASE, loads[:2], layer_indices=indices), "layer_indices"
        if broken == "duplicate":
            layer = draw(st.integers(0, LAYERS - 1))
            return report(BASE, loads[:2], layer_indices=[layer, layer]), "layer_indices"
        rows = draw(st.integers(1, LAYERS).filter(lambda k: k != 2))
        return report(BASE, loads[:rows], layer_indices=[0, 1]), "loads.shape"
    if kind == "empty":
        return pb.StreamLoadRequest(), "deployment_id"
    return pb.StreamLoadRequest(deployment_id=BASE), "loads.dtype"


def test_malformed_reports_are_rejected_in_band_and_the_rest_accepted(server):
    sent = Counter()

    @settings(max_examples=200, **FUZZ_SETTINGS)
    @given(reports=st.lists(bad_report(), min_size=3, max_size=12), good_at=st.integers(0, 12))
    def one(reports, good_at):
        good_at = min(good_at, len(reports))
        stream = [r for r, _ in reports]
        stream.insert(good_at, report(SINK, skewed_loads(good_at)))
        expected = [(i + (i >= good_at), field) for i, (_, field) in enumerate(reports)]
        before = state(server)
        summary = server.stub.StreamLoad(iter(stream), timeout=30)
        assert (summary.accepted, summary.rejected) == (1, len(reports))
        assert [(r.index, r.field) for r in summary.rejections] == expected
        assert_unchanged(server, before)
        sent["reports"] += len(reports)
        sent["streams"] += 1

    one()
    assert_serving(server)
    assert sent["reports"] >= 1000, sent
    totals.update(sent)


def test_oversized_messages_are_resource_exhausted(server):
    """Past --max-message-bytes gRPC refuses the message before the handler (no BadRequest possible);
    in a stream that ends the whole stream, after the reports before it were taken."""
    big = np.ones((1, MAX_MESSAGE_BYTES // 4 + 1024), np.float32)
    before = state(server)
    with pytest.raises(grpc.RpcError) as error:
        server.stub.Rebalance(pb.RebalanceRequest(loads=encode(big), topology=TOPOLOGY), timeout=10)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as error:
        server.stub.StreamLoad(iter([pb.StreamLoadRequest(deployment_id=BASE, loads=encode(big))]), timeout=10)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_unchanged(server, before)
    assert_serving(server)
    totals["oversized"] += 2


# ---- raw bytes on every RPC: (method, arity, request type, sample messages to truncate and corrupt) ----

HEALTH = "/grpc.health.v1.Health/"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
SERVICE = "/rebalancer.v1.RebalancerService/"


def raw_methods() -> dict[str, tuple[str, type, list[bytes]]]:
    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    inline = pb.RebalanceRequest(
        loads=encode(np.ones((INLINE["num_layers"], INLINE["num_experts"]), np.float32)),
        topology=pb.Topology(**INLINE),
        options=pb.SolveOptions(seed=3),
    )
    return {
        SERVICE + "Rebalance": ("unary_unary", pb.RebalanceRequest, [inline.SerializeToString()]),
        SERVICE + "StreamLoad": (
            "stream_unary",
            pb.StreamLoadRequest,
            [report(SINK, skewed_loads(5)).SerializeToString()],
        ),
        SERVICE + "GetPlacement": (
            "unary_unary",
            pb.GetPlacementRequest,
            [pb.GetPlacementRequest(deployment_id=BASE).SerializeToString()],
        ),
        SERVICE + "WatchPlacement": (
            "unary_stream",
            pb.WatchPlacementRequest,
            [pb.WatchPlacementRequest(deployment_id=BASE).SerializeToString()],
        ),
        SERVICE + "ListDeployments": ("unary_unary", pb.ListDeploymentsRequest, [b""]),
        SERVICE + "DeleteDeployment": (
            "unary_unary",
            pb.DeleteDeploymentRequest,
            [pb.DeleteDeploymentRequest(deployment_id="ghost-raw").SerializeToString()],
        ),
        HEALTH + "Check": (
            "unary_unary",
            health_pb2.HealthCheckRequest,
            [health_pb2.HealthCheckRequest(service="").SerializeToString()],
        ),
        HEALTH + "Watch": (
            "unary_stream",
            health_pb2.HealthCheckRequest,
            [health_pb2.HealthCheckRequest(service="").SerializeToString()],
        ),
        REFLECTION: (
            "stream_stream",
            reflection_pb2.ServerReflectionRequest,
            [reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()],
        ),
    }


@st.composite
def raw_payload(draw, samples: list[bytes]) -> bytes:
    """Arbitrary bytes, a sample cut short, or a sample with bytes overwritten."""
    sample = draw(st.sampled_from(samples))
    kind = draw(st.sampled_from(["random", "truncated", "corrupted"]))
    if kind == "random" or not sample:
        return draw(st.binary(min_size=1, max_size=256))
    if kind == "truncated":
        return sample[: draw(st.integers(0, len(sample) - 1))]
    data = bytearray(sample)
    for _ in range(draw(st.integers(1, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


def decodes(request_type: type, payload: bytes) -> bool:
    try:
        request_type.FromString(payload)
    except Exception:
        return False
    return True


def raw_call(channel: grpc.Channel, method: str, arity: str, payload: bytes) -> tuple[grpc.StatusCode, object]:
    """Send `payload` as the request (in a stream: between two good reports); the status and the reply."""
    try:
        if arity == "unary_unary":
            return grpc.StatusCode.OK, channel.unary_unary(method)(payload, timeout=10)
        if arity == "stream_unary":
            good = report(SINK, skewed_loads(7)).SerializeToString()
            return grpc.StatusCode.OK, channel.stream_unary(method)(iter([good, payload, good]), timeout=10)
        if arity == "unary_stream":
            stream = channel.unary_stream(method)(payload, timeout=3)
        else:
            stream = channel.stream_stream(method)(iter([payload]), timeout=3)
        for _ in stream:  # the first message is enough; a watch would go on for ever
            stream.cancel()
            break
        return grpc.StatusCode.OK, None
    except grpc.RpcError as error:
        return error.code(), None


def test_raw_bytes_on_every_rpc_never_unknown_or_internal(server):
    methods = raw_methods()
    seen = Counter()

    @settings(max_examples=600, **FUZZ_SETTINGS)
    @given(method=st.sampled_from(sorted(methods)), data=st.data())
    def one(method, data):
        arity, request_type, samples = methods[method]
        payload = data.draw(raw_payload(samples))
        readable = decodes(request_type, payload)
        before = state(server)
        code, reply = raw_call(server.channel, method, arity, payload)
        assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), (method, payload)
        if not readable and arity == "stream_unary":
            summary = pb.StreamLoadResponse.FromString(reply)
            assert (code, summary.accepted, summary.rejected) == (grpc.StatusCode.OK, 2, 1)
            assert [(r.index, r.field) for r in summary.rejections] == [(1, "")]
        elif not readable:
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, payload, code)
        if method != SERVICE + "StreamLoad":  # good reports go to the sink, which `state` leaves out
            assert_unchanged(server, before)
        seen[code.name] += 1
        seen["undecodable"] += not readable

    one()
    assert_serving(server)
    assert seen["UNKNOWN"] == seen["INTERNAL"] == 0
    assert seen["undecodable"] >= 200, seen
    totals["raw"] += sum(count for name, count in seen.items() if name != "undecodable")
    totals["raw_undecodable"] += seen["undecodable"]
