"""Benchmark datamodules, each reading its official and torchgeo download layouts.

EuroSAT(-SAR), BigEarthNet v1/v2, GEO-Bench v1, Sen1Floods11, Copernicus-Bench, Landslide4Sense.
"""

from terrafm_lightning.eval.datasets.base import EvalDataModule
from terrafm_lightning.eval.datasets.bigearthnet import BigEarthNetDataModule
from terrafm_lightning.eval.datasets.copernicus import CopernicusBenchDataModule
from terrafm_lightning.eval.datasets.eurosat import EuroSATDataModule, EuroSATSARDataModule
from terrafm_lightning.eval.datasets.geobench import GeoBenchDataModule
from terrafm_lightning.eval.datasets.landslide4sense import Landslide4SenseDataModule
from terrafm_lightning.eval.datasets.sen1floods11 import Sen1Floods11DataModule

__all__ = [
    "BigEarthNetDataModule",
    "CopernicusBenchDataModule",
    "EuroSATDataModule",
    "EuroSATSARDataModule",
    "EvalDataModule",
    "GeoBenchDataModule",
    "Landslide4SenseDataModule",
    "Sen1Floods11DataModule",
]
