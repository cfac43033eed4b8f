"""Landslide4Sense (Ghorbanzadeh et al. 2022): landslide segmentation from 14-band HDF5 patches.

Own reader: torchgeo 0.8.1 has no Landslide4Sense class. Layouts from the same ``root``:

- official (iarai/Landslide4Sense-2022 README): ``{TrainData,ValidData,TestData}/img/
  image_<n>.h5`` (dataset ``img``, 128x128x14) and ``.../mask/mask_<n>.h5`` (dataset ``mask``,
  128x128, 1 landslide, 0 not);
- the Hugging Face copy: ``images/{train,validation,test}/image_<n>.h5`` and
  ``annotations/{train,validation,test}/mask_<n>.h5``.

The splits are the folders. Band order (the dataset's documented order): Sentinel-2 B1..B12
(B10 included, no B8A), then ALOS PALSAR slope and DEM (not used by any stem). The published
patches are already rescaled per band (values around 1, not DN), so the default statistics
are identity (mean 0, std 1); pass ``stats=`` to override. The L1C stem's B8A is absent: it
needs ``missing_bands="fill"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from terrafm_lightning.errors import UserError
from terrafm_lightning.eval.datasets.base import (
    SPLITS,
    Detection,
    EvalDataModule,
    Sample,
    layout_error,
)
from terrafm_lightning.modalities import BANDS

L4S_BANDS = (
    "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12",
    "SLOPE", "DEM",
)  # fmt: skip
"""The 14 channels of a Landslide4Sense patch, in file order."""

LAYOUTS: dict[str, dict[str, tuple[str, str]]] = {
    "official": {
        "train": ("TrainData/img", "TrainData/mask"),
        "val": ("ValidData/img", "ValidData/mask"),
        "test": ("TestData/img", "TestData/mask"),
    },
    "huggingface": {
        "train": ("images/train", "annotations/train"),
        "val": ("images/validation", "annotations/validation"),
        "test": ("images/test", "annotations/test"),
    },
}
"""Per layout, split -> (image folder, mask folder) relative to ``root``."""


def read_h5(path: Path, key: str) -> np.ndarray:
    """The ``key`` dataset of a Landslide4Sense HDF5 file.

    Raises:
        ValueError: naming the file if it is unreadable or lacks ``key``.
    """
    try:
        with h5py.File(path, "r") as f:
            return np.asarray(f[key])
    except (OSError, KeyError) as err:
        raise UserError(f"{path}: not a Landslide4Sense {key} file ({err})") from err


class Landslide4SenseDataModule(EvalDataModule):
    """Landslide4Sense binary segmentation (1 = landslide), S2 bands into an S2 stem.

    Args:
        root: the dataset folder (official or Hugging Face layout).
        modalities: the S2 stem (default ``s2_l1c``).
        **kwargs: :class:`EvalDataModule` arguments.
    """

    task = "segmentation"
    num_classes = 2
    supported = ("s2_l1c", "s2_l2a")

    @classmethod
    def detect(cls, root: Path) -> list[Detection]:
        """The image folders of one of :data:`LAYOUTS`."""
        found = any(all((root / i).is_dir() for i, _ in f.values()) for f in LAYOUTS.values())
        return [Detection(paper_key="landslide4sense")] if found else []

    def __init__(
        self, root: str | Path, modalities: Sequence[str] = ("s2_l1c",), **kwargs: Any
    ) -> None:
        n = len(BANDS[modalities[0]]) if modalities else 0
        kwargs.setdefault("stats", {m: {"mean": [0.0] * n, "std": [1.0] * n} for m in modalities})
        super().__init__(root, modalities, **kwargs)
        layout = next(
            (
                folders
                for folders in LAYOUTS.values()
                if all((self.root / i).is_dir() for i, _ in folders.values())
            ),
            None,
        )
        if layout is None:
            expected = {name: [i for i, _ in f.values()] for name, f in LAYOUTS.items()}
            raise layout_error(self.root, f"Landslide4Sense image folders, one of {expected}")
        self.layout = layout

    def split_keys(self) -> dict[str, list[tuple[Path, Path]]]:  # noqa: D102
        keys = {}
        for split in SPLITS:
            images, masks = (self.root / f for f in self.layout[split])
            if not masks.is_dir():
                raise layout_error(
                    self.root, f"the {split} masks folder {masks.name}/ next to {images}"
                )
            files = sorted(images.glob("image_*.h5"), key=lambda p: int(p.stem.split("_")[1]))
            keys[split] = [(p, masks / p.name.replace("image_", "mask_")) for p in files]
        return keys

    def load(self, key: tuple[Path, Path]) -> Sample:  # noqa: D102
        image_path, mask_path = key
        image = read_h5(image_path, "img")
        if image.ndim != 3 or image.shape[-1] != len(L4S_BANDS):
            raise UserError(
                f"{image_path}: image shape {image.shape}, expected (H, W, {len(L4S_BANDS)})"
            )
        image = np.moveaxis(image.astype(np.float32), -1, 0)
        sample = {m: self.prepare(image, m, L4S_BANDS, str(image_path)) for m in self.modalities}
        sample["label"] = torch.from_numpy(read_h5(mask_path, "mask").astype(np.int64))
        return sample
