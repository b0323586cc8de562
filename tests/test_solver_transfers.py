"""Transfer plans, their cost model and transfer budgets: every plan, replayed on the placement in force,
gives exactly the new placement; sources hold the expert, sit on the destination's node when they can, and
share the work; budgets cap the estimated time and the copies a GPU receives."""

from __future__ import annotations

import pytest
import torch
from placement_checks import assert_valid_maps
from rebalancer.solver import CostModel, apply_transfers, maps, rebalance_experts, solve
from rebalancer.solver.transfers import (
    DST_GPU,
    DST_SLOT,
    EXPERT,
    LAYER,
    SRC_GPU,
    choose_sources,
    old_content,
    plan_transfers,
    same_node_share,
    transfer_stats,
)
from rebalancer_testkit.workloads import drift_series, make

# 6 layers, 64 experts in 8 groups, 80 slots, 2 nodes x 4 GPUs (10 slots per GPU).
SHAPE = (6, 64, 80, 8, 2, 8)


def _hosts(phy2log: torch.Tensor, num_experts: int, num_gpus: int) -> torch.Tensor:
    return maps.expert_histogram(phy2log, num_experts, num_gpus) > 0  # [L, G, E]


def _check_plan(
    prev: torch.Tensor, result, num_experts: int, num_gpus: int, gpus_per_node: int, unavailable: tuple = ()
) -> None:
    plan = result.transfers
    slots_per_gpu = prev.shape[1] // num_gpus
    assert plan.dtype == torch.int64 and plan.dim() == 2 and plan.shape[1] == 5
    replayed = apply_transfers(prev, plan, slots_per_gpu, result.gpu_ids.numel(), result.gpu_ids)
    assert torch.equal(replayed, result.phy2log), "the plan replayed on the old placement is not the new one"
    assert bool((plan[:, DST_GPU] == result.gpu_ids[plan[:, DST_SLOT] // slots_per_gpu]).all())
    assert torch.equal(result.phy2log[plan[:, LAYER], plan[:, DST_SLOT]], plan[:, EXPERT])
    old_hosts = _hosts(prev, num_experts, num_gpus)
    network = plan[:, SRC_GPU] != plan[:, DST_GPU]
    sent = plan[network & (plan[:, SRC_GPU] >= 0)]
    assert bool(old_hosts[sent[:, LAYER], sent[:, SRC_GPU], sent[:, EXPERT]].all()), "a source lacks the expert"
    received = plan[network]
    dst_existed = received[:, DST_GPU] < num_gpus
    assert not bool(
        old_hosts[received[dst_existed, LAYER], received[dst_existed, DST_GPU], received[dst_existed, EXPERT]].any()
    ), "a GPU receives an expert it already hosts"
    # Same node first: no network transfer crosses nodes when the destination's node held the expert.
    usable_hosts = old_hosts.clone()
    usable_hosts[:, list(unavailable)] = False
    node_held = usable_hosts.view(prev.shape[0], -1, gpus_per_node, num_experts).any(2)  # [L, nodes, E]
    crossing = received[(received[:, SRC_GPU] // gpus_per_node) != (received[:, DST_GPU] // gpus_per_node)]
    dst_node = crossing[:, DST_GPU] // gpus_per_node
    existing_node = dst_node < node_held.shape[1]
    assert not bool(
        node_held[crossing[existing_node, LAYER], dst_node[existing_node], crossing[existing_node, EXPERT]].any()
    ), "a transfer crosses nodes although the destination's node holds the expert"


@pytest.mark.parametrize("policy", ("auto", "global", "hierarchical", "deepseek"))
def test_every_transfer_plan_applied_to_the_old_placement_yields_the_new_one(policy: str) -> None:
    layers, experts, replicas, groups, nodes, gpus = SHAPE
    series = drift_series(layers, experts, 4, seed=51)
    prev = rebalance_experts(series[0], replicas, groups, nodes, gpus, policy="deepseek")[0]
    for window in range(1, 4):
        result = solve(series[window], replicas, groups, nodes, gpus, policy=policy, prev_phy2log=prev)
        assert_valid_maps(*result.triple(), layers, experts, replicas, gpus)
        _check_plan(prev, result, experts, gpus, gpus // nodes)
        network = result.transfers[:, SRC_GPU] != result.transfers[:, DST_GPU]
        assert int(network.sum()) <= int(result.moved_copies.sum())
        prev = result.phy2log


def test_a_random_placement_in_force_gets_a_consistent_plan() -> None:
    layers, experts, replicas, groups, nodes, gpus = SHAPE
    g = torch.Generator().manual_seed(52)
    prev = torch.cat(
        [torch.arange(experts).repeat(layers, 1), torch.randint(experts, (layers, replicas - experts), generator=g)], 1
    )
    prev = prev.gather(1, torch.rand(layers, replicas, generator=g).argsort(1))
    result = solve(make("hot", layers, experts, seed=52), replicas, groups, nodes, gpus, prev_phy2log=prev)
    _check_plan(prev, result, experts, gpus, gpus // nodes)


def test_no_placement_in_force_means_no_plan_and_an_unchanged_one_an_empty_plan() -> None:
    layers, experts, replicas, groups, nodes, gpus = SHAPE
    weight = make("zipf", layers, experts, seed=53)
    fresh = solve(weight, replicas, groups, nodes, gpus)
    assert fresh.transfers is None and fresh.moved_bytes == 0.0
    again = solve(weight, replicas, groups, nodes, gpus, prev_phy2log=fresh.phy2log)
    assert again.transfers.shape == (0, 5)
    assert again.moved_bytes == 0.0 and again.estimated_transfer_seconds == 0.0 and again.intra_node_share == 1.0


def test_cost_model_counts_bytes_links_and_the_busiest_gpu() -> None:
    # 4 GPUs on 2 nodes, 2 slots each, one layer. GPU 0 {0, 1} -> {0, 3}: expert 3 from GPU 1 (same
    # node, before GPU 3 on the other); GPU 1 {2, 3} -> {2, 0}: expert 0 from GPU 0; GPU 2 {4, 5} -> {4, 2}:
    # expert 2 only on GPU 1, across nodes.
    prev = torch.tensor([[0, 1, 2, 3, 4, 5, 3, 1]])
    new = torch.tensor([[0, 3, 2, 0, 4, 2, 3, 1]])
    plan = plan_transfers(prev, new, 6, 2, 2)
    assert plan.tolist() == [[0, 3, 0, 1, 1], [0, 0, 1, 3, 0], [0, 2, 2, 5, 1]]
    cost = CostModel(bytes_per_expert=1000, intra_node_bandwidth=100.0, inter_node_bandwidth=10.0)
    stats = transfer_stats(plan, 1, 4, 2, cost)
    assert stats["moved_bytes"] == 3000
    assert stats["intra_node_share"] == pytest.approx(2 / 3)
    assert stats["intra_node_seconds"] == pytest.approx(1000 / 100.0)  # one copy per GPU at most, each way
    assert stats["inter_node_seconds"] == pytest.approx(1000 / 10.0)  # GPU 1 sends one copy to GPU 2
    assert stats["estimated_transfer_seconds"] == pytest.approx(100.0)
    # Two of the three copies had a source on their node, and both were fetched there.
    assert same_node_share(prev, plan, 6, 4, 2) == (1.0, pytest.approx(2 / 3))


@pytest.mark.parametrize("policy", ("auto", "deepseek"))
def test_nodes_count_for_transfers_when_the_plan_ignores_them(policy: str) -> None:
    # One expert group on 2 nodes (Qwen, Kimi): the plan is global, but copies still cross real nodes.
    # The nodes were dropped with the hierarchy: every copy was costed and sourced as intra-node.
    layers, experts, replicas, nodes, gpus = 6, 64, 80, 2, 8
    series = drift_series(layers, experts, 2, seed=41)
    prev = solve(series[0], replicas, 1, nodes, gpus, policy=policy).phy2log
    result = solve(series[1], replicas, 1, nodes, gpus, policy=policy, prev_phy2log=prev, balance_tolerance=0.0)
    _check_plan(prev, result, experts, gpus, gpus // nodes)
    stats = transfer_stats(result.transfers, layers, gpus, gpus // nodes, CostModel())
    assert result.intra_node_share == pytest.approx(stats["intra_node_share"])
    assert 0.0 < result.intra_node_share < 1.0
    assert result.estimated_transfer_seconds == pytest.approx(stats["estimated_transfer_seconds"])
    # Scaling is by whole nodes of 4 GPUs, not by the 8 GPUs of a single planning "node".
    scaled = solve(series[1], replicas, 1, nodes, gpus, policy=policy, prev_phy2log=prev, new_num_gpus=12)
    assert scaled.gpu_ids.tolist() == list(range(12))


def test_sources_of_a_replicated_expert_share_the_sending() -> None:
    # Expert 0 has 4 copies on node 0 (GPUs 0-3); GPUs 4-7 on node 0 too each need one: 4 distinct sources.
    prev = torch.tensor([[0, 1, 0, 2, 0, 3, 0, 4, 5, 6, 7, 8, 9, 10, 11, 12]])
    new = prev.clone()
    new[0, [9, 11, 13, 15]] = 0
    plan = plan_transfers(prev, new, 13, 2, 8)
    assert sorted(plan[:, SRC_GPU].tolist()) == [0, 1, 2, 3]


def test_elastic_transfers_never_come_from_an_unavailable_gpu() -> None:
    layers, experts, replicas, groups, nodes, gpus = SHAPE
    weight = make("zipf", layers, experts, seed=54)
    prev = solve(weight, replicas, groups, nodes, gpus).phy2log
    result = solve(weight, replicas, groups, nodes, gpus, prev_phy2log=prev, unavailable_gpus=[5])
    assert result.gpu_ids.tolist() == [0, 1, 2, 3, 4, 6, 7]
    assert not bool((result.transfers[:, SRC_GPU] == 5).any())
    _check_plan(prev, result, experts, gpus, gpus // nodes, unavailable=(5,))


# --- budgets -------------------------------------------------------------------------------------------


def _shifted(seed: int):
    layers, experts, replicas, groups, nodes, gpus = SHAPE
    prev = solve(make("zipf", layers, experts, seed=seed), replicas, groups, nodes, gpus).phy2log
    return prev, make("hot", layers, experts, seed=seed + 1)


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.6, 1.0])
def test_max_transfer_seconds_caps_the_estimate(fraction: float) -> None:
    layers, experts, replicas, groups, nodes, gpus = SHAPE
    prev, weight = _shifted(55)
    full = solve(weight, replicas, groups, nodes, gpus, prev_phy2log=prev)
    budget = fraction * full.estimated_transfer_seconds
    capped = solve(weight, replicas, groups, nodes, gpus, prev_phy2log=prev, max_transfer_seconds=budget)
    assert capped.estimated_transfer_seconds <= budget + 1e-12
    assert_valid_maps(*capped.triple(), layers, experts, replicas, gpus)
    _check_plan(prev, capped, experts, gpus, gpus // nodes)
    assert float(capped.balancedness.mean()) >= float(capped.balancedness_before.mean()) - 1e-12
    if fraction == 0.0:
        assert torch.equal(capped.phy2log, prev) and capped.deferred_layers == int((full.moved_copies > 0).sum())
    if fraction == 1.0:
        assert torch.equal(capped.phy2log, full.phy2log) and capped.deferred_layers == 0


@pytest.mark.parametrize("cap", [0, 1, 3, 10])
def test_max_incoming_copies_per_gpu_caps_every_gpu(cap: int) -> None:
    layers, experts, replicas, groups, nodes, gpus = SHAPE
    prev, weight = _shifted(57)
    result = solve(weight, replicas, groups, nodes, gpus, prev_phy2log=prev, max_incoming_copies_per_gpu=cap)
    plan = result.transfers
    network = plan[plan[:, SRC_GPU] != plan[:, DST_GPU]]
    incoming = torch.bincount(network[:, DST_GPU], minlength=gpus)
    assert int(incoming.max()) <= cap
    _check_plan(prev, result, experts, gpus, gpus // nodes)


def test_a_budget_moves_first_the_layers_that_gain_most_per_byte() -> None:
    # Layer 0 is badly balanced and one handover fixes much; layer 1 is nearly balanced: with room for
    # one layer's copies, layer 0 goes first.
    layers, experts, replicas, groups, nodes, gpus = SHAPE
    prev, weight = _shifted(59)
    weight = weight.clone()
    weight[1] = prev.new_ones(experts, dtype=torch.float32) * 100 + torch.arange(experts) * 0.01
    full = solve(weight, replicas, groups, nodes, gpus, prev_phy2log=prev)
    gain = full.balancedness - full.balancedness_before
    per_copy = gain / full.moved_copies.clamp_min(1)
    best = int(per_copy.argmax())
    room = int(full.moved_copies[best])
    capped = solve(weight, replicas, groups, nodes, gpus, prev_phy2log=prev, max_incoming_copies_per_gpu=room)
    assert torch.equal(capped.phy2log[best], full.phy2log[best])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"max_transfer_seconds": -1.0}, "max_transfer_seconds"),
        ({"max_transfer_seconds": float("nan")}, "max_transfer_seconds"),
        ({"max_incoming_copies_per_gpu": -1}, "max_incoming_copies_per_gpu"),
        ({"max_incoming_copies_per_gpu": 1.5}, "max_incoming_copies_per_gpu"),
        ({"cost_model": CostModel(bytes_per_expert=0)}, "bytes_per_expert"),
        ({"cost_model": CostModel(inter_node_bandwidth=-5.0)}, "inter_node_bandwidth"),
        ({"cost_model": CostModel(intra_node_bandwidth=float("inf"))}, "intra_node_bandwidth"),
    ],
)
def test_bad_budgets_and_cost_models_raise_naming_the_argument(kwargs: dict, name: str) -> None:
    layers, experts, replicas, groups, nodes, gpus = SHAPE
    prev, weight = _shifted(61)
    with pytest.raises(ValueError, match=name):
        solve(weight, replicas, groups, nodes, gpus, prev_phy2log=prev, **kwargs)


def test_every_source_is_the_least_sending_holder_when_it_is_picked() -> None:
    # Picks in rounds (each seeing only the earlier rounds' sends) sent eight copies of one expert from the
    # one of its thirteen holders that had sent least before the round: DeepSeek-V3 EP72's busiest sender
    # sent 90 copies where 56 do. Each pick, in order (fewest choices first), must see every earlier one.
    generator = torch.Generator().manual_seed(3)
    for _ in range(20):
        transfers, gpus, per_node = 400, 16, 4
        candidates = torch.rand(transfers, gpus, generator=generator) < 0.4
        dst = torch.randint(0, gpus, (transfers,), generator=generator)
        chosen = choose_sources(candidates, dst, per_node).tolist()
        same_node = (torch.arange(gpus) // per_node).view(1, -1) == (dst // per_node).view(-1, 1)
        near = candidates & same_node
        preferred = torch.where(near.any(1, keepdim=True), near, candidates)
        link = (~near.any(1)).long().tolist()
        sent = [[0] * gpus, [0] * gpus]
        for t in sorted(range(transfers), key=lambda t: (int(preferred[t].sum()), t)):
            holders = preferred[t].nonzero().flatten().tolist()
            if not holders:
                assert chosen[t] == -1
                continue
            assert chosen[t] in holders
            assert sent[link[t]][chosen[t]] == min(sent[link[t]][g] for g in holders)
            sent[link[t]][chosen[t]] += 1


def test_sources_are_chosen_the_same_for_any_device_of_the_candidates() -> None:
    generator = torch.Generator().manual_seed(8)
    for _ in range(30):
        transfers = int(torch.randint(0, 300, (1,), generator=generator))
        gpus = int(torch.randint(1, 33, (1,), generator=generator))
        per_node = max(d for d in range(1, 9) if gpus % d == 0)
        candidates = torch.rand(transfers, gpus, generator=generator) < float(torch.rand(1, generator=generator))
        dst = torch.randint(0, gpus + 4, (transfers,), generator=generator)
        chosen = choose_sources(candidates, dst, per_node)
        assert chosen.shape == (transfers,) and chosen.dtype == torch.int64
        has = candidates.any(1)
        assert bool((chosen[~has] == -1).all())
        assert bool(candidates[has.nonzero().flatten(), chosen[has]].all())  # a source really holds it
        if torch.cuda.is_available():
            assert torch.equal(choose_sources(candidates.cuda(), dst.cuda(), per_node).cpu(), chosen)


def _slot_writes_and_arrivals(before: torch.Tensor, after: torch.Tensor, slots_per_gpu: int) -> tuple[int, int]:
    """Slots whose expert changes, and copies GPUs gain (per GPU: new count - old count, where positive)."""
    writes = int(((before != after) & (after >= 0)).sum())
    num_gpus = after.shape[1] // slots_per_gpu
    size = int(max(before.max(), after.max())) + 2
    old = maps.expert_histogram(torch.where(before < 0, size - 1, before), size, num_gpus)[..., : size - 1]
    new = maps.expert_histogram(after, size, num_gpus)[..., : size - 1]
    return writes, int((new - old).clamp_min(0).sum())


@pytest.mark.parametrize("policy", ("auto", "global", "hierarchical", "deepseek"))
@pytest.mark.parametrize("change", [{}, {"unavailable_gpus": [5]}, {"new_num_gpus": 32}])
def test_a_plan_writes_only_the_slots_that_receive_a_copy(policy: str, change: dict) -> None:
    # Wide EP in small (4 slots per GPU): the refinements reorder slots within GPUs, so plans against a
    # placement in force shuffled copies locally (EP72: 2,299 local rows beside 2,041 arrivals, twice the
    # estimated time) and overwrote slots those shuffles read from.
    layers, experts, replicas, groups, nodes, gpus = 4, 64, 96, 4, 3, 24
    series = drift_series(layers, experts, 2, seed=43)
    prev = solve(series[0], replicas, groups, nodes, gpus, policy=policy).phy2log
    result = solve(series[1], replicas, groups, nodes, gpus, policy=policy, prev_phy2log=prev, **change)
    before = old_content(prev, replicas // gpus, result.gpu_ids)
    writes, arrivals = _slot_writes_and_arrivals(before, result.phy2log, replicas // gpus)
    assert writes == arrivals == result.transfers.shape[0]
