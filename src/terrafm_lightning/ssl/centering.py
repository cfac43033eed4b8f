"""Teacher-output centring: plain DINO centring and TerraFM's frequency-aware dual centring."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn


def _all_reduce_sum(x: Tensor) -> Tensor:
    """Sum ``x`` over all processes (in place) when a process group is running."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x)
    return x


class Centering(nn.Module):
    """DINO centring: subtract ``c``, an EMA of the teacher's mean output over the global batch.

    Args:
        dim: K, the teacher output width.
        momentum: EMA momentum of the centre (0.9 in DINO).
    """

    def __init__(self, dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, dim))

    def forward(self, logits: Tensor) -> Tensor:
        """Centred logits ``logits - c`` (any leading shape, last dim K)."""
        return logits - self.center

    def _sums(self, logits: Tensor, dominant_class: Tensor) -> list[Tensor]:
        """Per-process sums and counts to all-reduce: ``[sum over samples, count]``."""
        flat = logits.reshape(-1, logits.shape[-1]).float()
        return [flat.sum(0), flat.new_tensor([flat.shape[0]])]

    @torch.no_grad()
    def update(self, logits: Tensor, dominant_class: Tensor) -> None:
        """Update the centre(s) from raw teacher logits of the whole global batch.

        Args:
            logits: (n_global, B, K) raw teacher head outputs of this process.
            dominant_class: (B,) WorldCover code of each sample's dominant class.
        """
        parts = self._sums(logits, dominant_class)
        reduced = _all_reduce_sum(torch.cat(parts)).split([p.numel() for p in parts])
        self._apply_update(*reduced)

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
            raise ValueError("dual centring needs a non-empty high_frequency_classes list")
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
        hf = self.high_frequency(dominant_class)
        hf_logits = logits[:, hf].reshape(-1, logits.shape[-1]).float()
        return [
            *super()._sums(logits, dominant_class),
            hf_logits.sum(0),
            logits.new_tensor([hf_logits.shape[0]], dtype=torch.float32),
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
