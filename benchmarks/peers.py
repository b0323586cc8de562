"""The baselines others ship, from their released wheels: the engines' EPLB planners and DeepSeek's algorithm.

Wheels come from `rebalancer_testkit.wheels` (fetched once, cached); only their EPLB modules are imported,
under namespace stubs, so no engine `__init__` runs and nothing of theirs is copied. SGLang ships the published
`eplb.py` as `deepseek.py` but packs summing Python floats, not float32 0-d tensors (faster, near-ties break
differently), so the published algorithm is that module with the published packing loop swapped in.
"""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Callable
from unittest import mock

import torch
from rebalancer_testkit.wheels import ENGINES, fetch_wheel, import_from_wheel

SGLANG_EPLB = "sglang.srt.eplb.eplb_algorithms"
Planner = Callable[[torch.Tensor, int, int, int, int], torch.Tensor]


def load_released_planners() -> dict[str, Planner]:
    """vLLM's default policy and SGLang's `deepseek` and `deepseek_vec`, from the released wheels."""
    (vllm, v), (sglang, s) = ((fetch_wheel(name, version), version) for name, version in ENGINES.items())
    default = import_from_wheel(vllm, "vllm.distributed.eplb.policy.default").DefaultEplbPolicy
    deepseek, vec = (import_from_wheel(sglang, f"{SGLANG_EPLB}.{name}") for name in ("deepseek", "deepseek_vec"))

    def vec_plan(w: torch.Tensor, r: int, g: int, n: int, p: int) -> torch.Tensor:  # takes counts [steps, L, E]
        return vec.rebalance_experts(w[None], r, r // p, g, n, g % n == 0)[0].long()

    return {
        f"vllm {v} default": lambda w, r, g, n, p: default.rebalance_experts(w, r, g, n, p).long(),
        f"sglang {s} deepseek": lambda w, r, g, n, p: deepseek.rebalance_experts(w, r, g, n, p, g % n == 0)[0].long(),
        f"sglang {s} deepseek_vec": vec_plan,
    }


def load_elasticity_aware() -> Callable[..., torch.Tensor]:
    """SGLang's `elasticity_aware` planner, for GPUs lost mid-serving: (weight [L, E], num_replicas, num_groups,
    num_nodes, num_gpus, active_ranks [G] bool) -> phy2log [L, R], the slots of inactive ranks holding 0.

    Its one absolute import (`sglang...deepseek`) is answered by the released `deepseek` module during the
    load only, so an installed SGLang is never shadowed.
    """
    wheel = fetch_wheel("sglang", ENGINES["sglang"])
    with mock.patch.dict(sys.modules, {f"{SGLANG_EPLB}.deepseek": import_from_wheel(wheel, f"{SGLANG_EPLB}.deepseek")}):
        module = import_from_wheel(wheel, f"{SGLANG_EPLB}.elasticity_aware")
    return lambda w, r, g, n, p, active: module.rebalance_experts(w, r, g, n, p, g % n == 0, active)[0].long()


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
def _published(python_floats: bool) -> types.ModuleType:
    """A private instance of SGLang's released `deepseek.py` whose steps pack with the published loop."""
    wheel, alias = fetch_wheel("sglang", ENGINES["sglang"]), f"_published_{'floats' if python_floats else 'tensors'}"
    published = import_from_wheel(wheel, f"{SGLANG_EPLB}.deepseek", alias)
    published.balanced_packing = functools.partial(balanced_packing, python_floats=python_floats)
    return published


def published_rebalance_experts(weight: torch.Tensor, *args: int, python_floats: bool = False) -> tuple:
    """The published entry point on (num_replicas, num_groups, num_nodes, num_gpus), hierarchical when groups
    divide over nodes: weight [L, E] -> (phy2log [L, R], log2phy [L, E, X], logcnt [L, E])."""
    return _published(python_floats).rebalance_experts(weight, *args, args[1] % args[2] == 0)
