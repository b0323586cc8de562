"""Placement quality: `auto` never worse than the better of the reference's
hierarchical and global policies, max load within 0.5 % of the lower bound on average, and joint
replication + placement reaching the known optima where greedy replication cannot."""

from __future__ import annotations

import pytest
import torch
from placement_checks import best_reference_balancedness, reference_policies
from rebalancer.solver import host_moves, joint, rebalance_experts, solve
from rebalancer.solver.joint import copy_moves, fresh_packs, improve_replication, moved_counts, paired_moves
from rebalancer.solver.maps import logcnt_from_phy2log
from rebalancer.solver.packing import round_pack
from rebalancer.solver.replication import replica_counts, slots_from_counts
from rebalancer_testkit.workloads import KINDS, balancedness, lower_bound, make, max_gpu_load

# (layers, experts, replicas, groups, nodes, gpus): few slots per GPU, groups per node from 1 to 4,
# hierarchy on and off, and one mid-size case.
QUALITY_SHAPES = [
    (3, 12, 16, 4, 2, 8),
    (3, 16, 24, 4, 2, 8),
    (3, 16, 20, 4, 4, 4),
    (3, 32, 40, 8, 4, 8),
    (3, 32, 48, 1, 1, 8),
    (3, 32, 48, 4, 3, 12),  # groups do not divide over nodes: reference entry point goes global
    (2, 64, 72, 8, 8, 8),  # one group per node: the published hierarchical policy collapses here
]

# Shapes with enough slots per GPU that the lower bound is (nearly) reachable.
BOUND_SHAPES = [
    (3, 32, 40, 8, 4, 8),
    (3, 32, 48, 1, 1, 8),
    (2, 64, 72, 8, 4, 8),
]


def _case_id(shape: tuple) -> str:
    layers, experts, replicas, groups, nodes, gpus = shape
    return f"{layers}x{experts}->{replicas}-g{groups}-n{nodes}-G{gpus}"


@pytest.mark.parametrize("shape", QUALITY_SHAPES, ids=_case_id)
def test_auto_never_worse_than_reference_policies(shape: tuple) -> None:
    layers, experts, replicas, groups, nodes, gpus = shape
    failures = []
    for kind in KINDS:
        weight = make(kind, layers, experts, seed=101)
        result = solve(weight, replicas, groups, nodes, gpus)
        ours = balancedness(weight, result.phy2log, gpus)
        assert torch.allclose(ours, result.balancedness.cpu(), rtol=1e-9, atol=1e-12), "reported balancedness is off"
        ref = best_reference_balancedness(weight, replicas, groups, nodes, gpus)
        if float(ours.mean()) < ref - 1e-9:
            failures.append(f"{kind}: auto {float(ours.mean()):.5f} < reference {ref:.5f}")
        # Per layer too: never worse on any layer.
        plans = reference_policies(weight, replicas, groups, nodes, gpus)
        best_layer = torch.stack([balancedness(weight, p, gpus) for p in plans.values()]).max(0).values
        worse = (ours < best_layer - 1e-9).nonzero().flatten().tolist()
        if worse:
            failures.append(f"{kind}: layers {worse} below the better reference policy")
    assert not failures, "; ".join(failures)


@pytest.mark.parametrize("policy", ["global", "hierarchical"])
def test_solver_policies_never_worse_than_their_reference_counterpart(policy: str) -> None:
    layers, experts, replicas, groups, nodes, gpus = 3, 32, 40, 8, 4, 8
    for kind in KINDS:
        weight = make(kind, layers, experts, seed=202)
        ours = balancedness(weight, rebalance_experts(weight, replicas, groups, nodes, gpus, policy=policy)[0], gpus)
        ref = reference_policies(weight, replicas, groups, nodes, gpus)[policy]
        theirs = balancedness(weight, ref, gpus)
        assert float(ours.mean()) >= float(theirs.mean()) - 1e-9, f"{policy} on {kind}"


def test_auto_mean_max_over_lower_bound_within_half_a_percent() -> None:
    ratios = {}
    for shape in BOUND_SHAPES:
        layers, experts, replicas, groups, nodes, gpus = shape
        for kind in KINDS:
            weight = make(kind, layers, experts, seed=303)
            phy2log = rebalance_experts(weight, replicas, groups, nodes, gpus)[0]
            bound = lower_bound(weight, replicas, gpus)
            ratio = max_gpu_load(weight, phy2log, gpus) / bound
            assert bool((ratio >= 1 - 1e-9).all()), "a placement beat the lower bound: the bound or maps are wrong"
            ratios[f"{_case_id(shape)}/{kind}"] = float(ratio.mean())
    mean = sum(ratios.values()) / len(ratios)
    worst = max(ratios, key=ratios.__getitem__)
    assert mean <= 1.005, f"mean max/LB {mean:.5f} (worst {worst}: {ratios[worst]:.5f})"


def test_one_group_per_node_auto_avoids_the_hierarchical_collapse() -> None:
    # With as many groups as nodes the reference hierarchical policy is far from balanced on
    # skewed loads; auto must reach the global policy's quality there.
    weight = make("hot", 2, 64, seed=404)
    ref = reference_policies(weight, 72, 8, 8, 8)
    ours = balancedness(weight, rebalance_experts(weight, 72, 8, 8, 8)[0], 8)
    assert float(ours.mean()) >= float(balancedness(weight, ref["global"], 8).mean()) - 1e-9
    assert float(ours.mean()) > float(balancedness(weight, ref["hierarchical"], 8).mean())


# --- joint replication + placement ----------------------------------------------------------------------

JOINT = torch.tensor([[600.0, 560.0, 120.0, 120.0, 20.0, 10.0, 10.0, 10.0]])
README_WEIGHT = torch.tensor(
    [
        [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
        [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
    ],
    dtype=torch.float32,
)


def test_greedy_replication_is_suboptimal_on_the_joint_example() -> None:
    # The baseline the joint search has to beat: the published algorithm reaches 232.
    phy2log = rebalance_experts(JOINT, 16, 1, 1, 8, policy="deepseek")[0]
    assert float(max_gpu_load(JOINT, phy2log, 8)[0]) == pytest.approx(232.0)


@pytest.mark.parametrize("policy", ["auto", "global", "hierarchical"])
def test_joint_replication_reaches_the_optimum_on_the_joint_example(policy: str) -> None:
    phy2log = rebalance_experts(JOINT, 16, 1, 1, 8, policy=policy)[0]
    peak = float(max_gpu_load(JOINT, phy2log, 8)[0])
    assert peak <= 196.67 * 1.01, f"{policy}: max GPU load {peak:.2f}, optimum 196.67"
    assert peak >= 590 / 3 - 1e-6  # the proven optimum: nothing can be below it


@pytest.mark.parametrize("policy", ["auto", "global"])
def test_readme_layers_on_eight_gpus_of_two_slots_reach_their_optima(policy: str) -> None:
    phy2log = rebalance_experts(README_WEIGHT, 16, 1, 1, 8, policy=policy)[0]
    peaks = max_gpu_load(README_WEIGHT, phy2log, 8)
    assert peaks.tolist() == pytest.approx([136.0, 172.0]), f"{policy}: {peaks.tolist()}"


@pytest.mark.parametrize("policy", ["auto", "global"])
def test_joint_example_inside_a_batch_and_with_few_candidates(policy: str) -> None:
    # The joint search must not depend on the layer's batch neighbours or on many candidates. (With a
    # single candidate the search stops at 210: the optimum is found via the candidates' replication.)
    weight = torch.cat([README_WEIGHT[:, :8], JOINT, README_WEIGHT[:, 4:]])
    for candidates in (2, 4, 64):
        phy2log = rebalance_experts(weight, 16, 1, 1, 8, policy=policy, num_candidates=candidates)[0]
        assert float(max_gpu_load(weight[2:3], phy2log[2:3], 8)[0]) <= 196.67 * 1.01


def test_joint_search_alone_beats_greedy_replication_on_the_joint_example() -> None:
    # The exact two-slot path answers this shape; the copy-move search, what layers too large to enumerate
    # rely on, climbs from greedy's 232 to 210 on its own (the candidates' replication variants do the rest).
    loads = JOINT.double()
    counts = replica_counts(loads, 16)
    copies = slots_from_counts(counts, 16)
    slot_items = round_pack((loads / counts).gather(1, copies), 8)
    greedy = copies.gather(1, slot_items.view(1, -1))
    greedy_peak = max_gpu_load(JOINT, greedy, 8)
    assert float(greedy_peak[0]) == pytest.approx(232.0)
    improved, peak = improve_replication(loads, greedy, greedy_peak, 8)
    assert float(peak[0]) <= 210.0 + 1e-9
    assert float(max_gpu_load(JOINT, improved, 8)[0]) == pytest.approx(float(peak[0]))


@pytest.mark.parametrize("kind", ["hot", "zipf"])
def test_joint_search_never_raises_the_peak_and_keeps_every_expert(kind: str) -> None:
    # Three slots per GPU: moves applied in place and refined, and (small layers) packed afresh.
    loads = make(kind, 6, 12, seed=4).double()
    counts = replica_counts(loads, 18)
    copies = slots_from_counts(counts, 18)
    slot_items = round_pack((loads / counts).gather(1, copies), 6)
    start = copies.gather(1, slot_items.view(6, -1))
    start_peak = max_gpu_load(loads, start, 6)
    improved, peak = improve_replication(loads, start, start_peak, 6)
    assert bool((peak <= start_peak * (1 + 1e-12)).all())
    assert bool((torch.stack([row.bincount(minlength=12) for row in improved]) >= 1).all())
    torch.testing.assert_close(max_gpu_load(loads, improved, 6), peak, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize(
    "rows, gpus, slots, experts, moves", [(3, 8, 4, 20, 4), (2, 5, 300, 40, 3), (4, 72, 4, 256, 16), (2, 3, 2, 500, 2)]
)
def test_copies_on_gpus_equal_a_count_of_every_slot(rows, gpus, slots, experts, moves) -> None:
    # Both ways of counting (the per-GPU histogram, bytes or int32, and the slot comparison for many experts).
    generator = torch.Generator().manual_seed(gpus)
    gpu_experts = torch.randint(0, experts, (rows, gpus, slots), generator=generator)
    asked = torch.randint(0, experts, (rows, 2 * moves), generator=generator)
    counted = (gpu_experts.unsqueeze(1) == asked[..., None, None]).sum(-1).split(moves, 1)
    for got, expected in zip(joint._copies_on_gpus(gpu_experts, asked, experts), counted, strict=True):
        assert torch.equal(got.long(), expected)


@pytest.mark.parametrize("kind", ["zipf", "hot", "uniformish"])
def test_paired_move_scores_equal_the_moves_packed_afresh(kind: str) -> None:
    # Two slots per GPU: scoring a move by index arithmetic on the sorted copies gives the peak of its
    # copies paired afresh (heaviest with lightest), ties and invalid moves included.
    loads = make(kind, 5, 40, seed=7).double()
    loads[0] = loads[0].round()  # integral loads: equal copies of different experts
    counts = replica_counts(loads, 48)
    x, y, valid = copy_moves(loads, counts, 5)
    _, fresh = fresh_packs(loads, moved_counts(counts, x, y, valid), 24, 2)
    fresh = torch.where(valid, fresh, torch.full_like(fresh, float("inf")))
    torch.testing.assert_close(paired_moves(loads, counts, x, y, valid, 24)[0], fresh, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("kind", ["zipf", "hot"])
def test_paired_move_scores_on_the_cpu_equal_the_torch_path(kind: str, monkeypatch) -> None:
    # The CPU scores moves compiled (host_pairing), a GPU in torch: same peaks and placements, bit for bit,
    # with the placements asked for or not (the CPU then computes the peaks only).
    loads = make(kind, 6, 40, seed=11).double()
    loads[1] = loads[1].round()
    counts = replica_counts(loads, 48)
    x, y, valid = copy_moves(loads, counts, 5)
    host = paired_moves(loads, counts, x, y, valid, 24, with_experts=True)
    host_peaks, no_placement = paired_moves(loads, counts, x, y, valid, 24)
    monkeypatch.setattr(joint.host_pairing, "paired_peaks", joint.torch_paired_peaks)
    on_torch = paired_moves(loads, counts, x, y, valid, 24, with_experts=True)
    assert torch.equal(host[0], on_torch[0]) and torch.equal(host[1], on_torch[1])
    assert torch.equal(host_peaks, on_torch[0]) and no_placement is None


@pytest.mark.parametrize("kind", ["zipf", "hot", "uniformish"])
@pytest.mark.parametrize("gpus, slots", [(8, 4), (72, 4), (1, 6), (32, 1)])
def test_in_place_move_scores_on_the_cpu_equal_the_tensor_path(kind: str, gpus: int, slots: int) -> None:
    # The CPU scores in-place copy moves compiled (host_moves), a GPU in tensor ops: the same peaks bit for
    # bit, ties (integral loads, equal top GPUs), invalid moves and GPUs without the donor included.
    experts = gpus * slots * 3 // 4  # a quarter of the slots are spare copies
    loads = make(kind, 4, experts, seed=gpus).double()
    loads[0] = loads[0].round()
    phy2log = torch.stack(
        [torch.randperm(gpus * slots, generator=torch.Generator().manual_seed(r)) % experts for r in range(4)]
    )
    counts = logcnt_from_phy2log(phy2log, experts)
    gpu_experts = phy2log.view(4, gpus, slots)
    gpu_loads = (loads / counts).gather(1, phy2log).view(4, gpus, slots).sum(-1)
    x, y, valid = copy_moves(loads, counts, 5)
    host = host_moves.move_peaks(loads, counts, gpu_experts, gpu_loads, x, y, valid)
    assert torch.equal(host, joint.move_peaks(loads, counts, gpu_experts, gpu_loads, x, y, valid))
    assert torch.isinf(host[~valid]).all() and torch.isfinite(host).any()
