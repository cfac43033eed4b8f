"""Teacher-output centring: plain DINO centring and TerraFM's frequency-aware dual centring."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from terrafm_lightning.errors import UserError


def _all_reduce_sum(x: Tensor) -> Tensor:
    """Sum ``x`` over all processes (in place) when a process group is running."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x)
    return x


class Centering(nn.Module):
    """DINO centring: subtract ``c``, an EMA of the teacher's mean output over the global batch.

    The EMA takes one step per optimizer step: :meth:`accumulate` adds each micro-batch's sums
    and counts, :meth:`step` all-reduces them and moves the centre(s), so gradient accumulation
    gives the centres of one big batch. Sums, counts and updates stay on the device (no host
    sync).

    Args:
        dim: K, the teacher output width.
        momentum: EMA momentum of the centre (0.9 in DINO).
    """

    def __init__(self, dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, dim))
        # Sums and counts of this process's micro-batches since the last step, in ``_sums``
        # layout. Not a buffer: DDP broadcasts buffers from rank 0 at every forward.
        self.pending: Tensor | None = None
        self._part_sizes: list[int] = []

    def forward(self, logits: Tensor) -> Tensor:
        """Centred logits ``logits - c`` (any leading shape, last dim K)."""
        return logits - self.center

    def _sums(self, logits: Tensor, dominant_class: Tensor) -> list[Tensor]:
        """Per-process sums and counts to all-reduce: ``[sum over samples, count]``."""
        flat = logits.reshape(-1, logits.shape[-1]).float()
        count = torch.full((1,), flat.shape[0], dtype=flat.dtype, device=flat.device)
        return [flat.sum(0), count]

    @torch.no_grad()
    def accumulate(self, logits: Tensor, dominant_class: Tensor) -> None:
        """Add one (micro-)batch of raw teacher logits to the pending sums.

        Args:
            logits: (n_global, B, K) raw teacher head outputs of this process.
            dominant_class: (B,) WorldCover code of each sample's dominant class.
        """
        parts = self._sums(logits, dominant_class)
        self._part_sizes = [p.numel() for p in parts]
        sums = torch.cat(parts)
        self.pending = sums if self.pending is None else self.pending + sums

    @torch.no_grad()
    def step(self) -> None:
        """Update the centre(s) from the pending sums of all processes, then clear them."""
        if self.pending is None:
            raise RuntimeError("Centering.step without accumulated teacher logits")
        reduced, self.pending = _all_reduce_sum(self.pending), None
        self._apply_update(*reduced.split(self._part_sizes))

    @torch.no_grad()
    def update(self, logits: Tensor, dominant_class: Tensor) -> None:
        """Update the centre(s) from one global batch: :meth:`accumulate` then :meth:`step`."""
        self.accumulate(logits, dominant_class)
        self.step()

    def _apply_update(self, total: Tensor, count: Tensor) -> None:
        self.center.mul_(self.momentum).add_(total / count, alpha=1.0 - self.momentum)

    def norms(self) -> dict[str, Tensor]:
        """L2 norms of the centres, for logging."""
        return {"center_norm": self.center.norm()}


class DualCentering(Centering):
    """TerraFM dual centring: ``logits - alpha * c - (1 - alpha) * c_h``.

    ``c`` is the DINO centre; ``c_h`` is an EMA of the teacher's mean output over only the
    samples whose dominant WorldCover class is high-frequency. Sums and counts are all-reduced
    together, so processes without such samples contribute nothing, and a global batch without
    any leaves ``c_h`` unchanged.

    Args:
        dim: K, the teacher output width.
        high_frequency_classes: WorldCover codes of the high-frequency classes.
        momentum: EMA momentum of both centres.
        alpha: weight of the global centre ``c`` (0.8 in TerraFM).
    """

    def __init__(
        self,
        dim: int,
        high_frequency_classes: Sequence[int],
        momentum: float = 0.9,
        alpha: float = 0.8,
    ) -> None:
        super().__init__(dim, momentum)
        if not high_frequency_classes:
            raise UserError("dual centring needs a non-empty high_frequency_classes list")
        self.alpha = alpha
        self.register_buffer("center_hf", torch.zeros(1, dim))
        self.register_buffer(
            "hf_classes", torch.tensor(sorted(high_frequency_classes)), persistent=False
        )

    def forward(self, logits: Tensor) -> Tensor:
        """Centred logits ``logits - alpha * c - (1 - alpha) * c_h``."""
        return logits - self.alpha * self.center - (1.0 - self.alpha) * self.center_hf

    def high_frequency(self, dominant_class: Tensor) -> Tensor:
        """(B,) bool: samples whose dominant class is in the high-frequency set."""
        return torch.isin(dominant_class, self.hf_classes.to(dominant_class.device))

    def _sums(self, logits: Tensor, dominant_class: Tensor) -> list[Tensor]:
        # A 0/1 weight per sample instead of boolean-mask indexing (a host sync on a GPU).
        hf = self.high_frequency(dominant_class).to(torch.float32)
        weighted = logits.float() * hf[None, :, None]
        return [
            *super()._sums(logits, dominant_class),
            weighted.sum(dim=(0, 1)),
            (hf.sum() * logits.shape[0]).reshape(1),
        ]

    def _apply_update(
        self, total: Tensor, count: Tensor, hf_total: Tensor, hf_count: Tensor
    ) -> None:
        super()._apply_update(total, count)
        # torch.where rather than an if keeps the update free of a host-device sync.
        updated = self.center_hf * self.momentum + (hf_total / hf_count.clamp_min(1)) * (
            1.0 - self.momentum
        )
        self.center_hf.copy_(torch.where(hf_count > 0, updated, self.center_hf))

    def norms(self) -> dict[str, Tensor]:
        """L2 norms of both centres, for logging."""
        return {**super().norms(), "center_hf_norm": self.center_hf.norm()}
