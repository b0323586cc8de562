"""Elastic expert parallelism: failed GPUs and a new GPU count, planned from the placement in force with
every expert hosted, balance close to a fresh plan on the GPUs that exist, and most copies kept."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from placement_checks import assert_valid_maps
from rebalancer.solver import apply_transfers, maps, solve
from rebalancer.solver.elastic import elastic_moves
from rebalancer.solver.transfers import SRC_GPU
from rebalancer_testkit.workloads import KINDS, make
from rebalancer_wire.options import ArgumentError

# DeepSeek-V3 layout on few layers: 256 experts in 8 groups, 288 slots, 4 nodes x 8 GPUs (9 slots each).
LAYERS, EXPERTS, REPLICAS, GROUPS, NODES, GPUS = 4, 256, 288, 8, 4, 32
SLOTS_PER_GPU = REPLICAS // GPUS


@pytest.fixture(scope="module")
def in_force() -> tuple[torch.Tensor, torch.Tensor]:
    weight = make("zipf", LAYERS, EXPERTS, seed=71)
    return weight, solve(weight, REPLICAS, GROUPS, NODES, GPUS).phy2log


def test_losing_one_gpu_hosts_every_expert_on_the_healthy_ones_near_a_fresh_plan(in_force) -> None:
    weight, prev = in_force
    result = solve(weight, REPLICAS, GROUPS, NODES, GPUS, prev_phy2log=prev, unavailable_gpus=[13])
    healthy = GPUS - 1
    assert result.gpu_ids.tolist() == [g for g in range(GPUS) if g != 13]
    assert_valid_maps(*result.triple(), LAYERS, EXPERTS, SLOTS_PER_GPU * healthy, healthy)
    assert bool((result.logcnt > 0).all())
    fresh = solve(weight, SLOTS_PER_GPU * healthy, 1, 1, healthy)
    assert bool((result.balancedness >= fresh.balancedness - 0.01 - 1e-9).all()), (
        result.balancedness.tolist(),
        fresh.balancedness.tolist(),
    )
    assert not bool((result.transfers[:, SRC_GPU] == 13).any())
    replayed = apply_transfers(prev, result.transfers, SLOTS_PER_GPU, healthy, result.gpu_ids)
    assert torch.equal(replayed, result.phy2log)
    moved, _ = elastic_moves(prev, result.phy2log, EXPERTS, SLOTS_PER_GPU, result.gpu_ids)
    assert torch.equal(result.moved_copies, moved)
    # Far fewer copies than the fresh plan on the healthy GPUs would ship.
    fresh_moves, _ = elastic_moves(prev, fresh.phy2log, EXPERTS, SLOTS_PER_GPU, result.gpu_ids)
    assert int(moved.sum()) < 0.5 * int(fresh_moves.sum()), (moved.tolist(), fresh_moves.tolist())


@pytest.mark.parametrize("kind", ["zipf", "lognormal"])
def test_losing_one_of_eight_gpus_ships_at_most_twice_its_copies_near_a_fresh_plan(kind: str) -> None:
    # 48 experts in 4 groups, 64 slots on 2 nodes x 4 GPUs (8 slots each); GPU 3 fails.
    layers, experts, replicas, groups, nodes, gpus = 6, 48, 64, 4, 2, 8
    slots = replicas // gpus
    weight = make(kind, layers, experts, seed=71)
    prev = solve(weight, replicas, groups, nodes, gpus).phy2log
    result = solve(weight, replicas, groups, nodes, gpus, prev_phy2log=prev, unavailable_gpus=[3])
    assert_valid_maps(*result.triple(), layers, experts, slots * (gpus - 1), gpus - 1)
    assert bool((result.moved_copies <= 2 * slots).all()), result.moved_copies.tolist()
    fresh = solve(weight, slots * (gpus - 1), 1, 1, gpus - 1)
    assert bool((result.balancedness >= fresh.balancedness - 0.01 - 1e-9).all())
    replayed = apply_transfers(prev, result.transfers, slots, gpus - 1, result.gpu_ids)
    assert torch.equal(replayed, result.phy2log)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    kind=st.sampled_from(KINDS),
    layout=st.sampled_from([(1, 2), (1, 4), (2, 2), (2, 4), (4, 2)]),  # (nodes, GPUs per node)
    slots_per_gpu=st.integers(1, 5),
)
def test_any_change_of_the_gpu_set_gives_valid_maps_that_the_transfers_reach(
    data: st.DataObject, kind: str, layout: tuple, slots_per_gpu: int
) -> None:
    # A random placement in force on a small layout, then some GPUs fail or the node count changes.
    nodes, per_node = layout
    gpus = nodes * per_node
    replicas = gpus * slots_per_gpu
    experts = data.draw(st.integers(1, replicas), label="experts")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    g = torch.Generator().manual_seed(seed)
    spare = torch.randint(experts, (2, replicas - experts), generator=g)
    prev = torch.cat([torch.arange(experts).repeat(2, 1), spare], 1)
    prev = prev.gather(1, torch.rand(2, replicas, generator=g).argsort(1))
    weight = make(kind, 2, experts, seed=seed)
    if data.draw(st.booleans(), label="failed GPUs"):
        elastic = {"unavailable_gpus": data.draw(st.lists(st.integers(0, gpus - 1), min_size=1, unique=True))}
    else:
        elastic = {"new_num_gpus": per_node * data.draw(st.integers(1, nodes + 2), label="nodes")}
    try:
        result = solve(weight, replicas, 1, nodes, gpus, prev_phy2log=prev, **elastic)
    except ArgumentError as exc:  # no GPU left, or too few slots for every expert: refused by name
        assert exc.argument in elastic, exc
        event(f"refused: {exc.argument}")
        return
    event("planned")
    new_gpus = result.gpu_ids.numel()
    assert_valid_maps(*result.triple(), 2, experts, slots_per_gpu * new_gpus, new_gpus)
    replayed = apply_transfers(prev, result.transfers, slots_per_gpu, new_gpus, result.gpu_ids)
    assert torch.equal(replayed, result.phy2log)
    if "unavailable_gpus" in elastic:
        assert not bool(torch.isin(result.transfers[:, SRC_GPU], torch.tensor(elastic["unavailable_gpus"])).any())
    moved, _ = elastic_moves(prev, result.phy2log, experts, slots_per_gpu, result.gpu_ids)
    assert torch.equal(result.moved_copies, moved)


def test_scaling_32_to_40_gpus_keeps_most_copies_in_place(in_force) -> None:
    weight, prev = in_force
    result = solve(weight, REPLICAS, GROUPS, NODES, GPUS, prev_phy2log=prev, new_num_gpus=40)
    assert result.phy2log.shape == (LAYERS, SLOTS_PER_GPU * 40)
    assert_valid_maps(*result.triple(), LAYERS, EXPERTS, SLOTS_PER_GPU * 40, 40)
    _, kept = elastic_moves(prev, result.phy2log, EXPERTS, SLOTS_PER_GPU, result.gpu_ids)
    assert float(kept.sum()) >= 0.75 * prev.numel(), f"kept {float(kept.sum()) / prev.numel():.3f} of the copies"
    fresh = solve(weight, SLOTS_PER_GPU * 40, 1, 1, 40)
    assert float(result.balancedness.mean()) >= float(fresh.balancedness.mean()) - 0.01
    replayed = apply_transfers(prev, result.transfers, SLOTS_PER_GPU, 40, result.gpu_ids)
    assert torch.equal(replayed, result.phy2log)
    # Every slot of the 8 new GPUs is written by the plan.
    assert int((result.transfers[:, 2] >= GPUS).sum()) == 8 * SLOTS_PER_GPU * LAYERS


def test_scaling_in_by_a_node_plans_on_the_remaining_gpus() -> None:
    # 64 experts, 16 GPUs on 4 nodes with 6 slots each -> 12 GPUs (72 slots).
    weight = make("lognormal", LAYERS, 64, seed=72)
    prev = solve(weight, 96, 8, 4, 16).phy2log
    result = solve(weight, 96, 8, 4, 16, prev_phy2log=prev, new_num_gpus=12)
    assert_valid_maps(*result.triple(), LAYERS, 64, 72, 12)
    assert bool((result.logcnt > 0).all())
    replayed = apply_transfers(prev, result.transfers, 6, 12, result.gpu_ids)
    assert torch.equal(replayed, result.phy2log)
    # The removed node's GPUs are still up while they drain: they may serve as sources.
    assert bool((result.transfers[:, SRC_GPU] < 16).all())


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"unavailable_gpus": [32]}, "unavailable_gpus"),
        ({"unavailable_gpus": [-1]}, "unavailable_gpus"),
        ({"unavailable_gpus": [3, 3]}, "unavailable_gpus"),
        ({"unavailable_gpus": list(range(GPUS))}, "unavailable_gpus"),
        ({"unavailable_gpus": list(range(8))}, "unavailable_gpus"),  # 216 slots for 256 experts
        ({"new_num_gpus": 36}, "new_num_gpus"),
        ({"new_num_gpus": 0}, "new_num_gpus"),
        ({"new_num_gpus": 40, "unavailable_gpus": [1]}, "unavailable_gpus"),
        ({"new_num_gpus": 40, "max_transfer_seconds": 1.0}, "new_num_gpus"),
        ({"unavailable_gpus": [1], "max_moves_per_layer": 5}, "unavailable_gpus"),  # was exceeded silently
    ],
)
def test_bad_elastic_input_raises_naming_the_argument(in_force, kwargs: dict, name: str) -> None:
    weight, prev = in_force
    with pytest.raises(ValueError, match=name):
        solve(weight, REPLICAS, GROUPS, NODES, GPUS, prev_phy2log=prev, **kwargs)


def test_elastic_needs_the_placement_in_force(in_force) -> None:
    weight, _ = in_force
    with pytest.raises(ValueError, match="prev_phy2log"):
        solve(weight, REPLICAS, GROUPS, NODES, GPUS, unavailable_gpus=[0])


def test_elastic_moves_count_new_gpus_in_full() -> None:
    # 2 GPUs x 2 slots -> 3 GPUs: the new GPU's two copies ship, one kept copy changes on GPU 1.
    prev = torch.tensor([[0, 1, 2, 3]])
    new = torch.tensor([[0, 1, 2, 0, 3, 1]])
    moved, kept = elastic_moves(prev, new, 4, 2, torch.arange(3))
    assert moved.tolist() == [3] and kept.tolist() == [3]
    assert maps.logcnt_from_phy2log(new, 4).tolist() == [[2, 2, 1, 1]]


def test_losing_a_whole_node_plans_on_the_other_nodes_near_a_fresh_plan_with_fewer_copies() -> None:
    # 64 experts in 8 groups, 96 slots on 4 nodes x 4 GPUs (6 slots each); node 2 (GPUs 8-11) fails.
    layers, experts, replicas, groups, nodes, gpus = 4, 64, 96, 8, 4, 16
    slots, lost = replicas // gpus, [8, 9, 10, 11]
    weight = make("zipf", layers, experts, seed=73)
    prev = solve(weight, replicas, groups, nodes, gpus).phy2log
    result = solve(weight, replicas, groups, nodes, gpus, prev_phy2log=prev, unavailable_gpus=lost)
    healthy = gpus - len(lost)
    assert_valid_maps(*result.triple(), layers, experts, slots * healthy, healthy)
    assert bool((result.logcnt > 0).all())
    fresh = solve(weight, slots * healthy, 1, 1, healthy)
    assert bool((result.balancedness >= fresh.balancedness - 0.01 - 1e-9).all())
    assert not bool(torch.isin(result.transfers[:, SRC_GPU], torch.tensor(lost)).any())
    replayed = apply_transfers(prev, result.transfers, slots, healthy, result.gpu_ids)
    assert torch.equal(replayed, result.phy2log)
    fresh_moves, _ = elastic_moves(prev, fresh.phy2log, experts, slots, result.gpu_ids)
    assert int(result.moved_copies.sum()) < int(fresh_moves.sum()), (result.moved_copies.tolist(), fresh_moves.tolist())


def test_repair_blocks_leave_the_elastic_plan_as_it_is(in_force, monkeypatch) -> None:
    """Re-hosting and shedding run in row blocks (memory and the time between cancellation checkpoints);
    rows are independent problems, so blocks of one row plan what one block of every row plans."""
    from rebalancer.solver import elastic

    weight, prev = in_force
    whole = solve(weight, REPLICAS, GROUPS, NODES, GPUS, prev_phy2log=prev, unavailable_gpus=[4])
    monkeypatch.setattr(elastic, "SHED_ROWS", 1)
    monkeypatch.setattr(elastic, "REPAIR_ROWS", 1)
    blocked = solve(weight, REPLICAS, GROUPS, NODES, GPUS, prev_phy2log=prev, unavailable_gpus=[4])
    assert torch.equal(whole.phy2log, blocked.phy2log)
