"""Greedy replication as one top-k: both tables (dense while small, pruned past that) give the copies the
sequential greedy gives, and the pruned one stays linear in R + E where the dense one would be E x (R - E)."""

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


@pytest.mark.parametrize("path", ["_dense_counts", "_pruned_counts"])
@pytest.mark.parametrize("experts, replicas", [(1, 9), (5, 5), (12, 16), (16, 64), (40, 41), (33, 200)])
def test_both_tables_give_the_sequential_greedy_copies(path, experts, replicas):
    loads = torch.rand(4, experts, generator=torch.Generator().manual_seed(experts), dtype=torch.float64) ** 3
    if replicas == experts:
        assert torch.equal(replica_counts(loads, replicas), torch.ones(4, experts, dtype=torch.int64))
        return
    assert torch.equal(getattr(replication, path)(loads, replicas), sequential_greedy(loads, replicas))


@pytest.mark.parametrize("loads", [[3.0, 3.0, 3.0, 3.0], [0.0, 0.0, 0.0], [4.0, 2.0, 2.0, 1.0, 1.0], [6.0, 0.0, 3.0]])
def test_pruned_table_breaks_ties_towards_the_lowest_experts_and_handles_zero_rows(loads):
    weight = torch.tensor([loads], dtype=torch.float64)
    for replicas in range(len(loads) + 1, 3 * len(loads) + 2):
        counts = replication._pruned_counts(weight, replicas)
        assert int(counts.sum()) == replicas and bool((counts >= 1).all())
        # The largest load per copy is the greedy's, the optimum of replication.
        greedy = sequential_greedy(weight, replicas)
        assert float((weight / counts).max()) == float((weight / greedy).max())
        if weight.any():
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
