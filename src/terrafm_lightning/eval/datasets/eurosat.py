"""EuroSAT-MS (13-band GeoTIFFs) and EuroSAT-SAR (VV, VH GeoTIFFs) in class folders.

Layouts, all from the same ``root`` (the first one found is used):

- torchgeo's ``EuroSAT(root, download=True)``: ``root/ds/images/remote_sensing/otherDatasets/
  sentinel_2/tif/<Class>/<Class>_<n>.tif`` (the authors' ``EuroSATallBands.zip`` extracted)
  with the split files ``root/eurosat-{train,val,test}.txt`` (Neumann et al. 2019, "In-domain
  representation learning for remote sensing"); read through torchgeo's ``EuroSAT`` class.
- the authors' Zenodo release ``EuroSAT_MS.zip``: ``root/EuroSAT_MS/<Class>/...``, or ``root``
  holding the class folders itself; split files as above in ``root``.
- EuroSAT-SAR (Wang et al. 2024, as in Copernicus-Bench ``eurosat_s1``): ``root/all_imgs/
  <Class>/...``, ``root/EuroSAT-SAR/<Class>/...`` or class folders in ``root``; split files
  ``eurosat-{split}.txt`` (or ``eurosat-sar-{split}.txt``).

Split files list one image per line (``.jpg`` names in the torchgeo files; matched by stem).
Without them ``root`` is an error unless ``split_seed`` opts into a seeded random split.

Band order: from the files' band descriptions when set, else the documented order. EuroSAT-MS
GeoTIFFs hold B01..B12 then B8A LAST (torchgeo ``EuroSAT.all_band_names``; the dataset
authors' issue tracker) as uint16 DN; EuroSAT-SAR holds VV, VH in dB.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import rasterio
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchgeo.datasets import EuroSAT

from terrafm_lightning.errors import MissingInputError
from terrafm_lightning.eval.datasets.base import (
    SPLITS,
    AdaptedDataset,
    Detection,
    EvalDataModule,
    Sample,
    fallback_split,
    layout_error,
    read_split_file,
    read_tif_bands,
)
from terrafm_lightning.modalities import BANDS

EUROSAT_CLASSES = (
    "AnnualCrop",
    "Forest",
    "HerbaceousVegetation",
    "Highway",
    "Industrial",
    "Pasture",
    "PermanentCrop",
    "Residential",
    "River",
    "SeaLake",
)
"""The ten EuroSAT classes; label = index in this tuple (alphabetical, as torchgeo's)."""

EUROSAT_MS_BANDS: tuple[str, ...] = tuple(EuroSAT.all_band_names)
"""Band order of the EuroSAT-MS GeoTIFFs: B01..B12, then B8A."""


def class_folder_root(root: Path, candidates: Sequence[str]) -> Path | None:
    """The first of ``root/<candidate>`` holding all ten EuroSAT class folders."""
    for sub in candidates:
        folder = root / sub
        if all((folder / c).is_dir() for c in EUROSAT_CLASSES):
            return folder
    return None


class EuroSATDataModule(EvalDataModule):
    """EuroSAT-MS: 64x64 13-band L1C GeoTIFFs in class folders, 10 classes.

    Args:
        root: torchgeo's EuroSAT root, the Zenodo extraction, or the class folders' parent.
        modalities: ``["s2_l1c"]`` (``["s2_l2a"]`` feeds the same bands to the L2A stem).
        **kwargs: :class:`EvalDataModule` arguments.
    """

    num_classes = len(EUROSAT_CLASSES)
    supported = ("s2_l1c", "s2_l2a")
    bands: tuple[str, ...] = EUROSAT_MS_BANDS
    dtypes: tuple[str, ...] | None = ("uint16",)
    folders: tuple[str, ...] = (EuroSAT.base_dir, "EuroSAT_MS", ".")
    split_prefixes: tuple[str, ...] = ("eurosat",)

    @classmethod
    def detect(cls, root: Path) -> list[Detection]:
        """The ten class folders under one of :attr:`folders`, holding images of our band count.

        A folder without images counts as EuroSAT-MS (its datamodule then names the problem).
        """
        images = class_folder_root(root, cls.folders)
        if images is None:
            return []
        first = next(images.glob("*/*.tif"), None)
        if first is None:
            return [Detection()] if cls is EuroSATDataModule else []
        with rasterio.open(first) as src:
            return [Detection()] if src.count == len(cls.bands) else []

    def __init__(
        self, root: str | Path, modalities: Sequence[str] = ("s2_l1c",), **kwargs: Any
    ) -> None:
        super().__init__(root, modalities, **kwargs)
        self.images = class_folder_root(self.root, self.folders)
        if self.images is None:
            raise layout_error(
                self.root,
                f"the ten EuroSAT class folders ({', '.join(EUROSAT_CLASSES[:2])}, ...) under "
                f"one of {[str(self.root / f) for f in self.folders]}",
            )

    def _split_files(self) -> dict[str, Path] | None:
        for prefix in self.split_prefixes:
            files = {s: self.root / f"{prefix}-{s}.txt" for s in SPLITS}
            if all(f.is_file() for f in files.values()):
                return files
        return None

    def split_datasets(self) -> dict[str, Dataset]:  # noqa: D102
        if self.images == self.root / EuroSAT.base_dir and self._split_files():
            files = self._split_files() or {}
            return {
                s: AdaptedDataset(EuroSAT(str(self.root), split=s), self._from_torchgeo, [files[s]])
                for s in SPLITS
            }
        return super().split_datasets()

    def _from_torchgeo(self, sample: dict[str, Tensor]) -> Sample:
        image = sample["image"].numpy()
        out = {m: self.prepare(image, m, self.bands, "torchgeo EuroSAT") for m in self.modalities}
        out["label"] = sample["label"].long()
        return out

    def split_keys(self) -> dict[str, list[Path]]:  # noqa: D102
        files = {
            p.stem: p for c in EUROSAT_CLASSES for p in sorted((self.images / c).glob("*.tif"))
        }
        if not files:
            raise MissingInputError(f"{self.images}: no .tif files in the class folders")
        split_files = self._split_files()
        if split_files:
            names = {s: read_split_file(f) for s, f in split_files.items()}
        else:
            expected = [f"{self.root}/{self.split_prefixes[0]}-{s}.txt" for s in SPLITS]
            names = fallback_split(list(files), self.split_seed, str(self.root), str(expected))
        unknown = sorted({n for ns in names.values() for n in ns} - set(files))
        if unknown:
            raise MissingInputError(
                f"{self.root}: split files list {len(unknown)} images not found, e.g. {unknown[:3]}"
            )
        return {s: [files[n] for n in ns] for s, ns in names.items()}

    def load(self, key: Path) -> Sample:  # noqa: D102
        image, bands = read_tif_bands(key, self.bands, self.dtypes)
        sample = {m: self.prepare(image, m, bands, str(key)) for m in self.modalities}
        sample["label"] = torch.tensor(EUROSAT_CLASSES.index(key.parent.name))
        return sample


class EuroSATSARDataModule(EuroSATDataModule):
    """EuroSAT-SAR: the EuroSAT scenes as Sentinel-1 VV, VH (dB) GeoTIFFs, same class folders."""

    supported = ("s1",)
    bands = BANDS["s1"]
    dtypes = None
    folders = ("all_imgs", "EuroSAT-SAR", ".")
    split_prefixes = ("eurosat", "eurosat-sar")

    def __init__(
        self, root: str | Path, modalities: Sequence[str] = ("s1",), **kwargs: Any
    ) -> None:
        super().__init__(root, modalities, **kwargs)
