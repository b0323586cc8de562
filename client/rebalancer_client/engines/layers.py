"""Decoder-layer numbering of MoE layers: which decoder layer each placement row belongs to.

The service plans one row per MoE layer ([L, E] loads, [L, R] maps). SGLang and TensorRT-LLM index their
maps by decoder layer id: DeepSeek-V3 has 61 decoder layers, of which the first 3 are dense, so MoE row i
is decoder layer 3 + i. A file written with the wrong numbering loads without complaint and then
dispatches layers to the wrong rows, so the writers take this numbering explicitly and never guess.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LayerNumbering:
    """`moe_layers[i]` is the decoder layer id of MoE row i; ids are increasing and < `num_decoder_layers`."""

    num_decoder_layers: int
    moe_layers: tuple[int, ...]

    def __post_init__(self) -> None:
        ids = np.asarray(self.moe_layers, dtype=np.int64)
        if self.num_decoder_layers < 1 or ids.size == 0:
            raise ValueError("a layer numbering needs at least one decoder layer and one MoE layer")
        if bool((np.diff(ids) <= 0).any()) or ids[0] < 0 or ids[-1] >= self.num_decoder_layers:
            raise ValueError(
                f"MoE layer ids must increase within [0, {self.num_decoder_layers}), got {list(self.moe_layers)}"
            )

    @classmethod
    def dense_prefix(cls, num_moe_layers: int, first_moe_layer: int, num_decoder_layers: int | None = None):
        """Dense layers first, then `num_moe_layers` MoE layers (DeepSeek-V3: 58 MoE from layer 3 of 61)."""
        total = first_moe_layer + num_moe_layers if num_decoder_layers is None else num_decoder_layers
        return cls(total, tuple(range(first_moe_layer, first_moe_layer + num_moe_layers)))

    @classmethod
    def parse_ids(cls, spec: str, num_decoder_layers: int) -> LayerNumbering:
        """Explicit ids from a CLI spec such as "3-60" or "1,3,5-9" (ranges inclusive)."""
        ids: list[int] = []
        try:
            for part in filter(None, (p.strip() for p in spec.split(","))):
                first, _, last = part.partition("-")
                ids.extend(range(int(first), int(last or first) + 1))
        except ValueError as exc:
            raise ValueError(f"MoE layer ids must look like 3-60 or 1,3,5-9, got {spec!r}") from exc
        return cls(num_decoder_layers, tuple(ids))

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    def check_rows(self, rows: int, what: str = "the placement") -> None:
        if rows != self.num_moe_layers:
            raise ValueError(
                f"{what} has {rows} MoE layers but the layer numbering names {self.num_moe_layers} "
                f"(decoder layers {self.moe_layers[0]}..{self.moe_layers[-1]} of {self.num_decoder_layers})"
            )

    def expand(self, phy2log: np.ndarray, num_experts: int) -> np.ndarray:
        """[L, R] MoE rows -> [D, R] decoder rows; dense layers get the trivial map (slot p -> p % E).

        Engines build dispatch tables for every decoder row and need every expert hosted in each, so dense
        rows must be valid maps even though no token is routed through them.
        """
        phy2log = np.asarray(phy2log, dtype=np.int64)
        self.check_rows(phy2log.shape[0])
        full = np.tile(np.arange(phy2log.shape[1], dtype=np.int64) % num_experts, (self.num_decoder_layers, 1))
        full[list(self.moe_layers)] = phy2log
        return full

    def select(self, per_decoder_layer: np.ndarray, what: str = "the loads") -> np.ndarray:
        """[..., D, E] rows by decoder layer -> [..., L, E] MoE rows."""
        array = np.asarray(per_decoder_layer)
        if array.ndim < 2 or array.shape[-2] != self.num_decoder_layers:
            raise ValueError(
                f"{what} must have {self.num_decoder_layers} decoder layers on the layer axis, "
                f"got shape {list(array.shape)}"
            )
        return array[..., list(self.moe_layers), :]

    def to_moe_rows(self, loads: np.ndarray, what: str = "the loads") -> np.ndarray:
        """Loads with either numbering ([..., D, E] or [..., L, E]) -> [..., L, E]."""
        array = np.asarray(loads)
        if array.ndim >= 2 and array.shape[-2] == self.num_decoder_layers:
            return self.select(array, what)
        self.check_rows(array.shape[-2] if array.ndim >= 2 else 0, what)
        return array


def layer_numbering(
    num_moe_layers: int,
    *,
    num_decoder_layers: int | None = None,
    first_moe_layer: int | None = None,
    moe_layers: str | Sequence[int] | None = None,
) -> LayerNumbering | None:
    """The numbering from writer options (CLI flags), or None when none was given.

    `moe_layers` (explicit ids) needs `num_decoder_layers`; `first_moe_layer` alone means a dense prefix
    followed by `num_moe_layers` MoE layers and nothing after them.
    """
    if moe_layers is not None and first_moe_layer is not None:
        raise ValueError("give either the first MoE layer or the explicit MoE layer ids, not both")
    if moe_layers is not None:
        if num_decoder_layers is None:
            raise ValueError("explicit MoE layer ids need the model's total decoder layer count")
        if isinstance(moe_layers, str):
            numbering = LayerNumbering.parse_ids(moe_layers, num_decoder_layers)
        else:
            numbering = LayerNumbering(num_decoder_layers, tuple(int(i) for i in moe_layers))
    elif first_moe_layer is not None:
        numbering = LayerNumbering.dense_prefix(num_moe_layers, first_moe_layer, num_decoder_layers)
    elif num_decoder_layers is not None:
        if num_decoder_layers != num_moe_layers:
            raise ValueError(
                f"{num_decoder_layers} decoder layers for {num_moe_layers} MoE layers: "
                "say which are MoE (first MoE layer or explicit ids)"
            )
        numbering = LayerNumbering.dense_prefix(num_moe_layers, 0)
    else:
        return None
    numbering.check_rows(num_moe_layers)
    return numbering


def require(numbering: LayerNumbering | None, engine: str) -> LayerNumbering:
    """The numbering, or a ValueError saying why `engine` files cannot be written without one."""
    if numbering is None:
        raise ValueError(
            f"{engine} numbers its maps by decoder layer: give the model's layer numbering "
            "(--first-moe-layer K [--decoder-layers N], or --decoder-layers N --moe-layers IDS; "
            "--first-moe-layer 0 when every layer is MoE)"
        )
    return numbering
