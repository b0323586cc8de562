"""Migration- and history-aware placement: with the placement in force the solver ships far
fewer expert copies than a fresh plan at (almost) the same next-window balancedness, respects a per-layer
move budget, and with a load history stays valid and deterministic."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from placement_checks import assert_groups_on_one_node, assert_valid_maps
from rebalancer.solver import DEFAULT_BALANCE_TOLERANCE, maps, rebalance_experts, solve
from rebalancer.solver.migration import keep_old_slots
from rebalancer_testkit.workloads import balancedness, drift_series, make

SOLVER_POLICIES = ("auto", "global", "hierarchical")
# Mid-size DeepSeek-like shape scaled down: 8 layers, 64 experts in 8 groups, 72 slots, 2 nodes x 4 GPUs.
DRIFT_SHAPE = (8, 64, 72, 8, 2, 8)
# Small shape for the option tests.
SMALL = (4, 32, 40, 4, 2, 8)


def _moves(prev: torch.Tensor, new: torch.Tensor, num_experts: int, num_gpus: int) -> torch.Tensor:
    return maps.moved_copies(prev, new, num_experts, num_gpus)


def assert_within_move_budget(weight: torch.Tensor, prev: torch.Tensor, shape: tuple, policy: str, budget: int) -> None:
    """Plan `weight` [L, E] from `prev` [L, R] with `max_moves_per_layer=budget`: valid maps, at most `budget`
    copies moved per layer (counted as `_moves` counts them), and nothing moved at all for a budget of 0."""
    layers, experts, replicas, groups, nodes, gpus = shape
    result = solve(weight, replicas, groups, nodes, gpus, policy=policy, prev_phy2log=prev, max_moves_per_layer=budget)
    assert_valid_maps(*result.triple(), layers, experts, replicas, gpus)
    assert bool((result.moved_copies <= budget).all()), result.moved_copies.tolist()
    assert torch.equal(result.moved_copies, _moves(prev, result.phy2log, experts, gpus))
    if budget == 0:
        assert torch.equal(result.phy2log, prev)


def test_migration_ships_far_fewer_copies_than_replanning_at_the_same_next_window_balance() -> None:
    layers, experts, replicas, groups, nodes, gpus = DRIFT_SHAPE
    windows = 8
    series = drift_series(layers, experts, windows, seed=31)
    ours_prev = solve(series[0], replicas, groups, nodes, gpus).phy2log
    ref_prev = rebalance_experts(series[0], replicas, groups, nodes, gpus, policy="deepseek")[0]
    ours_moves = ref_moves = 0
    ours_next, ref_next = [], []
    for i in range(1, windows - 1):
        result = solve(series[i], replicas, groups, nodes, gpus, prev_phy2log=ours_prev)
        assert_valid_maps(*result.triple(), layers, experts, replicas, gpus)
        moved = _moves(ours_prev, result.phy2log, experts, gpus)
        assert torch.equal(result.moved_copies, moved), "reported moved copies disagree with maps.moved_copies"
        ref = rebalance_experts(series[i], replicas, groups, nodes, gpus, policy="deepseek")[0]
        ours_moves += int(moved.sum())
        ref_moves += int(_moves(ref_prev, ref, experts, gpus).sum())
        ours_next.append(float(balancedness(series[i + 1], result.phy2log, gpus).mean()))
        ref_next.append(float(balancedness(series[i + 1], ref, gpus).mean()))
        ours_prev, ref_prev = result.phy2log, ref
    ours_bal, ref_bal = sum(ours_next) / len(ours_next), sum(ref_next) / len(ref_next)
    assert ref_moves > 0
    assert ours_moves < 0.35 * ref_moves, f"moved {ours_moves} vs reference {ref_moves} ({ours_moves / ref_moves:.2f}x)"
    assert ours_bal >= ref_bal - 0.01, f"next-window balancedness {ours_bal:.4f} vs reference {ref_bal:.4f}"


@pytest.mark.parametrize("policy", SOLVER_POLICIES)
def test_migration_stays_within_the_balance_tolerance_of_a_fresh_plan(policy: str) -> None:
    layers, experts, replicas, groups, nodes, gpus = SMALL
    series = drift_series(layers, experts, 3, seed=32)
    prev = solve(series[0], replicas, groups, nodes, gpus, policy=policy).phy2log
    fresh = solve(series[1], replicas, groups, nodes, gpus, policy=policy)
    moved = solve(series[1], replicas, groups, nodes, gpus, policy=policy, prev_phy2log=prev)
    assert_valid_maps(*moved.triple(), layers, experts, replicas, gpus)
    floor = fresh.balancedness - DEFAULT_BALANCE_TOLERANCE - 1e-9
    assert bool((moved.balancedness >= floor).all()), (moved.balancedness.tolist(), fresh.balancedness.tolist())
    assert int(moved.moved_copies.sum()) <= int(_moves(prev, fresh.phy2log, experts, gpus).sum())
    # balancedness_before scores the placement in force on the new loads.
    before = balancedness(series[1], prev, gpus)
    assert moved.balancedness_before is not None
    assert torch.allclose(moved.balancedness_before.cpu(), before, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("policy", (*SOLVER_POLICIES, "deepseek"))  # the published plan too: over the cap it keeps
@pytest.mark.parametrize("budget", [0, 1, 3, 8, 12, 20, 40])
def test_max_moves_per_layer_is_respected(policy: str, budget: int) -> None:
    layers, experts, replicas, groups, nodes, gpus = SMALL
    series = drift_series(layers, experts, 2, seed=33)
    prev = solve(series[0], replicas, groups, nodes, gpus, policy=policy, seed=4).phy2log
    # A different skew on the next window: a fresh plan would move many copies.
    assert_within_move_budget(make("hot", layers, experts, seed=34), prev, SMALL, policy, budget)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**16),
    budget=st.one_of(st.integers(0, 6), st.integers(7, 30)),
    policy=st.sampled_from(SOLVER_POLICIES),
    kind=st.sampled_from(["zipf", "lognormal", "hot"]),
    shape=st.sampled_from([(2, 8, 16, 2, 2, 8), (2, 16, 24, 4, 2, 4), (3, 12, 16, 3, 1, 4), (2, 16, 16, 4, 2, 4)]),
)
def test_max_moves_per_layer_is_respected_from_any_placement_in_force(
    seed: int, budget: int, policy: str, kind: str, shape: tuple
) -> None:
    layers, experts, replicas = shape[:3]
    g = torch.Generator().manual_seed(seed)
    # A random valid placement in force: every expert once, the spare slots random, shuffled.
    prev = torch.cat(
        [torch.arange(experts).repeat(layers, 1), torch.randint(experts, (layers, replicas - experts), generator=g)], 1
    )
    prev = prev.gather(1, torch.rand(layers, replicas, generator=g).argsort(1))
    assert_within_move_budget(make(kind, layers, experts, seed=seed), prev, shape, policy, budget)


def test_a_move_budget_allowing_a_few_swaps_gives_a_valid_plan() -> None:
    # Found by the property above: budgets 10-13 (a few swap rounds after the copy handovers) raised
    # RuntimeError "some elements of the input tensor and the written-to tensor refer to a single memory
    # location" in the swap refinement when every layer was still improving after its last round.
    weight = torch.tensor(
        [
            [6909.0, 35712.0, 4334.0, 10847.0, 13167.0, 6857.0, 16081.0, 6093.0],
            [40705.0, 5525.0, 6097.0, 5187.0, 3592.0, 5750.0, 10501.0, 22643.0],
        ]
    )
    prev = torch.tensor(
        [[0, 2, 3, 3, 3, 3, 6, 4, 7, 4, 0, 1, 7, 5, 7, 5], [3, 2, 4, 2, 0, 4, 7, 3, 1, 1, 5, 6, 7, 0, 6, 5]]
    )
    for budget in (10, 11, 12, 13):
        result = solve(weight, 16, 2, 2, 8, prev_phy2log=prev, max_moves_per_layer=budget)
        assert_valid_maps(*result.triple(), 2, 8, 16, 8)
        assert bool((result.moved_copies <= budget).all())


@pytest.mark.parametrize("policy", SOLVER_POLICIES)
def test_an_optimal_placement_with_unchanged_loads_moves_nothing(policy: str) -> None:
    layers, experts, replicas, groups, nodes, gpus = SMALL
    weight = make("zipf", layers, experts, seed=35)
    best = solve(weight, replicas, groups, nodes, gpus, policy=policy)
    again = solve(weight, replicas, groups, nodes, gpus, policy=policy, prev_phy2log=best.phy2log)
    assert again.moved_copies.tolist() == [0] * layers
    assert torch.allclose(again.balancedness, best.balancedness)


def test_relabelled_gpus_of_the_same_plan_cost_no_moves() -> None:
    # The placement in force is the fresh plan with its GPUs permuted: relabelling makes it free.
    layers, experts, replicas, groups, nodes, gpus = 2, 16, 24, 1, 1, 8
    weight = make("lognormal", layers, experts, seed=36)
    plan = solve(weight, replicas, groups, nodes, gpus, policy="global").phy2log
    per_gpu = plan.view(layers, gpus, -1)
    prev = per_gpu[:, torch.tensor([3, 0, 7, 1, 6, 2, 5, 4])].reshape(layers, replicas)
    result = solve(weight, replicas, groups, nodes, gpus, policy="global", prev_phy2log=prev)
    assert result.moved_copies.tolist() == [0] * layers


def test_solve_reports_moves_as_maps_moved_copies() -> None:
    layers, experts, replicas, groups, nodes, gpus = SMALL
    series = drift_series(layers, experts, 3, seed=37)
    prev = rebalance_experts(series[0], replicas, groups, nodes, gpus, policy="deepseek")[0]
    for policy in ("auto", "deepseek"):
        result = solve(series[2], replicas, groups, nodes, gpus, policy=policy, prev_phy2log=prev)
        assert torch.equal(result.moved_copies, _moves(prev, result.phy2log, experts, gpus))
        assert result.moved_copies.dtype == torch.int64 and result.moved_copies.shape == (layers,)


def test_moved_copies_counts_new_experts_per_gpu() -> None:
    # Two GPUs x 2 slots: GPU 0 {0, 1} -> {0, 2} ships one copy (2), GPU 1 {2, 3} -> {1, 3} ships one (1).
    prev = torch.tensor([[0, 1, 2, 3]])
    new = torch.tensor([[2, 0, 3, 1]])
    assert _moves(prev, new, 4, 2).tolist() == [2]
    assert _moves(prev, prev.view(1, 2, 2).flip(2).flatten(1), 4, 2).tolist() == [0]
    # A second copy of an expert already on the GPU is still a shipped copy.
    assert _moves(torch.tensor([[0, 1, 2, 2]]), torch.tensor([[0, 0, 2, 1]]), 3, 2).tolist() == [2]


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_moved_copies_equal_the_positive_part_of_the_histogram_change(dtype: torch.dtype) -> None:
    # Random placements with many duplicate copies per GPU, against the definition in int64 histograms.
    generator = torch.Generator().manual_seed(5)
    prev, new = (torch.randint(0, 6, (7, 48), generator=generator).to(dtype) for _ in range(2))
    change = maps.expert_histogram(new, 6, 4) - maps.expert_histogram(prev, 6, 4)
    assert torch.equal(maps.moved_copies(prev, new, 6, 4), change.clamp_min(0).sum((1, 2)))


@pytest.mark.parametrize("tolerance", [DEFAULT_BALANCE_TOLERANCE, 0.0], ids=["default-tolerance", "zero-tolerance"])
@pytest.mark.parametrize("policy", ("auto", "hierarchical"))
def test_hierarchical_plans_keep_groups_on_their_node_with_a_placement_in_force(policy: str, tolerance: float) -> None:
    # A group's experts on one node is what the hierarchical policy is for; migration (incremental moves
    # or the relabelled fresh plan, which zero tolerance favours) must not break it for the layers it
    # reports as hierarchical.
    layers, experts, replicas, groups, nodes, gpus = SMALL
    series = drift_series(layers, experts, 4, seed=38)
    prev = solve(series[0], replicas, groups, nodes, gpus, policy=policy).phy2log
    for i in range(1, 4):
        result = solve(
            series[i], replicas, groups, nodes, gpus, policy=policy, prev_phy2log=prev, balance_tolerance=tolerance
        )
        local = [j for j, name in enumerate(result.policy_per_layer) if name.startswith("hierarchical")]
        assert_groups_on_one_node(result.phy2log, experts, groups, nodes, local)
        prev = result.phy2log


@pytest.mark.parametrize("policy", ("auto", "global", "hierarchical", "deepseek"))
def test_batch_independence_with_the_placement_in_force(policy: str) -> None:
    layers, experts, replicas, groups, nodes, gpus = SMALL
    a_series = drift_series(layers, experts, 2, seed=39)
    b_series = drift_series(2, experts, 2, seed=40)
    prev_a = solve(a_series[0], replicas, groups, nodes, gpus).phy2log
    prev_b = rebalance_experts(b_series[0], replicas, groups, nodes, gpus, policy="deepseek")[0]
    # The plan before its rearrangement (what the service batches: plan_transfers=False) is the same per
    # layer alone or in a batch; the rearrangement's receive balancing then works on one request's layers
    # together, so the placements may differ, but never in the copies each layer ships.
    seeds = torch.cat([5 + torch.arange(layers), 90 + torch.arange(2)])
    for plan_transfers in (False, True):
        options = {"policy": policy, "plan_transfers": plan_transfers}
        alone_a = solve(a_series[1], replicas, groups, nodes, gpus, seed=5, prev_phy2log=prev_a, **options)
        alone_b = solve(b_series[1], replicas, groups, nodes, gpus, seed=90, prev_phy2log=prev_b, **options)
        both = solve(
            torch.cat([a_series[1], b_series[1]]),
            replicas,
            groups,
            nodes,
            gpus,
            layer_seeds=seeds,
            prev_phy2log=torch.cat([prev_a, prev_b]),
            **options,
        )
        if not plan_transfers:
            assert torch.equal(both.phy2log, torch.cat([alone_a.phy2log, alone_b.phy2log]))
        assert torch.equal(both.moved_copies, torch.cat([alone_a.moved_copies, alone_b.moved_copies]))


# --- history --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ("auto", "global", "hierarchical", "deepseek"))
def test_history_gives_valid_deterministic_maps(policy: str) -> None:
    layers, experts, replicas, groups, nodes, gpus = SMALL
    series = drift_series(layers, experts, 5, seed=41)
    history = series[:4]
    first = solve(series[3], replicas, groups, nodes, gpus, policy=policy, history=history)
    second = solve(series[3].clone(), replicas, groups, nodes, gpus, policy=policy, history=history.clone())
    assert_valid_maps(*first.triple(), layers, experts, replicas, gpus)
    assert torch.equal(first.phy2log, second.phy2log)
    # Integer window sums are accepted as well.
    ints = solve(series[3], replicas, groups, nodes, gpus, policy=policy, history=history.to(torch.int64))
    assert torch.equal(ints.phy2log, first.phy2log)


def test_history_with_a_placement_in_force_and_a_move_budget() -> None:
    layers, experts, replicas, groups, nodes, gpus = SMALL
    series = drift_series(layers, experts, 5, seed=42)
    prev = solve(series[2], replicas, groups, nodes, gpus, history=series[:3]).phy2log
    result = solve(
        series[4], replicas, groups, nodes, gpus, history=series[:5], prev_phy2log=prev, max_moves_per_layer=4
    )
    assert_valid_maps(*result.triple(), layers, experts, replicas, gpus)
    assert bool((result.moved_copies <= 4).all())


def test_history_batch_independence() -> None:
    layers, experts, replicas, groups, nodes, gpus = SMALL
    a = drift_series(layers, experts, 4, seed=43)
    b = drift_series(2, experts, 4, seed=44)
    alone_a = solve(a[3], replicas, groups, nodes, gpus, seed=7, history=a)
    alone_b = solve(b[3], replicas, groups, nodes, gpus, seed=70, history=b)
    seeds = torch.cat([7 + torch.arange(layers), 70 + torch.arange(2)])
    both = solve(
        torch.cat([a[3], b[3]]), replicas, groups, nodes, gpus, layer_seeds=seeds, history=torch.cat([a, b], 1)
    )
    assert torch.equal(both.phy2log, torch.cat([alone_a.phy2log, alone_b.phy2log]))


@pytest.mark.parametrize(
    "history",
    [torch.rand(4, 32), torch.rand(3, 4, 31), torch.rand(3, 3, 32), torch.rand(2, 3, 4, 32)],
    ids=["2d", "wrong-experts", "wrong-layers", "4d"],
)
def test_bad_history_shape_raises(history: torch.Tensor) -> None:
    layers, experts, replicas, groups, nodes, gpus = SMALL
    with pytest.raises(ValueError, match="history"):
        solve(make("zipf", layers, experts), replicas, groups, nodes, gpus, history=history)


def test_layers_taken_fresh_swap_back_the_copies_they_do_not_need() -> None:
    from rebalancer.solver.migration import align_slots, migrate
    from rebalancer.solver.planner import plan

    layers, experts, replicas, gpus = 6, 64, 80, 16
    before, now = make("zipf", layers, experts, seed=3).double(), make("zipf", layers, experts, seed=4).double()
    seeds = torch.arange(layers)
    prev, _ = plan(before, replicas, gpus, seeds, 4)
    fresh, fresh_peak = plan(now, replicas, gpus, seeds, 4)
    local = torch.zeros(layers, dtype=torch.bool)
    # A budget of two copies leaves the incremental plan short on most layers, which take the fresh plan.
    phy2log, origins = migrate(now, prev, fresh, fresh_peak, gpus, 0.01, None, local, 1, 1, incremental_budget=2)
    taken_fresh = torch.tensor([origin == "fresh" for origin in origins])
    assert taken_fresh.sum() >= 3
    aligned = align_slots(prev, fresh, experts, gpus)
    counts = maps.logcnt_from_phy2log(phy2log, experts)
    assert torch.equal(counts[taken_fresh], maps.logcnt_from_phy2log(fresh, experts)[taken_fresh])
    pulled, unpulled = (maps.moved_copies(prev, p, experts, gpus)[taken_fresh] for p in (phy2log, aligned))
    assert (pulled <= unpulled).all() and pulled.sum() < unpulled.sum()
    mean = now.sum(-1) / gpus
    allowed = mean / (mean / fresh_peak - 0.01)
    peak = maps.gpu_loads(now, phy2log, counts, gpus).max(-1).values
    assert (peak <= allowed * (1 + 1e-9)).all()


def test_copy_handovers_in_blocks_of_layers_plan_as_all_at_once(monkeypatch):
    """Layers are independent problems: the handover step's layer blocks (bounding its trial tensors and
    the time between cancellation checkpoints) leave every plan as it is."""
    from rebalancer.solver import migration

    series = drift_series(8, 64, 3, seed=11)
    args = DRIFT_SHAPE[2:]
    prev = solve(series[0], *args, device="cpu").phy2log
    whole = solve(series[1], *args, device="cpu", prev_phy2log=prev)
    monkeypatch.setattr(migration, "HANDOVER_BLOCK_ITEMS", 1)  # one layer per block
    blocked = solve(series[1], *args, device="cpu", prev_phy2log=prev)
    assert torch.equal(whole.phy2log, blocked.phy2log)
    assert int(whole.moved_copies.sum()) > 0  # the step had work to do


def test_copies_a_gpu_keeps_stay_in_their_slots_even_when_it_holds_an_expert_twice() -> None:
    # GPU 0 held expert 0 in slots 0 and 2 and keeps both copies: only slot 1 changes (expert 7 arrives).
    # Matching only an expert's first copy moved the second copy into slot 1 and expert 7 into slot 2:
    # a local shuffle in the transfer plan, overwriting a slot that was that shuffle's source.
    prev = torch.tensor([[0, 5, 0, 1, 2, 3]])
    assert keep_old_slots(prev, torch.tensor([[0, 0, 7, 1, 2, 3]]), 2).tolist() == [[0, 7, 0, 1, 2, 3]]
    prev = torch.tensor([[0, 4, 0, 1, 2, 3]])
    result = solve(torch.tensor([[9.0, 1, 1, 1, 5]]), 6, 1, 1, 2, policy="deepseek", prev_phy2log=prev)
    # Whatever the policy plans, a slot whose expert stays on its GPU is not written.
    for gpu in range(2):
        old, new = prev[0, 3 * gpu : 3 * gpu + 3].tolist(), result.phy2log[0, 3 * gpu : 3 * gpu + 3].tolist()
        writes = sum(a != b for a, b in zip(old, new, strict=True))
        arrivals = sum(max(new.count(e) - old.count(e), 0) for e in set(new))
        assert writes == arrivals, (old, new)


@settings(max_examples=60, deadline=None)
@given(gpus=st.integers(1, 4), slots_per_gpu=st.integers(1, 5), experts=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_keeping_old_slots_writes_only_the_arrivals(gpus: int, slots_per_gpu: int, experts: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    prev, new = (torch.randint(experts, (2, gpus * slots_per_gpu), generator=g) for _ in range(2))
    kept = keep_old_slots(prev, new, gpus)
    for layer in range(2):
        for gpu in range(gpus):
            span = slice(gpu * slots_per_gpu, (gpu + 1) * slots_per_gpu)
            old, planned, placed = prev[layer, span].tolist(), new[layer, span].tolist(), kept[layer, span].tolist()
            assert sorted(placed) == sorted(planned)  # the same copies on the GPU
            writes = sum(a != b for a, b in zip(old, placed, strict=True))
            assert writes == sum(max(planned.count(e) - old.count(e), 0) for e in set(planned))


def test_keeping_old_slots_takes_memory_linear_in_the_slots_per_gpu() -> None:
    # 2 GPUs x 8,192 slots: comparing every slot with every other took [L, G, K, K] tables (with an int64
    # cumsum, ~1 GiB here; ~16 GiB at 32,768 slots, which admission costs at 8 MiB). In a fresh process,
    # so its peak resident memory is this call's own.
    script = (
        "import resource, torch\n"
        "from rebalancer.solver.migration import keep_old_slots\n"
        "old, new = torch.randint(4, (1, 16384)), torch.randint(4, (1, 16384))\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "kept = keep_old_slots(old, new, 2)\n"
        "assert kept.shape == new.shape\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    grown_mib = int(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout)
    assert grown_mib < 64, f"{grown_mib} MiB"
