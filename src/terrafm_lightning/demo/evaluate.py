"""The demo's downstream check: kNN and linear probes on held-out synthetic tiles.

Labels are the tiles' dominant WorldCover class. Features are frozen CLS features of whole tiles
from :func:`terrafm_lightning.eval.features.extract_features`, once per backbone and view (all
available modalities fused, or S1 / S2 L2A alone): the kNN bank and the probe's training set
are the pretraining split, the queries the held-out split (``val_fraction`` of
:class:`TerraFMDataModule`, never seen in pretraining). kNN and the linear probe are
``eval/``'s (:func:`~terrafm_lightning.eval.knn.knn_scores`,
:func:`~terrafm_lightning.eval.linear_probe.linear_probe_on_features`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

from terrafm_lightning.data.datamodule import TerraFMDataModule
from terrafm_lightning.data.dataset import StoreTileDataset, collate_tile_batch
from terrafm_lightning.eval.features import SplitFeatures, extract_features
from terrafm_lightning.eval.knn import knn_scores, score_metrics
from terrafm_lightning.modalities import MODALITIES, worldcover_index
from terrafm_lightning.models import TerraFM

VIEWS: dict[str, str | None] = {"fused": None, "S1": "s1", "S2 L2A": "s2_l2a"}
"""Evaluation views: every available modality (fusion), or one modality alone."""


def view_batches(
    dm: TerraFMDataModule, dataset: StoreTileDataset, modality: str | None, batch_size: int
) -> Iterator[dict[str, Tensor]]:
    """Whole-tile batches of one view: inputs, ``presence`` and ``label`` (class position).

    Tiles come in the datamodule's validation layout (whole tile, resized, normalised). A tile
    enters a single-modality view only if it has that modality; tiles without a dominant class
    (no valid WorldCover pixel) are left out.
    """
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate_tile_batch):
        tiles = dm.multicrop.whole_tiles(batch)
        presence, keep = tiles["presence"], batch["dominant_class"] > 0
        if modality is not None:
            column = torch.zeros_like(presence)
            column[:, MODALITIES.index(modality)] = True
            keep = keep & (presence & column).any(dim=1)
            presence = column
        if keep.any():
            inputs = {m: x[keep] for m, x in tiles["inputs"].items()}
            label = worldcover_index(batch["dominant_class"][keep])
            yield {**inputs, "presence": presence[keep], "label": label}


def tile_features(
    backbone: TerraFM, dm: TerraFMDataModule, dataset: StoreTileDataset, batch_size: int = 64
) -> dict[str, SplitFeatures]:
    """Frozen CLS features of the whole tiles of ``dataset`` for every view of :data:`VIEWS`."""
    return {
        view: extract_features(backbone, view_batches(dm, dataset, modality, batch_size))
        for view, modality in VIEWS.items()
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
