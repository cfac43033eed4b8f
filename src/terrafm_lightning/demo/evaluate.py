"""The demo's downstream check: kNN and linear probes on held-out synthetic tiles.

Labels are the tiles' dominant WorldCover class. Features are frozen CLS features of whole tiles
(every available modality, so fusion where a tile has several), computed once per backbone: the
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
from terrafm_lightning.data.dataset import StoreTileDataset
from terrafm_lightning.eval.knn import knn_evaluate, knn_scores
from terrafm_lightning.eval.metrics import classification_metrics
from terrafm_lightning.models import TerraFM


@dataclass
class SplitFeatures:
    """CLS features and class indices (positions in the datamodule's ``classes``) of a split."""

    features: Tensor
    labels: Tensor


@torch.no_grad()
def tile_features(
    backbone: TerraFM, dm: TerraFMDataModule, dataset: StoreTileDataset, batch_size: int = 64
) -> SplitFeatures:
    """Frozen CLS features of the whole tiles of ``dataset`` (the datamodule's validation view).

    Tiles without a dominant class (no valid WorldCover pixel) are left out.
    """
    backbone.eval()
    classes = torch.tensor(dm.classes)
    features, labels = [], []
    for batch in DataLoader(dataset, batch_size=batch_size):
        labelled = batch["dominant_class"] > 0
        view = dm.multicrop.whole_tiles(batch)
        features.append(backbone(view["inputs"], view["presence"])[labelled].float())
        labels.append(torch.searchsorted(classes, batch["dominant_class"][labelled]))
    return SplitFeatures(torch.cat(features), torch.cat(labels))


def per_class_accuracy(scores: Tensor, labels: Tensor, num_classes: int) -> list[float | None]:
    """Recall of every class; None for a class without query samples."""
    accuracy = MulticlassAccuracy(num_classes, average="none")(scores, labels)
    support = torch.bincount(labels, minlength=num_classes)
    return [float(a) if n else None for a, n in zip(accuracy, support, strict=True)]


def knn_results(
    bank: SplitFeatures, queries: SplitFeatures, num_classes: int, k: int = 20
) -> dict[str, object]:
    """Paper-protocol kNN (cosine, k=20, T=0.07): top-1, macro F1 and per-class accuracy."""
    metrics: dict[str, object] = dict(
        knn_evaluate(bank.features, bank.labels, queries.features, queries.labels, num_classes, k=k)
    )
    scores = knn_scores(bank.features, bank.labels, queries.features, num_classes, k=k)
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
