"""Hand-made pretraining batches in the format of docs/contracts.md (no datamodule needed)."""

from __future__ import annotations

from typing import Any

import torch

from terrafm_lightning.modalities import BANDS, MODALITIES


def make_batch(
    batch_size: int = 4,
    n_global: int = 2,
    n_local: int = 2,
    global_size: int = 32,
    local_size: int = 16,
    dominant_class: list[int] | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Any]:
    """Random multi-crop batch: every sample has all modalities, crops draw random subsets."""
    g = generator or torch.Generator().manual_seed(0)

    def crop(size: int) -> dict[str, torch.Tensor]:
        return {m: torch.randn(batch_size, len(BANDS[m]), size, size, generator=g) for m in BANDS}

    def presence() -> torch.Tensor:
        mask = torch.rand(batch_size, len(MODALITIES), generator=g) < 0.5
        mask[~mask.any(1), 2] = True  # never an empty crop
        return mask

    classes = dominant_class or [10, 30, 50, 95][:batch_size] * (batch_size // 4 + 1)
    return {
        "global_crops": [crop(global_size) for _ in range(n_global)],
        "local_crops": [crop(local_size) for _ in range(n_local)],
        "teacher_presence": [presence() for _ in range(n_global)],
        "student_presence": [presence() for _ in range(n_global + n_local)],
        "available": torch.ones(batch_size, len(MODALITIES), dtype=torch.bool),
        "dominant_class": torch.tensor(classes[:batch_size], dtype=torch.int64),
        "worldcover_hist": torch.full((batch_size, 11), 1 / 11),
        "index": torch.arange(batch_size),
    }
