"""The demo's downstream check: kNN and linear probes on held-out synthetic tiles.

Labels are the tiles' dominant WorldCover class. Features are frozen CLS features of whole tiles,
computed once per backbone and view (all available modalities fused, or S1 / S2 L2A alone): the
kNN bank and the probe's training set are the pretraining split, the queries the held-out split
(``val_fraction`` of :class:`TerraFMDataModule`, never seen in pretraining).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

from terrafm_lightning.data.datamodule import TerraFMDataModule
from terrafm_lightning.data.reader import StoreTileDataset, collate_tile_batch
from terrafm_lightning.eval.knn import knn_scores, score_metrics
from terrafm_lightning.eval.metrics import classification_metrics
from terrafm_lightning.modalities import MODALITIES
from terrafm_lightning.models import TerraFM


@dataclass
class SplitFeatures:
    """CLS features and class indices (positions in the datamodule's ``classes``) of a split."""

    features: Tensor
    labels: Tensor


VIEWS: dict[str, str | None] = {"fused": None, "S1": "s1", "S2 L2A": "s2_l2a"}
"""Evaluation views: every available modality (fusion), or one modality alone."""


@torch.no_grad()
def tile_features(
    backbone: TerraFM, dm: TerraFMDataModule, dataset: StoreTileDataset, batch_size: int = 64
) -> dict[str, SplitFeatures]:
    """Frozen CLS features of the whole tiles of ``dataset`` for every view of :data:`VIEWS`.

    Tiles come in the datamodule's validation layout (whole tile, resized, normalised). A tile
    enters a single-modality view only if it has that modality; tiles without a dominant class
    (no valid WorldCover pixel) are left out.
    """
    backbone.eval()
    classes = torch.tensor(dm.classes)
    parts: dict[str, list[tuple[Tensor, Tensor]]] = {view: [] for view in VIEWS}
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate_tile_batch):
        tiles = dm.multicrop.whole_tiles(batch)
        labelled = batch["dominant_class"] > 0
        labels = torch.searchsorted(classes, batch["dominant_class"])
        for view, modality in VIEWS.items():
            presence, keep = tiles["presence"], labelled
            if modality is not None:
                column = torch.zeros_like(presence)
                column[:, MODALITIES.index(modality)] = True
                keep = labelled & (presence & column).any(dim=1)
                presence = column
            if keep.any():
                features = backbone(tiles["inputs"], presence).float()
                parts[view].append((features[keep], labels[keep]))
    return {
        view: SplitFeatures(torch.cat([f for f, _ in p]), torch.cat([y for _, y in p]))
        for view, p in parts.items()
    }


def per_class_accuracy(scores: Tensor, labels: Tensor, num_classes: int) -> list[float | None]:
    """Recall of every class; None for a class without query samples."""
    accuracy = MulticlassAccuracy(num_classes, average="none")(scores, labels)
    support = torch.bincount(labels, minlength=num_classes)
    return [float(a) if n else None for a, n in zip(accuracy, support, strict=True)]


def knn_results(
    bank: SplitFeatures, queries: SplitFeatures, num_classes: int, k: int = 20
) -> dict[str, object]:
    """Paper-protocol kNN (cosine, k=20, T=0.07): top-1, macro F1 and per-class accuracy."""
    scores = knn_scores(bank.features, bank.labels, queries.features, num_classes, k=k)
    metrics: dict[str, object] = dict(score_metrics(scores, queries.labels, num_classes))
    metrics["per_class"] = per_class_accuracy(scores, queries.labels, num_classes)
    return metrics


def linear_probe_results(
    train: SplitFeatures,
    test: SplitFeatures,
    num_classes: int,
    steps: int = 300,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
) -> dict[str, float]:
    """A linear classifier on frozen, standardised features; full-batch AdamW, test metrics.

    Training on cached features (no augmentation) is exact for a frozen backbone and keeps the
    probe a fraction of a second on a CPU.
    """
    mean, std = train.features.mean(0), train.features.std(0).clamp_min(1e-6)
    x_train, x_test = (train.features - mean) / std, (test.features - mean) / std
    generator = torch.Generator().manual_seed(0)
    head = nn.Linear(x_train.shape[1], num_classes)
    with torch.no_grad():
        head.weight.copy_(0.01 * torch.randn(head.weight.shape, generator=generator))
        head.bias.zero_()
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(head(x_train), train.labels).backward()
        optimizer.step()
    with torch.no_grad():
        metrics = classification_metrics(num_classes, multilabel=False)
        metrics.update(head(x_test), test.labels)
        return {name: float(value) for name, value in metrics.compute().items()}
