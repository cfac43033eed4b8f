"""Online kNN of pretraining validation: gather per-sample values, de-duplicate, two-fold kNN.

The kNN itself is :func:`terrafm_lightning.eval.knn.cross_fold_knn` (cosine, k=20, T=0.07).
Everything here runs on the device without a host sync.
"""

from __future__ import annotations

import torch
from lightning import LightningModule
from torch import Tensor

from terrafm_lightning.eval.knn import cross_fold_knn
from terrafm_lightning.modalities import WORLDCOVER_CLASSES, worldcover_index


def gather_samples(module: LightningModule, local: dict[str, Tensor]) -> dict[str, Tensor]:
    """Every rank's per-sample rows (``all_gather``, concatenated in rank order)."""
    if module.trainer.world_size == 1:
        return local
    return {k: module.all_gather(v).flatten(0, 1) for k, v in local.items()}


def unique_samples(rows: dict[str, Tensor], count: int) -> dict[str, Tensor]:
    """The rows in sample-index order, one per index: the distributed sampler's padding dropped.

    Args:
        rows: per-sample tensors with an ``"index"`` entry (store sample index).
        count: number of distinct samples (the validation set's length); a fixed output size
            keeps the selection free of a host sync.
    """
    order = torch.argsort(rows["index"], stable=True)
    index = rows["index"][order]
    repeat = torch.zeros_like(index, dtype=torch.bool)
    repeat[1:] = index[1:] == index[:-1]
    # The first occurrences, in index order: a stable sort puts the False (first) rows ahead.
    keep = order[torch.argsort(repeat.to(torch.uint8), stable=True)[:count]]
    return {k: v[keep] for k, v in rows.items()}


def validation_metrics(
    rows: dict[str, Tensor], high_frequency_classes: list[int]
) -> dict[str, Tensor]:
    """``val/loss``, ``val/knn_top1`` and ``val/knn_rare_top1`` of de-duplicated samples.

    Args:
        rows: ``index``, ``loss``, ``features`` (teacher CLS) and ``label`` (WorldCover class
            index) per sample, one row per sample (:func:`unique_samples`).
        high_frequency_classes: WorldCover codes; the rare metric covers the other classes.

    Returns:
        Device scalars; ``val/knn_rare_top1`` is NaN without a rare sample, and both kNN
        entries are absent with fewer than two samples. ``rare_samples`` counts rare samples.
    """
    metrics = {"val/loss": rows["loss"].mean()}
    labels = rows["label"]
    if len(labels) < 2:
        return metrics
    predicted = cross_fold_knn(rows["features"], labels, len(WORLDCOVER_CLASSES))
    correct = (predicted == labels).float()
    frequent = worldcover_index(
        torch.tensor(high_frequency_classes, dtype=torch.long, device=labels.device)
    )
    rare = (~torch.isin(labels, frequent)).float()
    return {
        **metrics,
        "val/knn_top1": correct.mean(),
        "val/knn_rare_top1": (correct * rare).sum() / rare.sum(),
        "rare_samples": rare.sum(),
    }
