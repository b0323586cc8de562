"""DeepSeek's published EPLB algorithm (deepseek-ai/EPLB `eplb.py`) with its Python loops, as a baseline.

SGLang 0.5.23 ships `eplb.py` as `eplb_algorithms/deepseek.py`, except that its packing loop sums Python
floats where the published one adds float32 0-d tensors (slower, and breaking near-ties differently). So
the released module runs from its wheel (`peers.py`) with only its packing step swapped for the published
loop below: `python_floats=False` as published, `True` with SGLang's sums.
"""

from __future__ import annotations

import functools
import importlib.util
import types
import zipimport

import peers
import torch


def balanced_packing(weight: torch.Tensor, num_packs: int, python_floats: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The published packing, heaviest first to the lightest open pack: weight [X, n] -> (pack [X, n], rank [X, n])."""
    num_layers, num_items = weight.shape
    assert num_items % num_packs == 0
    per_pack = num_items // num_packs
    if per_pack == 1:
        pack_index = torch.arange(num_items, dtype=torch.int64, device=weight.device).expand(weight.shape)
        return pack_index, torch.zeros_like(weight, dtype=torch.int64)
    indices = weight.float().sort(-1, descending=True).indices.cpu()
    pack_index = torch.full_like(weight, fill_value=-1, dtype=torch.int64, device="cpu")
    rank_in_pack = torch.full_like(pack_index, fill_value=-1)
    values = weight.tolist() if python_floats else weight
    for i in range(num_layers):
        pack_weights, pack_items = [0] * num_packs, [0] * num_packs
        for item in indices[i].tolist() if python_floats else indices[i]:
            pack = min((k for k in range(num_packs) if pack_items[k] < per_pack), key=pack_weights.__getitem__)
            assert pack_items[pack] < per_pack
            pack_index[i, item], rank_in_pack[i, item] = pack, pack_items[pack]
            pack_weights[pack] += values[i][item] if python_floats else weight[i, item]
            pack_items[pack] += 1
    return pack_index, rank_in_pack


@functools.cache
def _released(python_floats: bool) -> types.ModuleType:
    """A private instance of SGLang's released `deepseek.py` whose steps pack with the published loop."""
    wheel = peers.fetch_wheel("sglang", peers.ENGINES["sglang"])
    spec = zipimport.zipimporter(f"{wheel}/sglang/srt/eplb/eplb_algorithms/").find_spec("deepseek")
    module = importlib.util.module_from_spec(spec)  # not in sys.modules: peers.py's instance stays as shipped
    spec.loader.exec_module(module)
    module.balanced_packing = functools.partial(balanced_packing, python_floats=python_floats)
    return module


def rebalance_experts(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int, python_floats: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hierarchical when groups divide over nodes: weight [L, E] -> (phy2log [L, R], log2phy [L, E, X], logcnt)."""
    hierarchical = num_groups % num_nodes == 0
    return _released(python_floats).rebalance_experts(
        weight, num_replicas, num_groups, num_nodes, num_gpus, hierarchical
    )
