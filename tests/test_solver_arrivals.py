"""Arrivals traded between nodes for same-node sources, and for fewer copies on the busiest NIC receiver: the
peak, the copy counts, the moved copies and each GPU's arrivals stay as they were, kept copies keep their
slots, and more copies travel within a node or off the busiest receiver."""

from __future__ import annotations

import contextlib
import functools
from unittest import mock

import pytest
import torch
from rebalancer.solver import apply_transfers, maps, solve
from rebalancer.solver.arrivals import balanced_receivers, near_sources
from rebalancer.solver.migration import groups_on_one_node, keep_old_slots
from rebalancer.solver.transfers import DST_GPU, SRC_GPU, link_usage, plan_transfers
from rebalancer_testkit.workloads import drift_series

# 8 layers, 64 experts in 8 groups, 96 slots, 4 nodes x 2 GPUs (12 slots per GPU).
LAYERS, EXPERTS, SLOTS, GROUPS, NODES, GPUS = 8, 64, 96, 8, 4, 8
PER_NODE, PER_GPU = GPUS // NODES, SLOTS // GPUS


def _peak(loads: torch.Tensor, phy2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    counts = maps.logcnt_from_phy2log(phy2log, loads.shape[1])
    return maps.gpu_loads(loads.double(), phy2log, counts, num_gpus).max(-1).values


def _intra_copies(prev: torch.Tensor, new: torch.Tensor, num_experts: int, slots_per_gpu: int, per_node: int) -> int:
    plan = plan_transfers(prev, new, num_experts, slots_per_gpu, per_node)
    network = plan[plan[:, SRC_GPU] != plan[:, DST_GPU]]
    return int((network[:, SRC_GPU] // per_node == network[:, DST_GPU] // per_node).sum())


def _arrivals_per_gpu(prev: torch.Tensor, new: torch.Tensor, num_experts: int, num_gpus: int) -> torch.Tensor:
    grown = maps.expert_histogram(new, num_experts, num_gpus) - maps.expert_histogram(prev, num_experts, num_gpus)
    return grown.clamp_min(0).sum(-1)  # [L, G]


def _fresh_plan_on_old_slots(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loads of the next window, the placement in force, a fresh plan for them with kept copies in their slots)."""
    series = drift_series(LAYERS, EXPERTS, 2, seed=seed)
    prev = solve(series[0], SLOTS, 1, 1, GPUS, device="cpu").phy2log
    fresh = solve(series[1], SLOTS, 1, 1, GPUS, device="cpu", seed=seed + 1).phy2log
    return series[1].double(), prev, keep_old_slots(prev, fresh, GPUS)


@pytest.mark.parametrize("seed", range(6))
def test_trades_keep_peak_counts_moves_and_arrivals_and_raise_same_node_copies(seed: int) -> None:
    loads, prev, new = _fresh_plan_on_old_slots(seed)
    traded = near_sources(loads, prev, new, PER_GPU, PER_NODE)
    assert not torch.equal(traded, new), "a fresh plan on 4 nodes leaves some arrival to trade"
    assert bool((_peak(loads, traded, GPUS) <= _peak(loads, new, GPUS) * (1 + 1e-9)).all())
    assert torch.equal(maps.logcnt_from_phy2log(traded, EXPERTS), maps.logcnt_from_phy2log(new, EXPERTS))
    assert torch.equal(maps.moved_copies(prev, traded, EXPERTS, GPUS), maps.moved_copies(prev, new, EXPERTS, GPUS))
    assert torch.equal(_arrivals_per_gpu(prev, traded, EXPERTS, GPUS), _arrivals_per_gpu(prev, new, EXPERTS, GPUS))
    stays = new == prev
    assert torch.equal(traded[stays], new[stays]), "a kept copy left its slot"
    assert _intra_copies(prev, traded, EXPERTS, PER_GPU, PER_NODE) > _intra_copies(
        prev, new, EXPERTS, PER_GPU, PER_NODE
    )
    plan = plan_transfers(prev, traded, EXPERTS, PER_GPU, PER_NODE)
    assert torch.equal(apply_transfers(prev, plan, PER_GPU, GPUS), traded)


def _crossed_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """2 nodes x 2 GPUs, 2 slots each. Expert 4 lives on GPU 1 (node 0) and expert 5 on GPU 3 (node 1);
    the new plan gives GPU 0 a second copy of 5 and GPU 2 one of 4, both fetched across nodes. Traded,
    GPU 0 takes 4 and GPU 2 takes 5: both copies come from their own node, GPU loads as before."""
    prev = torch.tensor([[2, 0, 4, 2, 3, 1, 5, 3]])
    new = torch.tensor([[5, 0, 4, 2, 4, 1, 5, 3]])
    return torch.ones(1, 6, dtype=torch.float64), prev, new


TRADED = [[4, 0, 4, 2, 5, 1, 5, 3]]


def test_a_crossed_pair_of_arrivals_is_traded_for_same_node_sources() -> None:
    loads, prev, new = _crossed_case()
    traded = near_sources(loads, prev, new, 2, 2)
    assert traded.tolist() == TRADED
    assert _intra_copies(prev, new, 6, 2, 2) == 0 and _intra_copies(prev, traded, 6, 2, 2) == 2


def test_a_trade_that_would_raise_the_peak_is_not_made() -> None:
    _, prev, new = _crossed_case()
    # Copies: 4 weighs 4, 5 weighs 1. GPU loads 4, 4, 4, 1 (peak 4); traded GPU 0 would carry 4 + 3 = 7.
    loads = torch.tensor([[3.0, 0.0, 0.0, 0.0, 8.0, 2.0]], dtype=torch.float64)
    assert near_sources(loads, prev, new, 2, 2).tolist() == new.tolist()
    loads[0, 0] = 0.0  # GPU 0 and 2 then carry 1 and 4, traded 4 and 1: the peak stays 4, the trade is made
    assert near_sources(loads, prev, new, 2, 2).tolist() == TRADED


def test_a_failed_gpu_is_no_same_node_source() -> None:
    loads, prev, new = _crossed_case()
    # GPU 1 failed: 4 has no source on node 0, but 5 still gains one on node 1, so the trade is made.
    assert near_sources(loads, prev, new, 2, 2, usable_sources=torch.tensor([1, 0, 1, 1]).bool()).tolist() == TRADED
    # GPUs 1 and 3 failed: neither copy can gain, so nothing changes.
    usable = torch.tensor([1, 0, 1, 0]).bool()
    assert near_sources(loads, prev, new, 2, 2, usable_sources=usable).tolist() == new.tolist()


def test_an_arrival_never_lands_where_its_expert_was_or_is() -> None:
    loads, prev, _ = _crossed_case()
    # GPU 0 receives 3 (held on node 1 only), GPU 2 receives 2 (node 0 only); but GPU 0 held 2 before and
    # GPU 2 held 3: the trade would bring each back to where it was, which is no transfer to choose.
    new = torch.tensor([[3, 0, 4, 2, 2, 1, 5, 3]])
    assert near_sources(loads, prev, new, 2, 2).tolist() == new.tolist()


def test_inactive_layers_are_left_alone() -> None:
    loads, prev, new = _fresh_plan_on_old_slots(3)
    active = torch.tensor([True, False] * (LAYERS // 2))
    traded = near_sources(loads, prev, new, PER_GPU, PER_NODE, active=active)
    assert torch.equal(traded[~active], new[~active])
    assert not torch.equal(traded[active], new[active])


def test_layers_trade_alone_whatever_the_batch() -> None:
    loads, prev, new = _fresh_plan_on_old_slots(4)
    whole = near_sources(loads, prev, new, PER_GPU, PER_NODE)
    for layer in range(LAYERS):
        rows = slice(layer, layer + 1)
        assert torch.equal(near_sources(loads[rows], prev[rows], new[rows], PER_GPU, PER_NODE), whole[rows])


@pytest.mark.parametrize("change", [{"unavailable_gpus": [1]}, {"new_num_gpus": 10}])
def test_a_changed_gpu_set_trades_too(change: dict) -> None:
    loads = drift_series(LAYERS, EXPERTS, 1, seed=5)[0]
    prev = solve(loads, SLOTS, 1, 1, GPUS, device="cpu").phy2log
    replan = functools.partial(solve, loads, SLOTS, GROUPS, NODES, GPUS, device="cpu", prev_phy2log=prev, **change)
    traded = replan()
    with mock.patch("rebalancer.solver.api._near_sources", new=lambda _, phy2log: phy2log):
        plain = replan()
    assert torch.equal(traded.gpu_ids, plain.gpu_ids)
    assert bool((traded.balancedness >= plain.balancedness - 1e-9).all())
    assert torch.equal(traded.moved_copies, plain.moved_copies)
    assert traded.intra_node_share > plain.intra_node_share
    assert torch.equal(
        apply_transfers(prev, traded.transfers, PER_GPU, traded.gpu_ids.numel(), traded.gpu_ids), traded.phy2log
    )


def _drift_plans(policy: str, trade: bool, groups: int = GROUPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(the placement in force, the plan for the next window), arrivals traded or the step patched out."""
    series = drift_series(LAYERS, EXPERTS, 2, seed=7)
    prev = solve(series[0], SLOTS, groups, NODES, GPUS, device="cpu", policy=policy).phy2log
    untraded = mock.patch("rebalancer.solver.api._near_sources", new=lambda _, phy2log: phy2log)
    with contextlib.nullcontext() if trade else untraded:
        result = solve(series[1], SLOTS, groups, NODES, GPUS, device="cpu", policy=policy, prev_phy2log=prev)
    return prev, result.phy2log


def test_solve_with_a_placement_in_force_fetches_more_copies_within_the_node() -> None:
    prev, traded = _drift_plans("global", trade=True)
    _, plain = _drift_plans("global", trade=False)
    assert _intra_copies(prev, traded, EXPERTS, PER_GPU, PER_NODE) > _intra_copies(
        prev, plain, EXPERTS, PER_GPU, PER_NODE
    )


@pytest.mark.parametrize(("policy", "groups"), [("deepseek", 1), ("deepseek", GROUPS), ("hierarchical", GROUPS)])
def test_the_published_plan_and_layers_kept_on_their_node_are_not_traded(policy: str, groups: int) -> None:
    _, traded = _drift_plans(policy, trade=True, groups=groups)
    _, plain = _drift_plans(policy, trade=False, groups=groups)
    assert torch.equal(traded, plain)
    if policy == "hierarchical":
        assert bool(groups_on_one_node(traded, EXPERTS, GROUPS, NODES).all())
    if groups == 1:  # a flat plan with trades allowed would trade (the published one must not)
        _, flat = _drift_plans("global", trade=True, groups=1)
        _, flat_plain = _drift_plans("global", trade=False, groups=1)
        assert not torch.equal(flat, flat_plain)


# Drifting windows on 4 nodes x 4 GPUs (8 slots each): the incremental plans leave GPUs under the peak,
# which receive balancing needs (a fresh plan sits at its peak almost everywhere).
WIDE = {"layers": 16, "experts": 64, "slots": 128, "nodes": 4, "gpus": 16}
WIDE_PER_GPU, WIDE_PER_NODE = 8, 4
UNBALANCED = "rebalancer.solver.rearrangement.balanced_receivers"


def _nic_receives(prev: torch.Tensor, phy2log: torch.Tensor) -> torch.Tensor:
    """Copies each GPU receives over the NIC in the whole plan [G] (the WIDE layout)."""
    plan = plan_transfers(prev, phy2log, WIDE["experts"], WIDE_PER_GPU, WIDE_PER_NODE)
    return link_usage(plan, WIDE["layers"], WIDE["gpus"], WIDE_PER_NODE).sum(0)[:, 3]


def _wide_replan(seed: int, balance: bool):
    """(loads, the placement in force, the solve result for the next window) on the WIDE layout."""
    layers, experts, slots, nodes, gpus = WIDE.values()
    series = drift_series(layers, experts, 2, seed=seed)
    prev = solve(series[0], slots, 1, nodes, gpus, device="cpu").phy2log
    unbalanced = mock.patch(UNBALANCED, new=lambda _loads, _prev, phy2log, *_, **__: phy2log)
    with contextlib.nullcontext() if balance else unbalanced:
        result = solve(series[1], slots, 1, nodes, gpus, device="cpu", prev_phy2log=prev)
    return series[1].double(), prev, result


@pytest.mark.parametrize("seed", range(4))
def test_receive_balancing_lowers_the_busiest_nic_receiver_and_keeps_the_rest(seed: int) -> None:
    experts, gpus = WIDE["experts"], WIDE["gpus"]
    loads, prev, plain = _wide_replan(seed, balance=False)
    traded = plain.phy2log
    balanced = balanced_receivers(loads, prev, traded, WIDE_PER_GPU, WIDE_PER_NODE)
    assert _nic_receives(prev, balanced).max() < _nic_receives(prev, traded).max()
    assert bool((_peak(loads, balanced, gpus) <= _peak(loads, traded, gpus) * (1 + 1e-9)).all())
    assert torch.equal(maps.logcnt_from_phy2log(balanced, experts), maps.logcnt_from_phy2log(traded, experts))
    assert torch.equal(maps.moved_copies(prev, balanced, experts, gpus), maps.moved_copies(prev, traded, experts, gpus))
    assert torch.equal(_arrivals_per_gpu(prev, balanced, experts, gpus), _arrivals_per_gpu(prev, traded, experts, gpus))
    stays = traded == prev
    assert torch.equal(balanced[stays], traded[stays])
    intra = functools.partial(
        _intra_copies, prev, num_experts=experts, slots_per_gpu=WIDE_PER_GPU, per_node=WIDE_PER_NODE
    )
    assert intra(balanced) >= intra(traded)
    plan = plan_transfers(prev, balanced, experts, WIDE_PER_GPU, WIDE_PER_NODE)
    assert torch.equal(apply_transfers(prev, plan, WIDE_PER_GPU, gpus), balanced)


def test_receive_balancing_leaves_inactive_layers_alone() -> None:
    loads, prev, plain = _wide_replan(1, balance=False)
    active = torch.tensor([False, True] * (WIDE["layers"] // 2))
    balanced = balanced_receivers(loads, prev, plain.phy2log, WIDE_PER_GPU, WIDE_PER_NODE, active=active)
    assert torch.equal(balanced[~active], plain.phy2log[~active])
    assert not torch.equal(balanced[active], plain.phy2log[active])


def test_solve_balances_the_nic_receivers_of_its_rearrangement() -> None:
    _, prev, balanced = _wide_replan(1, balance=True)
    _, _, plain = _wide_replan(1, balance=False)
    assert balanced.estimated_transfer_seconds < plain.estimated_transfer_seconds
    assert torch.equal(balanced.moved_copies, plain.moved_copies)
    assert bool((balanced.balancedness >= plain.balancedness - 1e-9).all())
    assert torch.equal(apply_transfers(prev, balanced.transfers, WIDE_PER_GPU, WIDE["gpus"]), balanced.phy2log)
