"""EuroSAT-MS (13-band GeoTIFFs) and EuroSAT-SAR (VV, VH GeoTIFFs) in class folders.

Layout: ``root/<ClassName>/<ClassName>_<n>.tif`` for the ten EuroSAT classes. Official split
files are used when present in ``root`` (``eurosat-{train,val,test}.txt`` as distributed with
torchgeo, or ``{train,val,test}.txt``; one file name per line, any extension); otherwise a
seeded 60/20/20 split is used with a warning. Bands: 13 -> the L1C order B01..B8A, B09, B10,
B11, B12 (B10 dropped for the L1C stem); 2 -> VV, VH (dB).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from terrafm_lightning.eval.datasets.base import (
    SPLITS,
    EvalDataModule,
    Sample,
    fallback_split,
    read_split_file,
    read_tif,
)
from terrafm_lightning.modalities import BANDS, S2_L1C_ALL_BANDS

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
"""The ten EuroSAT classes; label = index in this tuple."""


class EuroSATDataModule(EvalDataModule):
    """EuroSAT-MS: 64x64 13-band L1C GeoTIFFs in class folders, 10 classes.

    Args:
        root: folder holding the ten class folders.
        modalities: ``["s2_l1c"]`` (``["s2_l2a"]`` feeds the same bands to the L2A stem).
        **kwargs: :class:`EvalDataModule` arguments.
    """

    num_classes = len(EUROSAT_CLASSES)
    supported = ("s2_l1c", "s2_l2a")
    bands: tuple[str, ...] = S2_L1C_ALL_BANDS
    split_prefix = "eurosat"

    def __init__(
        self, root: str | Path, modalities: Sequence[str] = ("s2_l1c",), **kwargs: Any
    ) -> None:
        super().__init__(root, modalities, **kwargs)
        missing = [c for c in EUROSAT_CLASSES if not (self.root / c).is_dir()]
        if missing:
            raise FileNotFoundError(f"{self.root}: missing EuroSAT class folders {missing}")

    def split_keys(self) -> dict[str, list[Path]]:  # noqa: D102
        files = {p.stem: p for c in EUROSAT_CLASSES for p in sorted((self.root / c).glob("*.tif"))}
        if not files:
            raise FileNotFoundError(f"{self.root}: no .tif files in the class folders")
        split_files = [
            next((f for f in candidates if f.is_file()), None)
            for candidates in (
                [self.root / f"{self.split_prefix}-{s}.txt", self.root / f"{s}.txt"] for s in SPLITS
            )
        ]
        if all(split_files):
            names = {s: read_split_file(f) for s, f in zip(SPLITS, split_files, strict=True)}
        else:
            names = fallback_split(list(files), self.seed, str(self.root))
        unknown = sorted({n for ns in names.values() for n in ns} - set(files))
        if unknown:
            raise FileNotFoundError(
                f"{self.root}: split files list {len(unknown)} images not found, e.g. {unknown[:3]}"
            )
        return {s: [files[n] for n in ns] for s, ns in names.items()}

    def load(self, key: Path) -> Sample:  # noqa: D102
        image = read_tif(key)
        if image.shape[0] != len(self.bands):
            raise ValueError(
                f"{key}: {image.shape[0]} bands, expected {len(self.bands)} {list(self.bands)}"
            )
        sample = {m: self.prepare(image, m, self.bands, str(key)) for m in self.modalities}
        sample["label"] = torch.tensor(EUROSAT_CLASSES.index(key.parent.name))
        return sample


class EuroSATSARDataModule(EuroSATDataModule):
    """EuroSAT-SAR: the EuroSAT scenes as Sentinel-1 VV, VH (dB) GeoTIFFs, same class folders.

    Split files: ``eurosat-sar-{train,val,test}.txt`` or ``{train,val,test}.txt``.
    """

    supported = ("s1",)
    bands = BANDS["s1"]
    split_prefix = "eurosat-sar"

    def __init__(
        self, root: str | Path, modalities: Sequence[str] = ("s1",), **kwargs: Any
    ) -> None:
        super().__init__(root, modalities, **kwargs)
