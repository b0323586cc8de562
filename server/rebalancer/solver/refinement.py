"""The settings of swap refinement, declared once for the torch path (`packing.py`) and the Triton kernel.

Both paths take a `RefineLimits`; neither imports the other's module for a constant, so the kernel
package depends on this leaf and `packing` alone dispatches to the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

# A swap must lower the heavier pack by this relative amount; float32 noise never cycles.
IMPROVEMENT = 1e-6
# Item pairs the heaviest pack is compared with per phase-two round by default (M partners x K x K).
PARTNER_PAIRS = 1600
MIN_PARTNERS = 8


@dataclass(frozen=True)
class RefineLimits:
    """How far `swap_refine` searches.

    group_size: problems [B] form consecutive groups of this size (the candidates of one layer); once
      one problem of a group meets its target the whole group stops (1: every problem on its own).
    num_pairs: heavy/light pack pairs levelled per round in phase one (capped at G / 2).
    num_partners: packs the heaviest one is compared with in phase two, lightest first (None: as many
      as fit PARTNER_PAIRS item pairs per round, M x K^2, and at least 8; every pack when that is all of
      them). Every other pack, measured: 58 x 256 -> 320 slots on 64 GPUs reaches max/LB 1.0007 against
      1.0025 with the 8 lightest, for the same number of rounds; with 9 slots per GPU the wider compare
      costs 1.6x the time for no gain, hence the budget.
    pair_rounds, heaviest_rounds: round caps of the two phases.
    """

    group_size: int = 1
    num_pairs: int = 8
    num_partners: int | None = None
    pair_rounds: int = 16
    heaviest_rounds: int = 64

    def __post_init__(self) -> None:
        for name in ("group_size", "num_pairs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_partners is not None and self.num_partners < 1:
            raise ValueError(f"num_partners must be >= 1 or None, got {self.num_partners}")
        for name in ("pair_rounds", "heaviest_rounds"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def pairs(self, num_packs: int) -> int:
        """Pairs per phase-one round for G packs."""
        return max(1, min(self.num_pairs, num_packs // 2))

    def partners(self, num_packs: int, capacity: int) -> int:
        """Partners of the heaviest pack per phase-two round for G packs of K slots: G stands for every
        pack in index order (the heaviest included, harmlessly), fewer for the lightest ones, lightest first."""
        wanted = self.num_partners
        if wanted is None:
            wanted = max(MIN_PARTNERS, PARTNER_PAIRS // max(capacity, 1) ** 2)
        return num_packs if wanted >= num_packs - 1 else wanted


DEFAULT_LIMITS = RefineLimits()
