"""The engines' released EPLB planners, imported from their wheels, for side-by-side benchmarks.

The wheels are fetched with `pip download --no-deps` into a cache (REBALANCER_ENGINE_WHEELS, default
~/.cache/moe-rebalancer/engine-wheels) and only their EPLB modules are imported from the archive, under
namespace stubs, so neither engine's `__init__` runs and nothing of theirs is copied here. Each planner is
`(weight [L, E], num_replicas, num_groups, num_nodes, num_gpus) -> phy2log [L, R] int64`.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path

import torch

ENGINES = {"vllm": "0.33.0", "sglang": "0.5.23"}
Planner = Callable[[torch.Tensor, int, int, int, int], torch.Tensor]


def fetch_wheel(name: str, version: str) -> Path:
    """The cached wheel of `name==version`, downloaded (no dependencies) when missing."""
    directory = Path(os.environ.get("REBALANCER_ENGINE_WHEELS") or Path.home() / ".cache/moe-rebalancer/engine-wheels")
    if not sorted(directory.glob(f"{name}-{version}-*.whl")):
        directory.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"{name}=={version}", "-d"]
        subprocess.run([*command, str(directory)], check=True, timeout=900)
    found = sorted(directory.glob(f"{name}-{version}-*.whl"))
    if not found:
        raise FileNotFoundError(f"pip download left no {name}-{version} wheel in {directory}")
    return found[0]


def import_from_wheel(wheel: Path, module: str) -> types.ModuleType:
    """Import `module` (a dotted name) from `wheel` under a private top package (e.g. `_released_vllm_0_33_0`,
    so an installed engine is never shadowed), its parents stubbed; the modules import siblings relatively."""
    top, *rest = module.split(".")
    alias = f"_released_{wheel.name.split('-')[0]}_{wheel.name.split('-')[1].replace('.', '_')}"
    for depth in range(len(rest)):
        package = ".".join([alias, *rest[:depth]])
        if package not in sys.modules:
            sys.modules[package] = stub = types.ModuleType(package)
            stub.__path__ = [str(wheel / Path(top, *rest[:depth]))]
    return importlib.import_module(".".join([alias, *rest]))


def load_released_planners() -> dict[str, Planner]:
    """vLLM's default policy and SGLang's `deepseek` and `deepseek_vec`, from the released wheels."""
    vllm, sglang = fetch_wheel("vllm", ENGINES["vllm"]), fetch_wheel("sglang", ENGINES["sglang"])
    default = import_from_wheel(vllm, "vllm.distributed.eplb.policy.default").DefaultEplbPolicy
    deepseek, vec = (
        import_from_wheel(sglang, f"sglang.srt.eplb.eplb_algorithms.{name}") for name in ("deepseek", "deepseek_vec")
    )
    return {
        f"vllm {ENGINES['vllm']} default": lambda w, r, g, n, p: default.rebalance_experts(w, r, g, n, p).long(),
        f"sglang {ENGINES['sglang']} deepseek": lambda w, r, g, n, p: deepseek.rebalance_experts(
            w, r, g, n, p, g % n == 0
        )[0].long(),
        # deepseek_vec takes per-step counts [steps, L, E]; one step holds the whole window.
        f"sglang {ENGINES['sglang']} deepseek_vec": lambda w, r, g, n, p: vec.rebalance_experts(
            w.unsqueeze(0), r, r // p, g, n, g % n == 0
        )[0].long(),
    }
