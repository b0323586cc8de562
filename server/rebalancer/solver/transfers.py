"""How to get from the placement in force to a new one: the copies each GPU receives and what they cost.

A transfer plan is an int64 tensor [T, 5] of rows (layer, expert, destination GPU, destination slot,
source GPU), one row per slot of the new placement whose expert differs from the old one in that slot.
The source is a GPU that hosts the expert in the old placement: the destination itself when it already
does (a local copy, no link used), else a GPU on the destination's node when one exists, else any; among
equals the one that has sent least so far, so that no GPU sends far more than the others. A source of
-1 means no usable GPU holds the expert (all its copies were on failed GPUs): it comes from host memory.

The cost model turns a plan into bytes and an estimated rearrangement time: each GPU's NVLink (intra-node)
and NIC (inter-node) links move its share at their bandwidth, the two classes concurrently; the estimate
is the busiest GPU's sending or receiving time on the slower class. Copies from host memory are charged
to the receiver's inter-node class.
"""

from __future__ import annotations

import torch
from rebalancer_wire.cost import CostModel

from . import host_transfers
from .maps import expert_histogram

LAYER, EXPERT, DST_GPU, DST_SLOT, SRC_GPU = range(5)
FROM_HOST = -1
INTRA, INTER = 0, 1


def old_content(prev_phy2log: torch.Tensor, slots_per_gpu: int, gpu_ids: torch.Tensor) -> torch.Tensor:
    """What each slot of the new layout held before: [L, G_new * S], -1 on GPUs new to the layout.

    GPU k of the new layout is GPU `gpu_ids[k]` [G_new] of the old numbering (ids past the old count
    are new GPUs)."""
    num_layers, old_slots = prev_phy2log.shape
    old_num_gpus = old_slots // slots_per_gpu
    gpu_ids = gpu_ids.to(prev_phy2log.device, torch.int64)
    existed = (gpu_ids < old_num_gpus).view(1, -1, 1)
    old_view = prev_phy2log.view(num_layers, old_num_gpus, slots_per_gpu)
    before = torch.where(existed, old_view[:, gpu_ids.clamp_max(old_num_gpus - 1)], -1)
    return before.reshape(num_layers, -1)


def plan_transfers(
    prev_phy2log: torch.Tensor,
    phy2log: torch.Tensor,
    num_experts: int,
    slots_per_gpu: int,
    gpus_per_node: int,
    *,
    gpu_ids: torch.Tensor | None = None,
    usable_sources: torch.Tensor | None = None,
) -> torch.Tensor:
    """The copies that turn `prev_phy2log` [L, R_old] into `phy2log` [L, R_new]: int64 [T, 5].

    Both layouts have `slots_per_gpu` slots per GPU; GPU k of the new layout is GPU `gpu_ids[k]` of the
    old numbering (default: the identity; ids past the old count are new, empty GPUs). GPUs sit on nodes
    of `gpus_per_node` consecutive ids. `usable_sources` [G_old] bool marks the old GPUs that can still
    send (default all). Rows are sorted by (layer, destination slot).
    """
    num_layers, new_slots = phy2log.shape
    device = phy2log.device
    old_num_gpus = prev_phy2log.shape[1] // slots_per_gpu
    if gpu_ids is None:
        gpu_ids = torch.arange(new_slots // slots_per_gpu, device=device)
    gpu_ids = gpu_ids.to(device, torch.int64)
    before = old_content(prev_phy2log, slots_per_gpu, gpu_ids)
    layer, slot = (phy2log != before).nonzero(as_tuple=True)
    expert = phy2log[layer, slot]
    dst = gpu_ids[slot // slots_per_gpu]
    hosts = expert_histogram(prev_phy2log, num_experts, old_num_gpus, compact=True) > 0  # [L, G_old, E]
    if usable_sources is None:
        usable_sources = torch.ones(old_num_gpus, dtype=torch.bool, device=device)
    # The destination already holds the expert in another slot: copy it locally (no source to choose).
    is_local = (dst < old_num_gpus) & hosts[layer, dst.clamp_max(old_num_gpus - 1), expert]
    candidates = hosts[layer, :, expert] & usable_sources.to(device).view(1, -1) & ~is_local.view(-1, 1)
    src = torch.where(is_local, dst, choose_sources(candidates, dst, gpus_per_node))  # [T]
    return torch.stack([layer, expert, dst, slot, src], 1)


def choose_sources(candidates: torch.Tensor, dst: torch.Tensor, gpus_per_node: int) -> torch.Tensor:
    """Pick one source per transfer among `candidates` [T, G] bool: same node as `dst` [T] first, then the
    GPU that has sent least over that link class; FROM_HOST where no candidate exists. -> [T] int64.

    Transfers with the fewest choices go first, one at a time, each seeing every earlier pick
    (host_transfers, compiled, whatever the solve device)."""
    return host_transfers.choose_sources(candidates, dst, gpus_per_node, INTRA, INTER, FROM_HOST)


def link_usage(transfers: torch.Tensor, num_layers: int, num_gpus: int, gpus_per_node: int) -> torch.Tensor:
    """Copies each GPU sends and receives per layer and link class: [L, G, 4] float64, columns
    (send intra, send inter, receive intra, receive inter). Local copies use no link; host copies
    count on the receiver's inter-node link. `num_gpus` covers every id in the plan."""
    layer, dst, src = transfers[:, LAYER], transfers[:, DST_GPU], transfers[:, SRC_GPU]
    network = src != dst
    layer, dst, src = layer[network], dst[network], src[network]
    link = torch.where((src >= 0) & (src // gpus_per_node == dst // gpus_per_node), INTRA, INTER)
    usage = torch.zeros(num_layers, num_gpus, 4, dtype=torch.float64, device=transfers.device)
    ones = torch.ones_like(layer, dtype=torch.float64)
    sends = src >= 0
    usage.index_put_((layer[sends], src[sends], link[sends]), ones[sends], accumulate=True)
    usage.index_put_((layer, dst, 2 + link), ones, accumulate=True)
    return usage


def busiest_seconds(usage: torch.Tensor, cost: CostModel) -> torch.Tensor:
    """usage [..., G, 4] copies (see `link_usage`) -> estimated seconds [...]: per link class the busiest
    GPU's sending or receiving time; the two classes run concurrently, so the slower one sets the time."""
    per_class = torch.maximum(usage[..., 0:2], usage[..., 2:4]).amax(-2) * cost.bytes_per_expert  # [..., 2]
    bandwidth = torch.tensor(
        [cost.intra_node_bandwidth, cost.inter_node_bandwidth], dtype=usage.dtype, device=usage.device
    )
    return (per_class / bandwidth).amax(-1)


def transfer_stats(
    transfers: torch.Tensor, num_layers: int, num_gpus: int, gpus_per_node: int, cost: CostModel
) -> dict[str, float]:
    """Moved bytes, the share of them on intra-node links (1.0 when nothing moves), the estimated
    rearrangement time of the whole plan and per link class, and the number of network copies."""
    usage = link_usage(transfers, num_layers, num_gpus, gpus_per_node).sum(0)  # [G, 4]
    received = usage[:, 2:4].sum(0)  # [2] intra, inter
    copies = float(received.sum())
    moved_bytes = copies * cost.bytes_per_expert
    per_class = torch.maximum(usage[:, 0:2], usage[:, 2:4]).amax(0) * cost.bytes_per_expert
    return {
        "transferred_copies": copies,
        "moved_bytes": moved_bytes,
        "intra_node_share": float(received[INTRA]) / copies if copies else 1.0,
        "estimated_transfer_seconds": float(busiest_seconds(usage, cost)),
        "intra_node_seconds": float(per_class[INTRA]) / cost.intra_node_bandwidth,
        "inter_node_seconds": float(per_class[INTER]) / cost.inter_node_bandwidth,
    }


def apply_transfers(
    prev_phy2log: torch.Tensor,
    transfers: torch.Tensor,
    slots_per_gpu: int,
    new_num_gpus: int,
    gpu_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Execute a plan on the old placement [L, R_old] -> the placement it leads to [L, new_num_gpus * S].

    GPUs kept from the old layout start with their old experts; new GPUs' slots start empty (-1) and
    must all be written by the plan. Used to check plans, and by callers that replay them.
    """
    if gpu_ids is None:
        gpu_ids = torch.arange(new_num_gpus, device=prev_phy2log.device)
    placement = old_content(prev_phy2log, slots_per_gpu, gpu_ids).clone()
    placement[transfers[:, LAYER], transfers[:, DST_SLOT]] = transfers[:, EXPERT]
    return placement


def same_node_share(
    prev_phy2log: torch.Tensor, transfers: torch.Tensor, num_experts: int, num_gpus: int, gpus_per_node: int
) -> tuple[float, float]:
    """Of the network copies whose expert the destination's node already held (on a GPU of the old layout),
    the share fetched within the node, and the share of all network copies that had such a source.
    prev_phy2log [L, R], transfers [T, 5] -> (share in [0, 1] (1.0 when none), share in [0, 1])."""
    network = transfers[(transfers[:, SRC_GPU] != transfers[:, DST_GPU])]
    if network.shape[0] == 0:
        return 1.0, 0.0
    held = expert_histogram(prev_phy2log, num_experts, num_gpus, compact=True) > 0  # [L, G, E]
    num_nodes = num_gpus // gpus_per_node
    node_held = held.view(held.shape[0], num_nodes, gpus_per_node, num_experts).any(2)  # [L, N, E]
    dst_node = network[:, DST_GPU] // gpus_per_node
    on_old_node = dst_node < num_nodes
    possible = torch.zeros(network.shape[0], dtype=torch.bool, device=network.device)
    rows = on_old_node.nonzero(as_tuple=True)[0]
    possible[rows] = node_held[network[rows, LAYER], dst_node[rows], network[rows, EXPERT]]
    intra = (network[:, SRC_GPU] >= 0) & (network[:, SRC_GPU] // gpus_per_node == dst_node)
    count = int(possible.sum())
    share = float((intra & possible).sum()) / count if count else 1.0
    return share, count / network.shape[0]
