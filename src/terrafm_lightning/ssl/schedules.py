"""Per-optimizer-step schedules: linear warm-up followed by a cosine (DINO style)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from terrafm_lightning.errors import UserError


@dataclass(frozen=True)
class WarmupCosine:
    """Linear ``warmup_start -> start`` for ``warmup_steps``, then cosine ``start -> end``.

    With ``start == end`` this is a linear warm-up to a constant (the teacher temperature);
    with ``warmup_steps == 0`` a plain cosine (weight decay, EMA momentum).

    Args:
        start: value at the end of the warm-up.
        end: value at ``total_steps`` (and after it).
        total_steps: length of the whole schedule in optimizer steps.
        warmup_steps: length of the linear warm-up.
        warmup_start: value at step 0 when ``warmup_steps > 0``.
    """

    start: float
    end: float
    total_steps: int
    warmup_steps: int = 0
    warmup_start: float = 0.0

    def __post_init__(self) -> None:
        if self.total_steps < 1 or not 0 <= self.warmup_steps <= self.total_steps:
            raise UserError(
                f"need 0 <= warmup_steps ({self.warmup_steps}) <= total_steps "
                f"({self.total_steps}) and total_steps >= 1"
            )

    def __call__(self, step: int) -> float:
        """Value at optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.warmup_start + (self.start - self.warmup_start) * step / self.warmup_steps
        span = self.total_steps - self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / span) if span else 1.0
        return self.end + 0.5 * (self.start - self.end) * (1.0 + math.cos(math.pi * progress))
