"""Benchmark datamodules: EuroSAT(-SAR), BigEarthNet v1, GEO-Bench v1, Sen1Floods11."""

from terrafm_lightning.eval.datasets.base import EvalDataModule
from terrafm_lightning.eval.datasets.bigearthnet import BigEarthNetDataModule
from terrafm_lightning.eval.datasets.eurosat import EuroSATDataModule, EuroSATSARDataModule
from terrafm_lightning.eval.datasets.geobench import GeoBenchDataModule
from terrafm_lightning.eval.datasets.sen1floods11 import Sen1Floods11DataModule

__all__ = [
    "BigEarthNetDataModule",
    "EuroSATDataModule",
    "EuroSATSARDataModule",
    "EvalDataModule",
    "GeoBenchDataModule",
    "Sen1Floods11DataModule",
]
