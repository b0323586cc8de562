"""Greedy replication as one top-k: both tables (harmonic, pruned where that costs less) give the copies the
sequential greedy gives; the harmonic one holds about (R - E) ln(R - E) shares, not (R - E)^2, and the
pruned one stays linear in R + E."""

from __future__ import annotations

import pytest
import torch
from rebalancer.solver import replication
from rebalancer.solver.replication import replica_counts


def sequential_greedy(loads: torch.Tensor, num_replicas: int) -> torch.Tensor:
    """Each extra slot to the expert with the highest load per copy, the lowest index among ties."""
    counts = torch.ones(loads.shape, dtype=torch.int64)
    for _ in range(num_replicas - loads.shape[-1]):
        per_copy = loads / counts
        best = per_copy.amax(-1, keepdim=True)
        first = (per_copy == best).to(torch.int8).argmax(-1, keepdim=True)
        counts.scatter_add_(-1, first, torch.ones_like(first))
    return counts


@pytest.mark.parametrize("path", ["_harmonic_counts", "_pruned_counts"])
@pytest.mark.parametrize("experts, replicas", [(1, 9), (5, 5), (12, 16), (16, 64), (40, 41), (33, 200)])
def test_both_tables_give_the_sequential_greedy_copies(path, experts, replicas):
    loads = torch.rand(4, experts, generator=torch.Generator().manual_seed(experts), dtype=torch.float64) ** 3
    if replicas == experts:
        assert torch.equal(replica_counts(loads, replicas), torch.ones(4, experts, dtype=torch.int64))
        return
    assert torch.equal(getattr(replication, path)(loads, replicas), sequential_greedy(loads, replicas))


@pytest.mark.parametrize("path", ["_harmonic_counts", "_pruned_counts"])
@pytest.mark.parametrize("loads", [[3.0, 3.0, 3.0, 3.0], [0.0, 0.0, 0.0], [4.0, 2.0, 2.0, 1.0, 1.0], [6.0, 0.0, 3.0]])
def test_both_tables_reach_the_greedy_optimum_on_ties_and_zero_rows(path, loads):
    """Both keep the greedy's largest load per copy (the optimum of replication); the pruned table also
    breaks ties towards the lowest experts, as the sequential greedy does."""
    weight = torch.tensor([loads], dtype=torch.float64)
    for replicas in range(len(loads) + 1, 3 * len(loads) + 2):
        counts = getattr(replication, path)(weight, replicas)
        assert int(counts.sum()) == replicas and bool((counts >= 1).all())
        greedy = sequential_greedy(weight, replicas)
        assert float((weight / counts).max()) == float((weight / greedy).max())
        if path == "_pruned_counts" and weight.any():
            assert torch.equal(counts, greedy)


def test_wide_layers_take_the_pruned_table_and_stay_small(monkeypatch):
    """4096 experts on 8192 slots: a dense table of 16.8M shares per row; the pruned one has 16k."""
    widths = []
    topk = torch.Tensor.topk
    monkeypatch.setattr(
        torch.Tensor, "topk", lambda self, *a, **k: widths.append(self.shape[-1]) or topk(self, *a, **k)
    )
    loads = torch.rand(2, 4096, generator=torch.Generator().manual_seed(1)) ** 4
    counts = replica_counts(loads, 8192)
    assert widths == [8192 + 2 * 4096]
    assert (counts.sum(-1) == 8192).all()
    torch.testing.assert_close((loads / counts).amax(-1), (loads / sequential_greedy(loads, 8192)).amax(-1))


@pytest.mark.parametrize(
    "experts, replicas", [(256, 320), (256, 288), (384, 432), (1, 9), (40, 41), (33, 200), (7, 10**5)]
)
def test_harmonic_share_count_is_the_sum_over_ranks(experts, replicas):
    extra = replicas - experts
    assert replication._harmonic_shares(experts, replicas) == sum(extra // r for r in range(1, min(experts, extra) + 1))


def test_deepseek_v3_on_64_gpus_takes_the_harmonic_table_of_280_shares(monkeypatch):
    """256 experts on 320 slots: the square table of the 64 heaviest experts had 64 x 64 = 4,096 shares."""
    widths = []
    topk = torch.Tensor.topk
    monkeypatch.setattr(
        torch.Tensor, "topk", lambda self, *a, **k: widths.append(self.shape[-1]) or topk(self, *a, **k)
    )
    loads = torch.rand(3, 256, generator=torch.Generator().manual_seed(2), dtype=torch.float64) ** 4
    counts = replica_counts(loads, 320)
    assert widths == [256, replication._harmonic_shares(256, 320)] and widths[1] < 300
    assert torch.equal(counts, sequential_greedy(loads, 320))


def test_only_small_harmonic_tables_are_cached():
    """One expert on 70,001 slots takes a harmonic table of 70,000 shares: built, used, not kept."""
    replication._cached_table.cache_clear()
    assert replica_counts(torch.ones(1, 1), 70_001).tolist() == [[70_001]]
    assert replication._cached_table.cache_info().currsize == 0
    replica_counts(torch.rand(2, 256, generator=torch.Generator().manual_seed(3)), 320)
    assert replication._cached_table.cache_info().currsize == 1
