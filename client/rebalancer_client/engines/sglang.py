"""SGLang: expert-distribution recorder dumps in, the `--init-expert-location` file out.

Recorder dumps (`stat` mode, `torch.save`d by rank 0 or returned with `output_mode="object"`) hold
`logical_count` [buffer, D, E] int32 counts per buffered step, indexed by decoder layer (dense layers are
all-zero rows), plus `rank` and `average_utilization_rate_over_window`. The circular buffer is
preallocated, so steps never filled are all-zero: they are dropped here rather than counted as reports.

The init file is `{"physical_to_logical_map": [D rows of R ints]}`: SGLang passes the keys as keyword
arguments to `ExpertLocationMetadata.init_by_mapping`, so no other key may appear, and it indexes rows by
decoder layer without checking their number (a file with one row per MoE layer loads, then serves the
wrong rows).
"""

from __future__ import annotations

import importlib
import json
import pathlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .layers import LayerNumbering, require


@dataclass(frozen=True)
class RecorderDump:
    """The filled steps of one recorder dump: `logical_count` [T, D, E] int64."""

    logical_count: np.ndarray
    rank: int
    average_utilization_rate_over_window: float | None
    dropped_steps: int

    def reports(self, numbering: LayerNumbering | None = None) -> np.ndarray:
        """Per-step loads [T, L, E] for a deployment: the MoE rows when `numbering` is given."""
        counts = self.logical_count
        return counts if numbering is None else numbering.select(counts, "the recorder dump")


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def is_recorder_dump(data: object) -> bool:
    return isinstance(data, Mapping) and "logical_count" in data


def recorder_dump(data: Mapping[str, Any]) -> RecorderDump:
    """A dump dict (as saved by the recorder, or its `output_mode="object"` result) -> RecorderDump."""
    counts = _to_numpy(data["logical_count"])
    if counts.ndim == 2:
        counts = counts[None]
    if counts.ndim != 3:
        raise ValueError(f"logical_count must be [buffer, layers, experts], got shape {list(counts.shape)}")
    if counts.dtype.kind not in "iuf" or (counts.dtype.kind == "f" and not np.isfinite(counts).all()):
        raise ValueError(f"logical_count must hold finite counts, got dtype {counts.dtype}")
    filled = counts.reshape(counts.shape[0], -1).any(axis=1)
    rate = data.get("average_utilization_rate_over_window")
    return RecorderDump(
        logical_count=counts[filled].astype(np.int64 if counts.dtype.kind in "iu" else np.float64),
        rank=int(data.get("rank", 0) or 0),
        average_utilization_rate_over_window=None if rate is None else float(rate),
        dropped_steps=int((~filled).sum()),
    )


def read_recorder_dump(path: str | pathlib.Path) -> RecorderDump:
    """A dump file: `.pt` as the recorder writes it (needs torch, which the client never requires) or
    `.json` with the same keys."""
    path = pathlib.Path(path)
    if path.suffix.lower() == ".json":
        data = json.loads(path.read_text())
    else:
        try:
            torch = importlib.import_module("torch")
        except ImportError as exc:
            raise ValueError(f"{path}: reading .pt dumps needs torch, which is not installed") from exc
        data = torch.load(path, map_location="cpu", weights_only=True)
    if not is_recorder_dump(data):
        raise ValueError(f"{path}: not an SGLang recorder dump (no logical_count)")
    return recorder_dump(data)


def init_expert_location(phy2log: np.ndarray, num_experts: int, numbering: LayerNumbering | None) -> dict[str, Any]:
    """The `--init-expert-location` document: [L, R] MoE rows spread over the model's D decoder rows."""
    rows = require(numbering, "SGLang").expand(phy2log, num_experts)
    return {"physical_to_logical_map": rows.tolist()}
