"""Sen1Floods11 hand-labelled chips: water segmentation from S1 and/or S2 L1C.

Layout: ``root/S1Hand/<chip>_S1Hand.tif`` (VV, VH in dB, NaN nodata), ``root/S2Hand/
<chip>_S2Hand.tif`` (13 L1C bands), ``root/LabelHand/<chip>_LabelHand.tif`` (1 water,
0 not water, -1 no data: ignored). Official splits: ``flood_{train,valid,test}_data.csv``
(first column ``<chip>_S1Hand.tif``) in ``root`` or ``root/splits``; otherwise a seeded
60/20/20 split with a warning. NaN S1 pixels become the band mean (0 after normalisation).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from terrafm_lightning.eval.datasets.base import (
    EvalDataModule,
    Sample,
    fallback_split,
    read_split_file,
    read_tif,
)
from terrafm_lightning.modalities import BANDS, S2_L1C_ALL_BANDS

_FOLDERS = {"s1": ("S1Hand", BANDS["s1"]), "s2_l1c": ("S2Hand", S2_L1C_ALL_BANDS)}
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

    def __init__(
        self, root: str | Path, modalities: Sequence[str] = ("s1",), **kwargs: Any
    ) -> None:
        super().__init__(root, modalities, **kwargs)
        needed = ["LabelHand"] + [_FOLDERS[m][0] for m in self.modalities]
        absent = [f for f in needed if not (self.root / f).is_dir()]
        if absent:
            raise FileNotFoundError(f"{self.root}: missing Sen1Floods11 folders {absent}")

    def _path(self, folder: str, chip: str) -> Path:
        return self.root / folder / f"{chip}_{folder}.tif"

    def split_keys(self) -> dict[str, list[str]]:  # noqa: D102
        chips = sorted(
            p.name.removesuffix("_LabelHand.tif")
            for p in (self.root / "LabelHand").glob("*_LabelHand.tif")
        )
        if not chips:
            raise FileNotFoundError(f"{self.root / 'LabelHand'}: no *_LabelHand.tif chips")
        for where in (self.root, self.root / "splits"):
            files = {s: where / f for s, f in _SPLIT_FILES.items()}
            if all(f.is_file() for f in files.values()):
                names = {
                    s: [n.removesuffix("_S1Hand") for n in read_split_file(f)]
                    for s, f in files.items()
                }
                break
        else:
            names = fallback_split(chips, self.seed, str(self.root))
        absent = sorted({c for cs in names.values() for c in cs} - set(chips))
        if absent:
            raise FileNotFoundError(
                f"{self.root}: {len(absent)} split chips have no label, e.g. {absent[:3]}"
            )
        return names

    def load(self, key: str) -> Sample:  # noqa: D102
        sample: Sample = {}
        for m in self.modalities:
            folder, bands = _FOLDERS[m]
            path = self._path(folder, key)
            if not path.is_file():
                raise FileNotFoundError(f"Sen1Floods11 chip file not found: {path}")
            sample[m] = self.prepare(read_tif(path), m, bands, str(path))
        label = read_tif(self._path("LabelHand", key))[0]
        sample["label"] = torch.from_numpy(label).nan_to_num(nan=-1).long()
        return sample
