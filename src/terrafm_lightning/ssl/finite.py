"""Non-finite loss detection without a host sync per step."""

from __future__ import annotations

import torch
from torch import Tensor


class NonFiniteLossGuard:
    """Keeps, on the device, the first optimizer step with a non-finite loss; raises when read.

    :meth:`record` runs every step with device ops only; :meth:`check` is the one host sync,
    done where a number is read anyway (progress bar) and before every checkpoint.
    """

    def __init__(self) -> None:
        self._first: tuple[Tensor, Tensor] | None = None  # (step or -1, loss at that step)

    def record(self, loss: Tensor, step: int) -> None:
        """Remember ``step`` if ``loss`` is non-finite and no earlier step was."""
        if self._first is None or self._first[0].device != loss.device:
            self._first = (
                torch.full((), -1, dtype=torch.int64, device=loss.device),
                torch.zeros((), device=loss.device),
            )
        first, value = self._first
        new = (first < 0) & ~torch.isfinite(loss)
        self._first = (torch.where(new, step, first), torch.where(new, loss.detach(), value))

    def check(self, epoch: int, loss: Tensor | None = None) -> float:
        """Raise on a recorded non-finite loss; one host sync, which also reads ``loss``.

        Returns:
            The value of ``loss`` (NaN without one or before any record).

        Raises:
            FloatingPointError: naming the loss, the optimizer step and ``epoch``.
        """
        if self._first is None:
            return float("nan")
        parts = [*self._first, *([] if loss is None else [loss.detach()])]
        first, bad, *current = torch.stack([p.double() for p in parts]).tolist()
        if first >= 0:
            raise FloatingPointError(
                f"non-finite DINO loss ({bad}) at optimizer step {int(first)} "
                f"(epoch {epoch}): stopping; lower the lr or check the input batch"
            )
        return current[0] if current else float("nan")
