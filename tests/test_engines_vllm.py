"""The vLLM EPLB policy plugin against vLLM 0.33.0's own policy registry, plugin loader and map code,
and a real rebalancer server (in process, loopback)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from rebalancer.solver import maps, solve
from rebalancer_client.engines.vllm import ServiceConfig, ServiceEplbPolicy, planning_layout
from rebalancer_wire.codec import decode
from rebalancer_wire.v1 import rebalancer_pb2 as pb
from released_engines import load_vllm
from service_harness import ServerThread, free_port, skewed_loads

# DeepSeek-like in small: 6 MoE layers of 16 experts in 4 groups, 32 slots on 8 ranks over 2 nodes.
LAYERS, EXPERTS, REPLICAS, GROUPS, NODES, RANKS = 6, 16, 32, 4, 2, 8


@pytest.fixture(scope="module")
def vllm():
    return load_vllm()


@pytest.fixture
def registry(vllm):
    """vLLM's EPLB_POLICIES, restored after the test (the plugin edits it in place, as it must)."""
    saved = dict(vllm.policy.EPLB_POLICIES)
    yield vllm.policy.EPLB_POLICIES
    vllm.policy.EPLB_POLICIES.clear()
    vllm.policy.EPLB_POLICIES.update(saved)
    vllm.plugins.plugins_loaded = False


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerThread(str(tmp_path_factory.mktemp("state"))) as running:
        yield running


def window(seed: int) -> torch.Tensor:
    """What vLLM passes: the int64 load window sum [L, E] on the CPU; seeds drift around one load shape."""
    drift = np.random.default_rng(seed).uniform(0.95, 1.05, (LAYERS, EXPERTS))
    return torch.from_numpy(np.rint(skewed_loads(0, LAYERS, EXPERTS) * drift * 7).astype(np.int64))


def published_start(vllm) -> torch.Tensor:
    """The map vLLM's own default policy plans for a first window, as the map in force."""
    return vllm.policy.DefaultEplbPolicy.rebalance_experts(window(100), REPLICAS, GROUPS, NODES, RANKS)


def configure(target: str, deployment: str | None, **fields) -> None:
    config = ServiceConfig(target=target, deployment_id=deployment, **{"deadline_s": 5.0, **fields})
    ServiceEplbPolicy.configure(config, fallback_policy=load_vllm().policy.DefaultEplbPolicy)


def assert_vllm_accepts(vllm, phy2log: torch.Tensor) -> None:
    """vLLM's own `compute_logical_maps` derives consistent maps from it, every expert hosted."""
    assert phy2log.dtype == torch.int64 and phy2log.device.type == "cpu" and phy2log.shape == (LAYERS, REPLICAS)
    log2phy, count = vllm.eplb_state.compute_logical_maps(phy2log, EXPERTS)
    assert bool((count >= 1).all()) and int(count.sum()) == LAYERS * REPLICAS
    for layer in range(LAYERS):
        for expert in range(EXPERTS):
            slots = log2phy[layer, expert][: count[layer, expert]]
            assert bool((phy2log[layer, slots] == expert).all())


def test_plugin_takes_vllms_default_slot_through_vllms_plugin_loader(vllm, registry, monkeypatch):
    monkeypatch.setenv("REBALANCER_TARGET", "127.0.0.1:1")
    monkeypatch.setenv("REBALANCER_DEPLOYMENT", "vllm-plugin")
    vllm.plugins.plugins_loaded = False
    vllm.plugins.load_general_plugins()  # discovers our `vllm.general_plugins` entry point
    assert registry["default"] is ServiceEplbPolicy
    assert ServiceEplbPolicy.fallback_policy is vllm.policy.DefaultEplbPolicy
    assert issubclass(ServiceEplbPolicy, vllm.policy.AbstractEplbPolicy)
    assert ServiceEplbPolicy.config.deployment_id == "vllm-plugin"
    vllm.plugins.plugins_loaded = False
    vllm.plugins.load_general_plugins()  # vLLM loads plugins in every process, possibly twice
    assert registry["default"] is ServiceEplbPolicy and ServiceEplbPolicy.fallback_policy is not ServiceEplbPolicy


def test_plugin_leaves_vllm_alone_without_a_target_or_when_turned_off(vllm, registry, monkeypatch):
    monkeypatch.delenv("REBALANCER_TARGET", raising=False)
    vllm.plugins.plugins_loaded = False
    vllm.plugins.load_general_plugins()
    assert registry["default"] is vllm.policy.DefaultEplbPolicy
    monkeypatch.setenv("REBALANCER_TARGET", "127.0.0.1:1")
    monkeypatch.setenv("REBALANCER_VLLM", "off")
    vllm.plugins.plugins_loaded = False
    vllm.plugins.load_general_plugins()
    assert registry["default"] is vllm.policy.DefaultEplbPolicy
    monkeypatch.setenv("REBALANCER_VLLM", "on")
    monkeypatch.setenv("REBALANCER_DEADLINE_S", "two seconds")  # a typo keeps vLLM starting, on its own policy
    vllm.plugins.plugins_loaded = False
    vllm.plugins.load_general_plugins()
    assert registry["default"] is vllm.policy.DefaultEplbPolicy


def balancedness(phy2log: torch.Tensor, loads: torch.Tensor) -> float:
    return float(maps.balancedness(loads.double(), phy2log, maps.logcnt_from_phy2log(phy2log, EXPERTS), RANKS).mean())


def test_service_policy_plans_commits_and_moves_few_copies_from_the_map_in_force(vllm, server):
    configure(f"127.0.0.1:{server.server.port}", "vllm-live", commit=True)
    first = ServiceEplbPolicy.rebalance_experts(window(1), REPLICAS, GROUPS, NODES, RANKS, published_start(vllm))
    assert_vllm_accepts(vllm, first)
    assert ServiceEplbPolicy.stats.committed_version == 1
    # The next window, from the map now in force: vLLM's own policy re-plans, the service moves few copies.
    ours = ServiceEplbPolicy.rebalance_experts(window(2), REPLICAS, GROUPS, NODES, RANKS, first)
    assert_vllm_accepts(vllm, ours)
    theirs = vllm.policy.DefaultEplbPolicy.rebalance_experts(window(2), REPLICAS, GROUPS, NODES, RANKS, first)
    moved_ours = int(maps.moved_copies(first, ours, EXPERTS, RANKS).sum())
    moved_theirs = int(maps.moved_copies(first, theirs, EXPERTS, RANKS).sum())
    assert moved_ours < 0.75 * moved_theirs, (moved_ours, moved_theirs)
    assert balancedness(ours, window(2)) > balancedness(theirs, window(2))
    stats = ServiceEplbPolicy.stats
    assert stats.service_plans == 2 and stats.fallbacks == 0 and stats.committed_version == 2
    committed = server.stub.GetPlacement(pb.GetPlacementRequest(deployment_id="vllm-live")).placement
    assert committed.version == 2 and np.array_equal(decode(committed.phy2log), ours.numpy())
    assert committed.stats.replicas_moved == moved_ours  # planned from the engine's map, not another


def test_every_rank_gets_the_same_map_and_only_the_leader_commits(vllm, server):
    old = published_start(vllm)
    maps = []
    for leader in (False, True, False):  # followers before and after the leader's commit
        configure(f"127.0.0.1:{server.server.port}", "vllm-ranks", commit=leader)
        maps.append(ServiceEplbPolicy.rebalance_experts(window(2), REPLICAS, GROUPS, NODES, RANKS, old))
        assert ServiceEplbPolicy.stats.committed_version == (1 if leader else 0)
    assert all(torch.equal(maps[0], other) for other in maps[1:])


def test_stopped_server_falls_back_within_the_deadline_and_never_raises(vllm, caplog):
    configure(f"127.0.0.1:{free_port()}", "vllm-down", deadline_s=1.0)
    old = published_start(vllm)
    # The bound is on waiting for the service: the local plan's one-time Numba compile (seconds on a fresh
    # clone) happens first, outside it.
    solve(window(0).double(), REPLICAS, GROUPS, NODES, RANKS, device="cpu", prev_phy2log=old)
    for seed in range(3):
        started = time.perf_counter()
        new = ServiceEplbPolicy.rebalance_experts(window(seed), REPLICAS, GROUPS, NODES, RANKS, old)
        assert time.perf_counter() - started < 1.0 + 0.5
        assert_vllm_accepts(vllm, new)
    stats = ServiceEplbPolicy.stats
    assert stats.fallbacks == 3 and stats.outages == 1 and stats.service_plans == 0
    assert stats.last_fallback == "library" and "UNAVAILABLE" in stats.last_error
    assert sum("planning locally" in record.getMessage() for record in caplog.records) == 1  # once per outage


def test_without_the_library_the_fallback_is_vllms_own_policy(vllm, monkeypatch):
    configure(f"127.0.0.1:{free_port()}", None, deadline_s=0.5)
    monkeypatch.setitem(sys.modules, "rebalancer.solver", None)  # `from rebalancer.solver import solve` fails
    old = published_start(vllm)
    new = ServiceEplbPolicy.rebalance_experts(window(3), REPLICAS, GROUPS, NODES, RANKS, old)
    expected = vllm.policy.DefaultEplbPolicy.rebalance_experts(window(3), REPLICAS, GROUPS, NODES, RANKS, old)
    assert ServiceEplbPolicy.stats.last_fallback == "vllm" and torch.equal(new, expected)


def test_groups_that_do_not_split_over_nodes_plan_globally_as_vllm_does(vllm, server):
    # A global plan, on the real nodes (copies are fetched and costed by node).
    assert planning_layout(3, 2, 8) == (1, 2) and planning_layout(4, 2, 8) == (4, 2)
    assert planning_layout(4, 4, 6) == (1, 1)  # ranks that do not split over the nodes
    configure(f"127.0.0.1:{server.server.port}", None)
    new = ServiceEplbPolicy.rebalance_experts(window(4), REPLICAS, 3, NODES, RANKS)  # 16 experts, 3 groups
    assert_vllm_accepts(vllm, new)
    assert ServiceEplbPolicy.stats.service_plans == 1


RANK = """
import json, sys
import numpy as np, torch, torch.distributed as dist
from rebalancer_client.engines.vllm import ServiceConfig, ServiceEplbPolicy

rank, store, scenarios, inputs, out = sys.argv[1:6]
replicas, groups, nodes, ranks = (int(x) for x in sys.argv[6:10])
thread = sys.argv[10]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{store}", rank=int(rank), world_size=2)
if thread == "async":  # vLLM's async EPLB: the policy runs on a worker thread; vLLM's EPLB group exists
    import threading, types
    for name in ("vllm", "vllm.distributed"):
        sys.modules[name] = types.ModuleType(name)
    parallel_state = sys.modules["vllm.distributed.parallel_state"] = types.ModuleType("parallel_state")
    parallel_state.get_eplb_group = lambda: types.SimpleNamespace(cpu_group=dist.group.WORLD)
data = np.load(inputs)
window, old = torch.from_numpy(data["window"]), torch.from_numpy(data["old"])


def plan():
    return ServiceEplbPolicy.rebalance_experts(window, replicas, groups, nodes, ranks, old)


def on_worker_thread():
    result = []
    worker = threading.Thread(target=lambda: result.append(plan()))
    worker.start()
    worker.join()
    return result[0]


reports = []
for index, (target, deployment) in enumerate(json.loads(scenarios)):
    ServiceEplbPolicy.configure(ServiceConfig(target=target, deployment_id=deployment, deadline_s=5.0))
    new = on_worker_thread() if thread == "async" else plan()
    np.save(f"{out}-{index}.npy", new.numpy())
    stats = ServiceEplbPolicy.stats
    reports.append({"service": stats.service_plans, "fallbacks": stats.fallbacks, "agreed": stats.agreed,
                    "version": stats.committed_version})
print(json.dumps(reports))
dist.destroy_process_group()
"""


@pytest.mark.parametrize("thread", ["main", "async"])
def test_ranks_of_one_group_install_the_leaders_map_even_when_only_some_reach_the_service(
    vllm, server, tmp_path, thread
):
    """Two ranks over gloo, as vLLM's synchronous rearrangement (main thread) and its asynchronous EPLB
    worker thread (with vLLM's EPLB group) run them: first only the leader reaches the service, then only
    the follower."""
    live, dead = f"127.0.0.1:{server.server.port}", f"127.0.0.1:{free_port()}"
    scenarios = {
        0: [[live, f"vllm-{thread}-a"], [dead, f"vllm-{thread}-b"]],
        1: [[dead, f"vllm-{thread}-a"], [live, f"vllm-{thread}-b"]],
    }
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    np.savez(tmp_path / "inputs.npz", window=window(5).numpy(), old=published_start(vllm).numpy())
    store = str(free_port())
    ranks = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), store, json.dumps(scenarios[rank]), str(tmp_path / "inputs.npz")]
            + [str(tmp_path / f"rank{rank}"), *map(str, (REPLICAS, GROUPS, NODES, RANKS)), thread],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    reports = []
    for process in ranks:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
        reports.append(json.loads(out.strip().splitlines()[-1]))
    for scenario in (0, 1):
        maps_ = [np.load(tmp_path / f"rank{rank}-{scenario}.npy") for rank in (0, 1)]
        assert np.array_equal(maps_[0], maps_[1])  # one map for the whole group
        assert_vllm_accepts(vllm, torch.from_numpy(maps_[1]))
        assert reports[1][scenario] == {"service": 0, "fallbacks": 0, "agreed": 1, "version": 0}  # never asked
    assert reports[0][0] == {"service": 1, "fallbacks": 0, "agreed": 1, "version": 1}
    assert reports[0][1]["service"] == 0 and reports[0][1]["fallbacks"] == 1  # the leader's local plan, for both


def test_an_ep_size_change_moves_the_deployment_to_the_new_layout_without_falling_back(vllm, server):
    """vLLM's elastic EP keeps the slots per rank and changes the rank count: the registered topology then
    no longer matches, and the plugin re-plans elastically (committed) instead of falling back."""
    configure(f"127.0.0.1:{server.server.port}", "vllm-elastic")
    first = ServiceEplbPolicy.rebalance_experts(window(7), REPLICAS, GROUPS, NODES, RANKS, published_start(vllm))
    assert_vllm_accepts(vllm, first)
    per_rank, ranks = REPLICAS // RANKS, RANKS + RANKS // NODES  # one more node
    padded = torch.cat([first, torch.full((LAYERS, per_rank * (ranks - RANKS)), -1, dtype=torch.int64)], 1)
    grown = ServiceEplbPolicy.rebalance_experts(window(8), per_rank * ranks, GROUPS, NODES + 1, ranks, padded)
    stats = ServiceEplbPolicy.stats
    assert (stats.service_plans, stats.fallbacks, stats.committed_version) == (2, 0, 2)
    assert grown.shape == (LAYERS, per_rank * ranks)
    assert all(set(row) == set(range(EXPERTS)) for row in grown.tolist())
    info = {d.deployment_id: d for d in server.stub.ListDeployments(pb.ListDeploymentsRequest()).deployments}
    assert info["vllm-elastic"].topology.num_gpus == ranks
    again = ServiceEplbPolicy.rebalance_experts(window(9), per_rank * ranks, GROUPS, NODES + 1, ranks, grown)
    assert ServiceEplbPolicy.stats.committed_version == 3 and again.shape == grown.shape
    placement = server.stub.GetPlacement(pb.GetPlacementRequest(deployment_id="vllm-elastic")).placement
    assert not placement.gpu_ids  # a plain re-plan on the new layout, not another elastic one


@pytest.mark.parametrize("replicas, ranks", [(18, 4), (12, 4)])  # not a whole number per rank; too few
def test_slots_no_plan_can_fill_raise_as_vllms_own_policy_does(vllm, replicas, ranks):
    configure(f"127.0.0.1:{free_port()}", None, deadline_s=0.5)
    weight = torch.arange(1.0, 17.0).unsqueeze(0)  # 16 experts
    with pytest.raises(AssertionError):
        vllm.policy.DefaultEplbPolicy.rebalance_experts(weight, replicas, 1, 1, ranks)
    with pytest.raises(AssertionError) as raised:
        ServiceEplbPolicy.rebalance_experts(weight, replicas, 1, 1, ranks)
    assert isinstance(raised.value, ValueError) and ServiceEplbPolicy.stats.calls == 1
    assert ServiceEplbPolicy.stats.fallbacks == 0 and ServiceEplbPolicy.stats.outages == 0


def test_the_local_plan_follows_the_policy_chosen_for_the_service(vllm):
    from rebalancer.solver import solve

    configure(f"127.0.0.1:{free_port()}", None, deadline_s=0.5, policy="deepseek")
    old = published_start(vllm)
    new = ServiceEplbPolicy.rebalance_experts(window(5), REPLICAS, GROUPS, NODES, RANKS, old)
    assert ServiceEplbPolicy.stats.last_fallback == "library"
    options = {"device": "cpu", "prev_phy2log": old}
    expected = solve(window(5).double(), REPLICAS, GROUPS, NODES, RANKS, policy="deepseek", **options).phy2log
    assert torch.equal(new, expected)
    assert not torch.equal(new, solve(window(5).double(), REPLICAS, GROUPS, NODES, RANKS, **options).phy2log)


def test_preserve_intragpu_slots_is_vllms_helper_as_the_plugin_class_offers_it(vllm):
    # vLLM's own tests call it on the policy class; the plugin takes that class's place.
    rng = np.random.default_rng(5)
    for ranks, slots, experts in ((2, 4, 8), (2, 5, 7), (3, 4, 4), (4, 3, 2), (1, 6, 3)):
        old, new = (rng.integers(0, experts, (3, ranks * slots)) for _ in range(2))
        want = vllm.policy.DefaultEplbPolicy.preserve_intragpu_slots(new, ranks, old)
        assert np.array_equal(ServiceEplbPolicy.preserve_intragpu_slots(new, ranks, old), want)
    odd = rng.integers(0, 4, (1, 7))
    assert np.array_equal(ServiceEplbPolicy.preserve_intragpu_slots(odd, 2, odd[:, ::-1]), odd)
