"""torchmetrics collections for the downstream tasks."""

from __future__ import annotations

from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassJaccardIndex,
    MultilabelAveragePrecision,
    MultilabelF1Score,
)
from torchmetrics.wrappers import ClasswiseWrapper


def classification_metrics(num_classes: int, multilabel: bool) -> MetricCollection:
    """Top-1 and macro F1 (multiclass) or micro/macro F1 and mAP (multilabel).

    Multiclass metrics take class scores (B, C) and integer targets (B,); multilabel metrics
    take per-class probabilities (B, C) and multi-hot targets (B, C), thresholded at 0.5.
    """
    if multilabel:
        return MetricCollection(
            {
                "f1_micro": MultilabelF1Score(num_classes, average="micro"),
                "f1_macro": MultilabelF1Score(num_classes, average="macro"),
                "map": MultilabelAveragePrecision(num_classes, average="macro"),
            }
        )
    return MetricCollection(
        {
            "top1": MulticlassAccuracy(num_classes, average="micro"),
            "f1_macro": MulticlassF1Score(num_classes, average="macro"),
        }
    )


def segmentation_metrics(num_classes: int, ignore_index: int | None) -> MetricCollection:
    """Mean IoU, per-class IoU (``iou_<c>``) and pixel accuracy, skipping ``ignore_index``."""
    return MetricCollection(
        {
            "miou": MulticlassJaccardIndex(num_classes, average="macro", ignore_index=ignore_index),
            "iou": ClasswiseWrapper(
                MulticlassJaccardIndex(num_classes, average="none", ignore_index=ignore_index),
                prefix="iou_",
            ),
            "pixel_acc": MulticlassAccuracy(
                num_classes, average="micro", ignore_index=ignore_index
            ),
        }
    )
