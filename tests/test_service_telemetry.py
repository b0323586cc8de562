"""StreamLoad (SPEC §4): reports of several ranks add up, layer subsets, and every bad report is rejected
in-band without ending the stream or touching the window."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from rebalancer_wire.codec import encode
from rebalancer_wire.v1 import rebalancer_pb2 as pb
from service_harness import EXPERTS, LAYERS, TOPOLOGY, ServerThread, library, maps_of, report, skewed_loads


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerThread(str(tmp_path_factory.mktemp("state")), window=8, history_intervals=2) as running:
        yield running


def planned(server, deployment_id: str) -> np.ndarray:
    """phy2log a dry-run Rebalance plans on the deployment's window (no placement yet: fresh plan)."""
    request = pb.RebalanceRequest(deployment_id=deployment_id, options=pb.SolveOptions(dry_run=True))
    return maps_of(server.stub.Rebalance(request).placement)[0]


def listed(server, deployment_id: str) -> pb.DeploymentInfo:
    deployments = server.stub.ListDeployments(pb.ListDeploymentsRequest()).deployments
    return next(d for d in deployments if d.deployment_id == deployment_id)


def test_reports_from_several_ranks_add_up(server):
    server.stub.StreamLoad(iter([report("ranks", np.zeros((LAYERS, EXPERTS), np.float32), topology=TOPOLOGY)]))
    per_rank = [skewed_loads(rank) for rank in range(4)]

    def stream(rank):
        reports = [report("ranks", per_rank[rank], rank=rank, step=step) for step in (1, 2)]
        return server.stub.StreamLoad(iter(reports), timeout=30)

    with ThreadPoolExecutor(4) as pool:
        summaries = list(pool.map(stream, range(4)))
    assert [s.accepted for s in summaries] == [2, 2, 2, 2]
    # Same step from every rank lands in one slot: the zero report plus two steps.
    assert listed(server, "ranks").reports == 9
    total = 2 * np.sum(per_rank, axis=0)
    assert np.array_equal(planned(server, "ranks"), library(total).phy2log.numpy())
    assert server.metric("rebalancer_telemetry_reports_total", deployment="ranks", outcome="accepted") == 9


def test_layer_subsets_add_into_their_layers(server):
    full = skewed_loads(20)
    reports = [
        report("subsets", full[:2], layer_indices=[0, 1], topology=TOPOLOGY, step=5),
        report("subsets", full[2:], layer_indices=[2, 3], step=5),
        report("subsets", full[[3]], layer_indices=[3]),
    ]
    assert server.stub.StreamLoad(iter(reports)).accepted == 3
    expected = full.copy()
    expected[3] *= 2
    assert np.array_equal(planned(server, "subsets"), library(expected).phy2log.numpy())


def bad_reports() -> list[tuple[pb.StreamLoadRequest, str]]:
    good = skewed_loads(30)
    nan, negative = good.copy(), good.copy()
    nan[0, 0], negative[1, 1] = np.nan, -3.0
    truncated = encode(good)
    truncated.data = truncated.data[:-4]
    return [
        (report("bad", good[:, :-1]), "loads.shape"),
        (report("bad", nan), "loads.data"),
        (report("bad", np.where(good > 0, np.inf, good)), "loads.data"),
        (report("bad", negative), "loads.data"),
        (pb.StreamLoadRequest(deployment_id="bad", loads=truncated), "loads.data"),
        (report("bad", good[:1], layer_indices=[LAYERS]), "layer_indices"),
        (report("bad", good[:2], layer_indices=[1, 1]), "layer_indices"),
        (report("bad", good[:2], layer_indices=[0]), "loads.shape"),
        (report("nobody-yet", good), "topology"),
        (
            report(
                "bad",
                good,
                topology=pb.Topology(
                    num_layers=LAYERS, num_experts=EXPERTS, num_replicas=16, num_groups=4, num_nodes=2, num_gpus=4
                ),
            ),
            "topology",
        ),
        (report("bad id!", good), "deployment_id"),
        (
            report(
                "new",
                good,
                topology=pb.Topology(
                    num_layers=1, num_experts=16, num_replicas=8, num_groups=1, num_nodes=1, num_gpus=1
                ),
            ),
            "topology.num_replicas",
        ),
    ]


def test_bad_reports_are_rejected_in_band_and_later_ones_count(server):
    good = skewed_loads(30)
    cases = bad_reports()
    stream = [report("bad", good, topology=TOPOLOGY)] + [r for r, _ in cases] + [report("bad", good)]
    summary = server.stub.StreamLoad(iter(stream))
    assert summary.accepted == 2 and summary.rejected == len(cases)
    assert [(r.index, r.field) for r in summary.rejections] == [(i + 1, f) for i, (_, f) in enumerate(cases)]
    assert all(r.reason for r in summary.rejections)
    # The window holds exactly the two good reports.
    assert listed(server, "bad").reports == 2
    assert np.array_equal(planned(server, "bad"), library(2 * good).phy2log.numpy())
    assert server.metric("rebalancer_telemetry_reports_total", deployment="bad", outcome="rejected") >= 9
    assert server.metric("rebalancer_telemetry_reports_total", deployment="", outcome="rejected") >= 2


def test_window_keeps_the_last_reports_and_history(server):
    loads = [skewed_loads(40 + i) for i in range(12)]
    reports = [report("ring", loads[0], topology=TOPOLOGY)] + [report("ring", x) for x in loads[1:]]
    assert server.stub.StreamLoad(iter(reports)).accepted == 12
    assert listed(server, "ring").reports == 8  # --window 8
    snapshot = server.call(server.server.windows.snapshot("ring"))
    np.testing.assert_allclose(snapshot.loads.numpy(), np.sum(loads[4:], axis=0), rtol=1e-6)
    assert snapshot.history.shape == (1, LAYERS, EXPERTS)
    np.testing.assert_allclose(snapshot.history[0].numpy(), np.sum(loads[:8], axis=0), rtol=1e-6)
