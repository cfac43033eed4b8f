"""Writers of Copernicus-Bench tasks and Landslide4Sense in their published layouts.

Copernicus-Bench: the folders inside each task zip of the official release
(``wangyi111/Copernicus-Bench``), which torchgeo's ``CopernicusBench*`` classes read as they are
(file names, split files and band order from those classes' documentation). Every image band
is content-coded (:data:`tests.generators.benchmarks.BAND_CODE`).
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from tests.generators.benchmarks import coded_image, write_tif

S2_13 = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
S2_12 = tuple(b for b in S2_13 if b != "B10")
EUROSAT_13 = S2_13[:8] + ("B09", "B10", "B11", "B12", "B8A")
LCZ_10 = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")
SPLIT_SIZES = {"train": 4, "val": 2, "test": 2}
COPERNICUS_CLASSES = (
    "AnnualCrop", "HerbaceousVegetation", "Industrial", "PermanentCrop", "River", "Forest",
    "Highway", "Pasture", "Residential", "SeaLake",
)  # fmt: skip
"""Copernicus-Bench EuroSAT's class order (not alphabetical), as torchgeo documents it."""


def _samples(split: str) -> list[int]:
    offset = {"train": 0, "val": 100, "test": 200}[split]
    return [offset + i for i in range(SPLIT_SIZES[split])]


def write_copernicus(root: Path, task: str, size: int = 16, official: bool = False) -> Path:
    """One Copernicus-Bench task under ``root`` (``official``: inside its ``l<k>_*`` folder).

    Labels: sample i has class ``i % 2`` (classification), or a mask whose left half is class 1
    and right half class 2 (segmentation). Returns the root to give the datamodule.
    """
    rng = np.random.default_rng(7)
    levels = {"cloud_s2": "l1_cloud_s2", "lcz_s2": "l3_lcz_s2", "flood_s1": "l3_flood_s1"}
    base = root / levels.get(task, f"l2_{task.rsplit('_', 1)[0]}_s1s2") if official else root
    if task in ("eurosat_s1", "eurosat_s2"):
        folder = base / task
        bands = ("VV", "VH") if task == "eurosat_s1" else EUROSAT_13
        dtype = "float32" if task == "eurosat_s1" else "uint16"
        for split in SPLIT_SIZES:
            names = []
            for i in _samples(split):
                cls = COPERNICUS_CLASSES[i % 2]
                name = f"{cls}_{i + 1}.tif"
                write_tif(
                    folder / "all_imgs" / cls / name, coded_image(rng, bands, i % 2, size, dtype)
                )
                names.append(name.replace(".tif", ".jpg"))
            (folder / f"eurosat-{split}.txt").write_text("\n".join(names) + "\n")
    elif task in ("bigearthnet_s1", "bigearthnet_s2"):
        folder = base / "bigearthnet_s1s2"
        for split in SPLIT_SIZES:
            lines = ["s1,s2," + ",".join(f"c{k}" for k in range(19))]
            for i in _samples(split):
                s1 = f"S1A_IW_GRDH_1SDV_{i}_20170613T165043.tif"
                s2 = f"S2A_MSIL2A_{i}_20170613T101031.tif"
                write_tif(
                    folder / "BigEarthNet-S1-5%" / s1,
                    coded_image(rng, ("VV", "VH"), i % 2, size, "float32"),
                )
                write_tif(
                    folder / "BigEarthNet-S2-5%" / s2,
                    coded_image(rng, S2_12, i % 2, size, "uint16"),
                )
                labels = [0] * 19
                labels[9 if i % 2 else 18] = 1
                lines.append(f"{s1},{s2}," + ",".join(map(str, labels)))
            (folder / f"multilabel-{split}.csv").write_text("\n".join(lines) + "\n")
    elif task in ("cloud_s2", "dfc2020_s1", "dfc2020_s2"):
        folder = base / ("cloud_s2" if task == "cloud_s2" else "dfc2020_s1s2")
        for split in SPLIT_SIZES:
            names = []
            for i in _samples(split):
                mask = np.full((1, size, size), 2, dtype=np.uint8)
                mask[..., : size // 2] = 1
                if task == "cloud_s2":
                    name = f"ROI_{i:05d}__20200101T000000"
                    write_tif(
                        folder / "s2_toa" / f"{name}.tif",
                        coded_image(rng, S2_13, 0, size, "uint16"),
                    )
                    write_tif(folder / "cloud" / f"{name}.tif", mask)
                    names.append(name)
                else:
                    name = f"ROIs0000_test_dfc_0_p{i}.tif"
                    s1 = coded_image(rng, ("VV", "VH"), 0, size, "float32")
                    write_tif(folder / "s1" / name.replace("dfc", "s1"), s1)
                    s2 = coded_image(rng, S2_13, 0, size, "uint16")
                    write_tif(folder / "s2" / name.replace("dfc", "s2"), s2)
                    write_tif(folder / "dfc" / name, mask)
                    names.append(name)
            csv = f"{split}.csv" if task == "cloud_s2" else f"dfc-{split}-new.csv"
            (folder / csv).write_text("\n".join(names) + "\n")
    elif task == "lcz_s2":
        base.mkdir(parents=True, exist_ok=True)
        for split in SPLIT_SIZES:
            idx = _samples(split)
            # So2Sat LCZ42 stores reflectance / 10000, channels last.
            sen2 = np.stack([coded_image(rng, LCZ_10, i % 2, size, "float32") for i in idx]) / 1e4
            label = np.eye(17, dtype=np.float32)[[i % 2 for i in idx]]
            with h5py.File(base / f"lcz_{split}.h5", "w") as f:
                f.create_dataset("sen2", data=np.moveaxis(sen2, 1, -1))
                f.create_dataset("label", data=label)
    elif task == "flood_s1":
        folder = base / "flood_s1"
        for split in SPLIT_SIZES:
            grid = {}
            for i in _samples(split):
                path = f"{i}/{i:04d}"
                chip = folder / "data" / path
                mask = np.full((1, size, size), 2, dtype=np.uint8)
                mask[..., : size // 2] = 1
                write_tif(chip / "MK0_MLU_0000000000_20200101.tif", mask)
                for ptype, shift in (("SL1", 0), ("MS1", 1)):  # pre-event, post-event
                    for band in ("VV", "VH"):
                        image = coded_image(rng, (band,), shift, size, "float32")
                        write_tif(
                            chip / f"{ptype}_I{band}_0000000000_2020010{1 + shift}.tif", image
                        )
                grid[f"{i}"] = {"path": path}
            (folder / f"grid_dict_{split}.json").write_text(json.dumps(grid))
    else:
        raise ValueError(task)
    return root


L4S_14 = S2_13[:8] + ("B09", "B10", "B11", "B12", "SLOPE", "DEM")


def write_landslide4sense(root: Path, layout: str = "official", size: int = 16) -> Path:
    """Landslide4Sense HDF5 patches (``img`` HxWx14, ``mask`` HxW) in either published layout."""
    rng = np.random.default_rng(8)
    folders = {
        "official": {s: (f"{d}/img", f"{d}/mask") for s, d in
                     (("train", "TrainData"), ("val", "ValidData"), ("test", "TestData"))},
        "huggingface": {s: (f"images/{d}", f"annotations/{d}") for s, d in
                        (("train", "train"), ("val", "validation"), ("test", "test"))},
    }[layout]  # fmt: skip
    for split, (img_dir, mask_dir) in folders.items():
        for n in range(1, SPLIT_SIZES[split] + 1):
            (root / img_dir).mkdir(parents=True, exist_ok=True)
            (root / mask_dir).mkdir(parents=True, exist_ok=True)
            image = coded_image(rng, L4S_14, 0, size, "float32")
            mask = np.zeros((size, size), dtype=np.uint8)
            mask[: size // 2] = 1
            with h5py.File(root / img_dir / f"image_{n}.h5", "w") as f:
                f.create_dataset("img", data=np.moveaxis(image, 0, -1))
            with h5py.File(root / mask_dir / f"mask_{n}.h5", "w") as f:
                f.create_dataset("mask", data=mask)
    return root
