"""The released vLLM and SGLang EPLB code, imported from their wheels without their dependency trees.

The wheels come from `rebalancer_testkit.wheels` (fetched once, cached, so reruns are offline). Only their
EPLB folders are extracted (next to the wheels) and imported as namespace packages: no `vllm/__init__.py`
or `sglang/__init__.py` runs. The modules that EPLB code imports but the tested paths never execute
(distributed groups, platforms, model registries) are stubbed by name below; everything the tests call is
the engines' code.
When the registry cannot be reached the tests skip, saying so.
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest
from rebalancer_testkit import wheels

VLLM = ("vllm", wheels.ENGINES["vllm"], ("vllm/distributed/eplb/", "vllm/plugins/__init__.py"))
SGLANG = ("sglang", wheels.ENGINES["sglang"], ("sglang/srt/eplb/",))


def extract(name: str, version: str, members: tuple[str, ...]) -> pathlib.Path:
    """The wheel's EPLB files extracted (`rebalancer_testkit.wheels`); skips when the registry is away."""
    try:
        return wheels.extract(name, version, members)
    except FileNotFoundError as error:
        pytest.skip(str(error))


def _placeholder(module: str, attribute: str) -> type:
    if attribute.startswith("__"):  # module protocol (`__file__`, `__spec__`...): absent, as on a real module
        raise AttributeError(attribute)
    return type(attribute, (), {"__module__": module})


def stub(name: str, **attributes: Any) -> types.ModuleType:
    """A module that is never executed: named attributes as given, any other one a placeholder class."""
    module = types.ModuleType(name)
    module.__path__ = []  # a package, so stubbed submodules resolve under it
    module.__dict__.update(attributes)
    module.__getattr__ = lambda attribute: _placeholder(name, attribute)  # type: ignore[method-assign]
    sys.modules[name] = module
    return module


def _on_path(root: pathlib.Path) -> None:
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))


@dataclass
class Vllm:
    """vLLM's policy registry, its `compute_logical_maps`, its default policy and its plugin loader."""

    policy: types.ModuleType
    eplb_state: types.ModuleType
    plugins: types.ModuleType


def load_vllm() -> Vllm:
    name, version, members = VLLM
    _on_path(extract(name, version, members))
    if "vllm.distributed.eplb.eplb_state" not in sys.modules:
        stub("vllm.config", ModelConfig=object, ParallelConfig=object)
        stub("vllm.config.parallel", EPLBPolicyOption=Literal["default"])
        stub("vllm.config.utils")
        stub("vllm.envs", VLLM_PLUGINS=None)
        stub("vllm.logger", init_logger=logging.getLogger)
        stub("vllm.platforms")
        stub("vllm.utils")
        stub("vllm.utils.gpu_sync_debug", gpu_sync_allowed=contextlib.nullcontext)
        stub("vllm.utils.torch_utils", PIN_MEMORY=False)
        stub("vllm.model_executor")
        stub("vllm.model_executor.models")
        stub("vllm.model_executor.models.interfaces")
        for part in ("parallel_state", "stateless_coordinator", "utils", "nixl_utils", "device_communicators"):
            stub(f"vllm.distributed.{part}")
        stub("vllm.distributed.device_communicators.pynccl")
        stub("vllm.distributed.device_communicators.pynccl_wrapper")
    import vllm.distributed.eplb.eplb_state as eplb_state
    import vllm.distributed.eplb.policy as policy
    import vllm.plugins as plugins

    return Vllm(policy=policy, eplb_state=eplb_state, plugins=plugins)


@dataclass
class SglangRuntime:
    """The server settings SGLang's expert-location code reads through `runtime_context`; tests set them."""

    ep_size: int = 1
    nnodes: int = 1
    ep_num_redundant_experts: int = 0
    init_expert_location: str = "trivial"
    ep_dispatch_algorithm: str = "static"
    moe_a2a_backend: str = "none"
    model: Any = None

    def device(self) -> Any:
        return types.SimpleNamespace(device="cpu")

    def exec(self) -> Any:
        moe = types.SimpleNamespace(
            ep_num_redundant_experts=self.ep_num_redundant_experts,
            init_expert_location=self.init_expert_location,
            ep_dispatch_algorithm=self.ep_dispatch_algorithm,
            moe_a2a_backend=self.moe_a2a_backend,
            ep_join_mode="none",
        )
        return types.SimpleNamespace(moe=moe)

    def parallel(self) -> Any:
        return types.SimpleNamespace(ep_size=self.ep_size, nnodes=self.nnodes, elastic_ep_initial_size=None)


@dataclass
class Sglang:
    expert_location: types.ModuleType
    expert_distribution: types.ModuleType
    runtime: SglangRuntime = field(default_factory=SglangRuntime)


def load_sglang() -> Sglang:
    name, version, members = SGLANG
    _on_path(extract(name, version, members))
    if "sglang.srt.eplb.expert_location" not in sys.modules:
        stub("einops")
        stub("sglang.srt.environ")
        stub("sglang.srt.model_executor")
        stub("sglang.srt.model_executor.forward_batch_info")
        stub("sglang.srt.observability")
        stub("sglang.srt.observability.metrics_collector")
        stub("sglang.srt.utils")
        stub("sglang.srt.elastic_ep")
        stub("sglang.srt.elastic_ep.elastic_ep", elastic_expanded_world_enabled=lambda: False)
        # The model's `get_model_config_for_expert_location` hook, as DeepSeek-V2/V3 implement it.
        stub("sglang.srt.model_loader", get_model_architecture=lambda config: (config.architecture, None))
        stub(
            "sglang.srt.runtime_context",
            get_device=lambda: SGLANG_RUNTIME.device(),
            get_exec=lambda: SGLANG_RUNTIME.exec(),
            get_parallel=lambda: SGLANG_RUNTIME.parallel(),
        )
    import sglang.srt.eplb.expert_distribution as expert_distribution
    import sglang.srt.eplb.expert_location as expert_location

    return Sglang(expert_location=expert_location, expert_distribution=expert_distribution, runtime=SGLANG_RUNTIME)


SGLANG_RUNTIME = SglangRuntime()
