"""Small synthetic expert-load generators and reference scorers for the solver tests.

Self-contained on purpose (the tests must not depend on ../shared): zipf-like, lognormal and hot-expert
loads, a drifting window series, the reference (published DeepSeek) hierarchical and global policies, and
the max-load lower bound of SPEC §3.
"""

from __future__ import annotations

import torch
from rebalancer.solver import deepseek, maps

KINDS = ("zipf", "lognormal", "hot", "uniformish")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def zipf_like(layers: int, experts: int, s: float = 1.0, seed: int = 0, tokens: int = 100_000) -> torch.Tensor:
    """Per layer a shuffled rank^-s popularity with lognormal jitter, sampled as `tokens` token counts."""
    g = _gen(seed)
    ranks = torch.arange(1, experts + 1, dtype=torch.float64)
    rows = []
    for _ in range(layers):
        p = ranks.pow(-s)[torch.randperm(experts, generator=g)]
        p = p * torch.exp(0.3 * torch.randn(experts, generator=g, dtype=torch.float64))
        rows.append(torch.multinomial(p / p.sum(), tokens, replacement=True, generator=g).bincount(minlength=experts))
    return torch.stack(rows).to(torch.float32)


def lognormal(layers: int, experts: int, sigma: float = 1.0, seed: int = 0) -> torch.Tensor:
    g = _gen(seed)
    return (torch.exp(sigma * torch.randn(layers, experts, generator=g, dtype=torch.float64)) * 1000).float()


def hot_experts(layers: int, experts: int, hot: int = 2, factor: float = 20.0, seed: int = 0) -> torch.Tensor:
    """Uniform-ish loads with `hot` experts per layer `factor` times heavier."""
    g = _gen(seed)
    w = torch.rand(layers, experts, generator=g, dtype=torch.float64) + 0.5
    for layer in range(layers):
        w[layer, torch.randperm(experts, generator=g)[:hot]] *= factor
    return (w * 1000).float()


def uniformish(layers: int, experts: int, seed: int = 0) -> torch.Tensor:
    g = _gen(seed)
    return ((torch.rand(layers, experts, generator=g, dtype=torch.float64) * 0.2 + 1.0) * 1000).float()


def make(kind: str, layers: int, experts: int, seed: int = 0) -> torch.Tensor:
    if kind == "zipf":
        return zipf_like(layers, experts, seed=seed)
    if kind == "lognormal":
        return lognormal(layers, experts, seed=seed)
    if kind == "hot":
        return hot_experts(layers, experts, hot=max(1, experts // 8), seed=seed)
    if kind == "uniformish":
        return uniformish(layers, experts, seed=seed)
    raise ValueError(kind)


def drifting_series(
    windows: int,
    layers: int,
    experts: int,
    s: float = 1.1,
    drift: float = 0.15,
    shift_every: int = 4,
    tokens: int = 100_000,
    seed: int = 0,
) -> torch.Tensor:
    """Window sums [windows, layers, experts]: stable skew, lognormal popularity drift, a hot shift of a few
    experts every `shift_every` windows, and multinomial sampling noise."""
    g = _gen(seed)
    ranks = torch.arange(1, experts + 1, dtype=torch.float64)
    logp = torch.stack([(-s * ranks.log())[torch.randperm(experts, generator=g)] for _ in range(layers)])
    logp = logp + 0.3 * torch.randn(layers, experts, generator=g, dtype=torch.float64)
    out = []
    for t in range(windows):
        logp = logp + drift * torch.randn(layers, experts, generator=g, dtype=torch.float64)
        if shift_every and t % shift_every == shift_every - 1:
            for layer in range(layers):
                logp[layer, torch.randperm(experts, generator=g)[:3]] += 1.5
        p = torch.softmax(logp, -1)
        counts = torch.stack(
            [
                torch.multinomial(p[layer], tokens, replacement=True, generator=g).bincount(minlength=experts)
                for layer in range(layers)
            ]
        )
        out.append(counts)
    return torch.stack(out).to(torch.float32)


# --- scoring ---------------------------------------------------------------------------------------------


def balancedness(weight: torch.Tensor, phy2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Mean / max GPU load per layer [L] of `phy2log` on loads `weight` (1.0 on all-zero layers)."""
    weight = weight.double().cpu()
    phy2log = phy2log.cpu()
    logcnt = maps.logcnt_from_phy2log(phy2log, weight.shape[1])
    return maps.balancedness(weight, phy2log, logcnt, num_gpus)


def max_gpu_load(weight: torch.Tensor, phy2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    weight = weight.double().cpu()
    phy2log = phy2log.cpu()
    logcnt = maps.logcnt_from_phy2log(phy2log, weight.shape[1])
    return maps.gpu_loads(weight, phy2log, logcnt, num_gpus).max(-1).values


def copy_lower_bound(weight: torch.Tensor, num_replicas: int) -> torch.Tensor:
    """Best achievable max single-copy load per layer [L]: greedy replication of the highest per-copy load
    (optimal for this objective)."""
    weight = weight.double().cpu()
    counts = torch.ones_like(weight)
    rows = torch.arange(weight.shape[0])
    for _ in range(num_replicas - weight.shape[1]):
        best = (weight / counts).argmax(-1)
        counts[rows, best] += 1
    return (weight / counts).max(-1).values


def lower_bound(weight: torch.Tensor, num_replicas: int, num_gpus: int) -> torch.Tensor:
    """max(total / G, best max per-copy load) per layer [L]."""
    total = weight.double().cpu().sum(-1) / num_gpus
    return torch.maximum(total, copy_lower_bound(weight, num_replicas))


def reference_policies(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> dict[str, torch.Tensor]:
    """The published algorithm's hierarchical and global policies: name -> phy2log [L, R].

    Hierarchical only when groups divide over nodes (as the published entry point requires)."""
    w = weight.float().cpu()
    out = {"global": deepseek.rebalance_hierarchical(w, num_replicas, 1, 1, num_gpus)[0]}
    if num_groups % num_nodes == 0:
        out["hierarchical"] = deepseek.rebalance_hierarchical(w, num_replicas, num_groups, num_nodes, num_gpus)[0]
    return out


def best_reference_balancedness(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> float:
    """Mean balancedness of the better of the reference's hierarchical and global policies."""
    plans = reference_policies(weight, num_replicas, num_groups, num_nodes, num_gpus)
    return max(float(balancedness(weight, p, num_gpus).mean()) for p in plans.values())


# --- map checks ---------------------------------------------------------------------------------------


def assert_valid_maps(
    phy2log: torch.Tensor,
    log2phy: torch.Tensor,
    logcnt: torch.Tensor,
    num_layers: int,
    num_experts: int,
    num_replicas: int,
    num_gpus: int,
    device: torch.device | str | None = None,
) -> None:
    """Everything a DeepSeek-compatible placement triple must satisfy."""
    for name, t in (("phy2log", phy2log), ("log2phy", log2phy), ("logcnt", logcnt)):
        assert t.dtype == torch.int64, f"{name} dtype {t.dtype}"
        if device is not None:
            assert t.device.type == torch.device(device).type, f"{name} on {t.device}, expected {device}"
    phy2log, log2phy, logcnt = phy2log.cpu(), log2phy.cpu(), logcnt.cpu()
    assert phy2log.shape == (num_layers, num_replicas)
    assert logcnt.shape == (num_layers, num_experts)
    assert log2phy.dim() == 3 and log2phy.shape[:2] == (num_layers, num_experts)
    # Ranges, every expert hosted, copies add up to the slots (and R / G slots on each GPU by layout).
    assert num_replicas % num_gpus == 0
    assert bool(((phy2log >= 0) & (phy2log < num_experts)).all()), "phy2log holds a non-expert id"
    assert bool((logcnt >= 1).all()), "an expert has no copy"
    assert torch.equal(logcnt.sum(-1), torch.full((num_layers,), num_replicas, dtype=torch.int64))
    counted = torch.stack([torch.bincount(row, minlength=num_experts) for row in phy2log])
    assert torch.equal(counted, logcnt), "logcnt disagrees with phy2log"
    # log2phy: the first logcnt[e] entries are distinct slots hosting e, the rest is -1 padding.
    width = log2phy.shape[2]
    assert width >= int(logcnt.max())
    listed = torch.arange(width).view(1, 1, -1) < logcnt.unsqueeze(-1)
    assert bool((log2phy[~listed] == -1).all()), "log2phy padding is not -1"
    slots = log2phy[listed]
    assert bool(((slots >= 0) & (slots < num_replicas)).all()), "log2phy lists a slot out of range"
    expert_of = torch.arange(num_experts).view(1, -1, 1).expand_as(log2phy)
    hosted = phy2log.gather(1, log2phy.clamp_min(0).flatten(1)).view_as(log2phy)
    assert torch.equal(hosted[listed], expert_of[listed]), "log2phy slot does not map back to its expert"
    for layer in range(num_layers):
        listed_slots = log2phy[layer][listed[layer]]
        assert sorted(listed_slots.tolist()) == list(range(num_replicas)), "log2phy does not list every slot once"


def assert_groups_on_one_node(
    phy2log: torch.Tensor, num_experts: int, num_groups: int, num_nodes: int, layers: list[int] | None = None
) -> None:
    """Every copy of every expert of a group lives on the same node (slot p on node p // (R / nodes))."""
    phy2log = phy2log.cpu()
    num_layers, num_replicas = phy2log.shape
    node_of_slot = torch.arange(num_replicas) // (num_replicas // num_nodes)
    group_of_slot = phy2log // (num_experts // num_groups)
    for layer in range(num_layers) if layers is None else layers:
        for group in range(num_groups):
            nodes = set(node_of_slot[group_of_slot[layer] == group].tolist())
            assert len(nodes) == 1, f"layer {layer}: group {group} spans nodes {sorted(nodes)}"
