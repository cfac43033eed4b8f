"""Downstream evaluation: kNN, linear / segmentation probes, fine-tuning, band mapping."""

from terrafm_lightning.bands import BandMapping, map_bands
from terrafm_lightning.eval.datasets import (
    BigEarthNetDataModule,
    EuroSATDataModule,
    EuroSATSARDataModule,
    GeoBenchDataModule,
    Sen1Floods11DataModule,
)
from terrafm_lightning.eval.finetune import FineTune
from terrafm_lightning.eval.knn import KNNCallback, KNNProbe, knn_evaluate, knn_scores
from terrafm_lightning.eval.linear_probe import LinearHead, LinearProbe, linear_probe_on_features
from terrafm_lightning.eval.segmentation import SegmentationProbe
from terrafm_lightning.eval.task import BackboneTask

__all__ = [
    "BackboneTask",
    "BandMapping",
    "BigEarthNetDataModule",
    "EuroSATDataModule",
    "EuroSATSARDataModule",
    "FineTune",
    "GeoBenchDataModule",
    "KNNCallback",
    "KNNProbe",
    "LinearHead",
    "LinearProbe",
    "SegmentationProbe",
    "Sen1Floods11DataModule",
    "knn_evaluate",
    "knn_scores",
    "linear_probe_on_features",
    "map_bands",
]
