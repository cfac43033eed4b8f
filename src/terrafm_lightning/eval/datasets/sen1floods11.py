"""Sen1Floods11 hand-labelled chips: water segmentation from S1 and/or S2 L1C.

Layout (torchgeo has no Sen1Floods11 class; this follows the official ``gs://sen1floods11``
bucket, cloudtostreet/Sen1Floods11 README): ``root`` is the bucket copy (holding ``v1.1/``),
its ``v1.1`` folder, or the hand-labelled folder itself. Chips:
``v1.1/data/flood_events/HandLabeled/{S1Hand,S2Hand,LabelHand}/<chip>_<folder>.tif`` (S1 VV, VH
in dB with NaN nodata; S2 the 13 L1C bands B01..B12 with B8A after B08, the dataset's documented
order; label 1 water, 0 not water, -1 no data: ignored). Official hand-labelled splits:
``v1.1/splits/flood_handlabeled/flood_{train,valid,test}_data.csv`` (first column
``<chip>_S1Hand.tif``), also found in the hand-labelled folder or its ``splits/``; none is an
error unless ``split_seed`` is given. NaN S1 pixels become the band mean (0 after normalisation).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from terrafm_lightning.errors import MissingInputError
from terrafm_lightning.eval.datasets.base import (
    Detection,
    EvalDataModule,
    Sample,
    fallback_split,
    layout_error,
    read_split_file,
    read_tif,
    read_tif_bands,
)
from terrafm_lightning.modalities import BANDS, S2_L1C_ALL_BANDS

_FOLDERS = {"s1": ("S1Hand", BANDS["s1"]), "s2_l1c": ("S2Hand", S2_L1C_ALL_BANDS)}
_HAND = Path("data", "flood_events", "HandLabeled")
_SPLITS = Path("splits", "flood_handlabeled")
_SPLIT_FILES = {
    "train": "flood_train_data.csv",
    "val": "flood_valid_data.csv",
    "test": "flood_test_data.csv",
}


class Sen1Floods11DataModule(EvalDataModule):
    """Sen1Floods11 hand-labelled water segmentation (2 classes, ignore -1).

    Args:
        root: folder holding ``S1Hand``, ``S2Hand`` and ``LabelHand``.
        modalities: ``s1`` and/or ``s2_l1c`` (both -> fusion).
        **kwargs: :class:`EvalDataModule` arguments.
    """

    task = "segmentation"
    num_classes = 2
    ignore_index = -1
    supported = ("s1", "s2_l1c")

    @classmethod
    def detect(cls, root: Path) -> list[Detection]:
        """``LabelHand/`` in ``root``, or the bucket's ``v1.1/.../HandLabeled/LabelHand``."""
        hands = (root, root / "v1.1" / _HAND, root / _HAND)
        return [Detection()] if any((h / "LabelHand").is_dir() for h in hands) else []

    def __init__(
        self, root: str | Path, modalities: Sequence[str] = ("s1",), **kwargs: Any
    ) -> None:
        super().__init__(root, modalities, **kwargs)
        needed = ["LabelHand"] + [_FOLDERS[m][0] for m in self.modalities]
        bases = [self.root / "v1.1", self.root]
        candidates = [b / _HAND for b in bases] + [self.root]
        self.chips = next((c for c in candidates if all((c / f).is_dir() for f in needed)), None)
        if self.chips is None:
            raise layout_error(self.root, f"Sen1Floods11 folders {needed} under v1.1/{_HAND}")
        self.split_dirs = [b / _SPLITS for b in bases] + [self.chips, self.chips / "splits"]

    def _path(self, folder: str, chip: str) -> Path:
        return self.chips / folder / f"{chip}_{folder}.tif"

    def split_keys(self) -> dict[str, list[str]]:  # noqa: D102
        chips = sorted(
            p.name.removesuffix("_LabelHand.tif")
            for p in (self.chips / "LabelHand").glob("*_LabelHand.tif")
        )
        if not chips:
            raise MissingInputError(f"{self.chips / 'LabelHand'}: no *_LabelHand.tif chips")
        for where in self.split_dirs:
            files = {s: where / f for s, f in _SPLIT_FILES.items()}
            if all(f.is_file() for f in files.values()):
                names = {
                    s: [n.removesuffix("_S1Hand") for n in read_split_file(f)]
                    for s, f in files.items()
                }
                break
        else:
            expected = str(self.root / "v1.1" / _SPLITS / "flood_{train,valid,test}_data.csv")
            names = fallback_split(chips, self.split_seed, str(self.root), expected)
        absent = sorted({c for cs in names.values() for c in cs} - set(chips))
        if absent:
            raise MissingInputError(
                f"{self.root}: {len(absent)} split chips have no label, e.g. {absent[:3]}"
            )
        return names

    def load(self, key: str) -> Sample:  # noqa: D102
        sample: Sample = {}
        for m in self.modalities:
            folder, bands = _FOLDERS[m]
            path = self._path(folder, key)
            if not path.is_file():
                raise MissingInputError(f"Sen1Floods11 chip file not found: {path}")
            image, names = read_tif_bands(path, bands)
            sample[m] = self.prepare(image, m, names, str(path))
        label = read_tif(self._path("LabelHand", key))[0]
        sample["label"] = torch.from_numpy(label).nan_to_num(nan=-1).long()
        return sample
