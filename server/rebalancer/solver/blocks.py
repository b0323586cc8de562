"""Independent rows solved in blocks: memory and the time between cancellation checkpoints stay bounded
however many layers a call brings, and no row's result depends on the block it lands in."""

from __future__ import annotations

from collections.abc import Callable

import torch


def in_row_blocks(
    solve_rows: Callable[..., torch.Tensor], block_rows: int, rows: dict[str, torch.Tensor], **shared: object
) -> torch.Tensor:
    """`solve_rows(**{name: tensor[block]}, **shared)` for each block of at most `block_rows` rows of the
    `rows` tensors (all [N, ...]), concatenated along the rows."""
    num_rows, step = next(iter(rows.values())).shape[0], max(1, block_rows)
    blocks = [slice(start, start + step) for start in range(0, num_rows, step)]
    return torch.cat([solve_rows(**{name: t[block] for name, t in rows.items()}, **shared) for block in blocks])
