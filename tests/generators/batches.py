"""Hand-made pretraining batches in the format of docs/contracts.md (no datamodule needed)."""

from __future__ import annotations

import torch

from terrafm_lightning.batch import CropBatch
from terrafm_lightning.modalities import BANDS, MODALITIES


def make_batch(
    batch_size: int = 4,
    n_global: int = 2,
    n_local: int = 2,
    global_size: int = 32,
    local_size: int = 16,
    dominant_class: list[int] | None = None,
    generator: torch.Generator | None = None,
) -> CropBatch:
    """Random multi-crop batch: every sample has all modalities, crops draw random subsets."""
    g = generator or torch.Generator().manual_seed(0)

    def crops(n: int, size: int) -> dict[str, torch.Tensor]:
        rows = n * batch_size
        return {m: torch.randn(rows, len(BANDS[m]), size, size, generator=g) for m in BANDS}

    def presence(n: int) -> torch.Tensor:
        mask = torch.rand(n * batch_size, len(MODALITIES), generator=g) < 0.5
        mask[~mask.any(1), 2] = True  # never an empty crop
        return mask

    classes = dominant_class or [10, 30, 50, 95][:batch_size] * (batch_size // 4 + 1)
    return {
        "global_crops": crops(n_global, global_size),
        "local_crops": crops(n_local, local_size) if n_local else {},
        "teacher_presence": presence(n_global),
        "student_presence": presence(n_global + n_local),
        "available": torch.ones(batch_size, len(MODALITIES), dtype=torch.bool),
        "dominant_class": torch.tensor(classes[:batch_size], dtype=torch.int64),
        "worldcover_hist": torch.full((batch_size, 11), 1 / 11),
        "index": torch.arange(batch_size),
    }


def take_samples(batch: CropBatch, samples: slice) -> CropBatch:
    """The sub-batch of ``samples`` (tile indices): every crop of those tiles, crop-major."""
    size = batch["dominant_class"].shape[0]

    def take(x: torch.Tensor) -> torch.Tensor:
        per_crop = x.view(x.shape[0] // size, size, *x.shape[1:])[:, samples]
        return per_crop.reshape(-1, *x.shape[1:])

    out = {key: value[samples] for key, value in batch.items() if isinstance(value, torch.Tensor)}
    for key in ("teacher_presence", "student_presence"):
        out[key] = take(batch[key])
    for key in ("global_crops", "local_crops"):
        out[key] = {m: take(x) for m, x in batch[key].items()}
    return out
