"""How local a placement keeps DeepSeek-style expert groups (node-limited routing).

A token routed to a group whose experts sit on one node stays on that node's fast links; every share
of a group's load served from another node crosses the slower inter-node network.
"""

from __future__ import annotations

import torch

from .maps import ratio


def group_locality(
    loads: torch.Tensor, phy2log: torch.Tensor, logcnt: torch.Tensor, num_groups: int, num_nodes: int
) -> dict[str, torch.Tensor]:
    """Per layer [L]: `group_node_span`, the mean number of nodes hosting copies of a group's experts,
    and `off_node_share`, the share of all tokens served off their group's home node (the node that
    serves most of the group's load).

    loads [L, E], phy2log [L, R], logcnt [L, E].
    """
    num_layers, num_slots = phy2log.shape
    num_experts = loads.shape[1]
    group_of_slot = phy2log // (num_experts // num_groups)
    node_of_slot = torch.arange(num_slots, device=phy2log.device) // (num_slots // num_nodes)
    slot_load = (loads.double() / logcnt.double()).gather(1, phy2log)
    served = torch.zeros(num_layers, num_groups * num_nodes, dtype=torch.float64, device=loads.device)
    served.scatter_add_(1, group_of_slot * num_nodes + node_of_slot, slot_load)
    hosted = torch.zeros(num_layers, num_groups * num_nodes, dtype=torch.float64, device=loads.device)
    hosted.scatter_add_(1, group_of_slot * num_nodes + node_of_slot, torch.ones_like(slot_load))
    served = served.view(num_layers, num_groups, num_nodes)
    span = (hosted.view(num_layers, num_groups, num_nodes) > 0).sum(-1).double().mean(-1)
    total = loads.double().sum(-1)
    off_node = served.sum(-1) - served.max(-1).values
    share = ratio(off_node.sum(-1), total, 0.0)
    return {"group_node_span": span, "off_node_share": share}
