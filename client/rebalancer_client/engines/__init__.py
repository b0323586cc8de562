"""Adapters for the engines operators run: vLLM (an EPLB policy plugin), SGLang (recorder dumps in,
`--init-expert-location` out) and TensorRT-LLM (the `MoeLoadBalancerConfig` YAML out).

Placements here have one row per MoE layer; SGLang and TensorRT-LLM number rows by decoder layer. Every
writer for those engines takes a `LayerNumbering` and refuses to write without one.
"""

from .layers import LayerNumbering

__all__ = ["LayerNumbering"]
