"""BigEarthNet v1 and v2 (S2 L2A and/or S1) with the 19-class nomenclature; layout detected.

v1 (own reader; torchgeo's ``BigEarthNet`` needs all of S1, S2 and its split files even for one
sensor): ``root`` holds an S2 folder (patch folders with ``<patch>_B01.tif`` ... ``_B12.tif`` and
``<patch>_labels_metadata.json``; ``BigEarthNet-v1.0`` in the official tarball) and/or an S1
folder (patch folders with ``<patch>_VV.tif``, ``<patch>_VH.tif`` and a metadata JSON naming its
``corresponding_s2_patch``; ``BigEarthNet-S1-v1.0``); both are found by content, and S1 metadata
is only read when S1 is requested. Splits: torchgeo's ``bigearthnet-{train,val,test}.csv``
(``<s2 patch>,<s1 patch>`` rows) or the official ``{train,val,test}.csv`` (S2 patch names) in
``root``; none is an error unless ``split_seed`` is given. Band order is by file name; S2 bands
at 20 m and 60 m are resampled bilinearly to the 10 m grid (120 px) before stacking. The 43
CORINE labels map to the 19 classes of Sumbul et al. (2021); labels without a 19-class
counterpart (e.g. airports, burnt areas) are dropped.

v2 (``metadata.parquet`` in ``root``, the official reBEN release as torchgeo's
``BigEarthNetV2`` expects it: ``BigEarthNet-S1/``, ``BigEarthNet-S2/``, ``Reference_Maps/``):
read through torchgeo, whose labels are already the 19 classes and whose split is the
parquet's ``split`` column. torchgeo stacks a patch's band files sorted by name, so S1 comes as
(VH, VV) and S2 as B01..B08, B8A, B09, B11, B12 (``sort_sentinel2_bands``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchgeo.datasets import BigEarthNetV2

from terrafm_lightning.errors import MissingInputError, UserError
from terrafm_lightning.eval.datasets.base import (
    SPLITS,
    AdaptedDataset,
    Detection,
    EvalDataModule,
    Sample,
    fallback_split,
    layout_error,
    read_split_file,
    read_tif,
    resize,
)
from terrafm_lightning.modalities import BANDS

BEN19_CLASSES = (
    "Urban fabric",
    "Industrial or commercial units",
    "Arable land",
    "Permanent crops",
    "Pastures",
    "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas",
    "Broad-leaved forest",
    "Coniferous forest",
    "Mixed forest",
    "Natural grassland and sparsely vegetated areas",
    "Moors, heathland and sclerophyllous vegetation",
    "Transitional woodland, shrub",
    "Beaches, dunes, sands",
    "Inland wetlands",
    "Coastal wetlands",
    "Inland waters",
    "Marine waters",
)
"""The 19-class BigEarthNet nomenclature; label = index in this tuple."""

CORINE_TO_BEN19: dict[str, int | None] = {
    "Continuous urban fabric": 0,
    "Discontinuous urban fabric": 0,
    "Industrial or commercial units": 1,
    "Road and rail networks and associated land": None,
    "Port areas": None,
    "Airports": None,
    "Mineral extraction sites": None,
    "Dump sites": None,
    "Construction sites": None,
    "Green urban areas": None,
    "Sport and leisure facilities": None,
    "Non-irrigated arable land": 2,
    "Permanently irrigated land": 2,
    "Rice fields": 2,
    "Vineyards": 3,
    "Fruit trees and berry plantations": 3,
    "Olive groves": 3,
    "Annual crops associated with permanent crops": 3,
    "Pastures": 4,
    "Complex cultivation patterns": 5,
    "Land principally occupied by agriculture, with significant areas of natural vegetation": 6,
    "Agro-forestry areas": 7,
    "Broad-leaved forest": 8,
    "Coniferous forest": 9,
    "Mixed forest": 10,
    "Natural grassland": 11,
    "Sparsely vegetated areas": 11,
    "Moors and heathland": 12,
    "Sclerophyllous vegetation": 12,
    "Transitional woodland/shrub": 13,
    "Beaches, dunes, sands": 14,
    "Bare rock": None,
    "Burnt areas": None,
    "Inland marshes": 15,
    "Peatbogs": 15,
    "Salt marshes": 16,
    "Salines": 16,
    "Intertidal flats": None,
    "Water courses": 17,
    "Water bodies": 17,
    "Coastal lagoons": 18,
    "Estuaries": 18,
    "Sea and ocean": 18,
}
"""The 43 BigEarthNet v1 CORINE labels -> 19-class index (None: no counterpart, dropped)."""

V2_BANDS = {"s1": ("VH", "VV"), "s2_l2a": BANDS["s2_l2a"]}
"""Band order of torchgeo's ``BigEarthNetV2`` images (band files sorted by name)."""

S2_NATIVE_SIZE = 120
"""BigEarthNet patches are 120x120 px at 10 m."""


def ben19_target(labels: Sequence[str], source: str) -> torch.Tensor:
    """Multi-hot (19,) float target of a patch's CORINE label names."""
    unknown = [name for name in labels if name not in CORINE_TO_BEN19]
    if unknown:
        raise UserError(f"{source}: unknown BigEarthNet labels {unknown}")
    target = torch.zeros(len(BEN19_CLASSES))
    for name in labels:
        if CORINE_TO_BEN19[name] is not None:
            target[CORINE_TO_BEN19[name]] = 1.0
    return target


def _read_json(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: unreadable labels metadata ({err})") from err
    if not isinstance(meta, dict) or not isinstance(meta.get("labels"), list):
        raise UserError(f"{path}: no 'labels' list")
    return meta


def patch_folders(root: Path, marker: str) -> dict[str, Path] | None:
    """Patch folders of the first sub-folder of ``root`` whose patches hold ``*<marker>``."""
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        patches = sorted(p for p in sub.iterdir() if p.is_dir())
        if patches and (patches[0] / f"{patches[0].name}{marker}").is_file():
            return {p.name: p for p in patches}
    return None


class BigEarthNetDataModule(EvalDataModule):
    """BigEarthNet v1, multilabel over the 19-class nomenclature, S2 L2A and/or S1.

    Args:
        root: folder holding the S2 and/or S1 patch folders (and the split CSVs).
        modalities: any of ``s2_l2a`` and ``s1``; both -> fusion of the paired patches.
        **kwargs: :class:`EvalDataModule` arguments.
    """

    num_classes = len(BEN19_CLASSES)
    multilabel = True
    supported = ("s1", "s2_l2a")

    @classmethod
    def detect(cls, root: Path) -> list[Detection]:
        """v2's ``metadata.parquet``, or v1 S2 patch folders, else v1 S1 ones (S1 alone)."""
        if (root / "metadata.parquet").is_file() or patch_folders(root, "_B02.tif"):
            return [Detection()]
        if patch_folders(root, "_VV.tif"):
            return [Detection({"modalities": ["s1"]})]
        return []

    def __init__(
        self, root: str | Path, modalities: Sequence[str] = ("s2_l2a",), **kwargs: Any
    ) -> None:
        super().__init__(root, modalities, **kwargs)
        self.version = 2 if (self.root / "metadata.parquet").is_file() else 1
        self.s1: dict[str, Path] = {}
        if self.version == 2:
            needed = [BigEarthNetV2.dir_file_names[k] for k in ("s1", "s2", "maps")]
            absent = [n for n in needed if not (self.root / n).exists()]
            if absent:
                raise layout_error(self.root, f"BigEarthNet v2 folders {needed} (missing {absent})")
            return
        self.s2 = patch_folders(self.root, "_B02.tif")
        s1 = patch_folders(self.root, "_VV.tif") if "s1" in self.modalities else {}
        if (self.s2 is None and "s2_l2a" in self.modalities) or s1 is None:
            raise layout_error(
                self.root,
                f"BigEarthNet {'S2' if self.s2 is None else 'S1'} patch folders (a folder of "
                "<patch>/<patch>_B02.tif or <patch>/<patch>_VV.tif), or metadata.parquet (v2)",
            )
        # S1 patches are keyed by the S2 patch they pair with.
        for name, folder in (s1 or {}).items():
            meta = _read_json(folder / f"{name}_labels_metadata.json")
            self.s1[meta.get("corresponding_s2_patch", name)] = folder

    def split_datasets(self) -> dict[str, Dataset]:  # noqa: D102
        if self.version == 1:
            return super().split_datasets()
        bands = "all" if len(self.modalities) == 2 else {"s1": "s1"}.get(self.modalities[0], "s2")
        return {
            s: AdaptedDataset(
                BigEarthNetV2(str(self.root), split=s, bands=bands),
                self._from_v2,
                [self.root / "metadata.parquet"],
            )
            for s in SPLITS
        }

    def _from_v2(self, sample: dict[str, Tensor]) -> Sample:
        out: Sample = {}
        for m in self.modalities:
            key = "image" if len(self.modalities) == 1 else f"image_{m[:2]}"
            out[m] = self.prepare(sample[key].numpy(), m, V2_BANDS[m], "BigEarthNet v2")
        out["label"] = sample["label"].float()
        return out

    def split_keys(self) -> dict[str, list[str]]:  # noqa: D102
        available = set(self.s2 if self.s2 is not None else self.s1)
        if "s1" in self.modalities:
            available &= set(self.s1)
        for pattern in ("bigearthnet-{}.csv", "{}.csv"):
            csvs = [self.root / pattern.format(s) for s in SPLITS]
            if all(f.is_file() for f in csvs):
                names = {s: read_split_file(f) for s, f in zip(SPLITS, csvs, strict=True)}
                absent = sorted({n for ns in names.values() for n in ns} - available)
                if absent:
                    raise MissingInputError(
                        f"{self.root}: {len(absent)} split patches not found, e.g. {absent[:3]}"
                    )
                return names
        expected = f"{self.root}/bigearthnet-{{train,val,test}}.csv or {{train,val,test}}.csv"
        return fallback_split(sorted(available), self.split_seed, str(self.root), expected)

    def _s2_image(self, folder: Path) -> np.ndarray:
        bands = []
        for band in BANDS["s2_l2a"]:
            path = folder / f"{folder.name}_{band}.tif"
            if not path.is_file():
                raise MissingInputError(f"{folder}: missing band file {path.name}")
            bands.append(resize(torch.from_numpy(read_tif(path)), S2_NATIVE_SIZE))
        return torch.cat(bands).numpy()

    def load(self, key: str) -> Sample:  # noqa: D102
        sample: Sample = {}
        if "s1" in self.modalities:
            folder = self.s1[key]
            image = np.concatenate(
                [read_tif(folder / f"{folder.name}_{b}.tif") for b in ("VV", "VH")]
            )
            sample["s1"] = self.prepare(image, "s1", BANDS["s1"], str(folder))
            meta_path = folder / f"{folder.name}_labels_metadata.json"
        if "s2_l2a" in self.modalities:
            folder = self.s2[key]
            sample["s2_l2a"] = self.prepare(
                self._s2_image(folder), "s2_l2a", BANDS["s2_l2a"], str(folder)
            )
            meta_path = folder / f"{key}_labels_metadata.json"
        sample["label"] = ben19_target(_read_json(meta_path)["labels"], str(meta_path))
        return sample
