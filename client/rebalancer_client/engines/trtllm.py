"""TensorRT-LLM: the `MoeLoadBalancerConfig` YAML that `moe_config.load_balancer` loads.

    num_slots: 288
    layer_updates_per_iter: 0
    initial_global_assignments:
      3: [expert id of slot 0, ..., of slot 287]
      ...
      60: [...]

Keys are decoder layer ids (DeepSeek-V3: 3..60), one per MoE layer, each a list of exactly `num_slots`
expert ids; slot s lives on EP rank s // (num_slots / ep_size), as in `phy2log`. `layer_updates_per_iter`
0 keeps the placement static (TensorRT-LLM's online balancer is off); a positive value lets its own
balancer update that many layers per iteration starting from this placement. Written by hand (flow
lists, one layer per line) so the client needs no YAML library.
"""

from __future__ import annotations

import numpy as np

from .layers import LayerNumbering, require


def load_balancer_yaml(
    phy2log: np.ndarray, numbering: LayerNumbering | None, *, layer_updates_per_iter: int = 0
) -> str:
    """The YAML text for [L, R] MoE rows under the model's decoder-layer numbering."""
    numbering = require(numbering, "TensorRT-LLM")
    phy2log = np.asarray(phy2log, dtype=np.int64)
    numbering.check_rows(phy2log.shape[0])
    if layer_updates_per_iter < 0:
        raise ValueError(f"layer_updates_per_iter must be >= 0, got {layer_updates_per_iter}")
    lines = [
        f"num_slots: {phy2log.shape[1]}",
        f"layer_updates_per_iter: {layer_updates_per_iter}",
        "initial_global_assignments:",
    ]
    rows = zip(numbering.moe_layers, phy2log.tolist(), strict=True)
    lines += [f"  {layer}: [{', '.join(map(str, row))}]" for layer, row in rows]
    return "\n".join(lines) + "\n"
