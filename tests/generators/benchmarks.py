"""Writers of tiny downstream datasets in their real on-disk formats (class-separable data)."""

from __future__ import annotations

import contextlib
import json
import pickle
import sys
import types
from collections.abc import Iterator, Sequence
from pathlib import Path

import h5py
import numpy as np
import rasterio
import torch
from rasterio.transform import from_origin

from terrafm_lightning.eval.datasets.bigearthnet import CORINE_TO_BEN19
from terrafm_lightning.eval.datasets.eurosat import EUROSAT_CLASSES
from terrafm_lightning.modalities import BANDS
from terrafm_lightning.models import terrafm_tiny


def write_tif(path: Path, data: np.ndarray, nodata: float | None = None) -> Path:
    """Write (C, H, W) as a GeoTIFF in UTM 33N with 10 m pixels (scaled to 120 px extent)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    count, height, width = data.shape
    transform = from_origin(400000, 5340000, 1200 / width, 1200 / height)
    with rasterio.open(
        path, "w", driver="GTiff", count=count, height=height, width=width, dtype=data.dtype,
        crs="EPSG:32633", transform=transform, nodata=nodata,
    ) as dst:  # fmt: skip
        dst.write(data)
    return path


def class_image(
    rng: np.random.Generator, label: int, bands: int, size: int, sar: bool
) -> np.ndarray:
    """A noisy image whose per-band level encodes ``label``."""
    if sar:
        base = np.array([-12.0, -19.0])[:, None, None] + 2.0 * label
        return (base + rng.normal(0, 0.5, (bands, size, size))).astype(np.float32)
    base = 800 + 250 * label + 40 * np.arange(bands)[:, None, None]
    return (base + rng.normal(0, 30, (bands, size, size))).clip(1).astype(np.uint16)


def write_eurosat(
    root: Path, per_class: int = 3, size: int = 32, sar: bool = False, split_files: bool = True
) -> Path:
    """EuroSAT-MS (13 bands) or EuroSAT-SAR (VV, VH) class folders plus split files."""
    rng = np.random.default_rng(0)
    bands = 2 if sar else 13
    names = []
    for label, cls in enumerate(EUROSAT_CLASSES):
        for i in range(per_class):
            write_tif(root / cls / f"{cls}_{i + 1}.tif", class_image(rng, label, bands, size, sar))
            names.append((i, f"{cls}_{i + 1}"))
    if split_files:
        prefix = "eurosat-sar" if sar else "eurosat"
        # Official files list .jpg names (torchgeo convention): matched by stem.
        for split, pick in (
            ("train", lambda i: i < per_class - 1),
            ("val", lambda i: i == per_class - 1),
            ("test", lambda i: i == per_class - 1),
        ):
            lines = [f"{n}.jpg" for i, n in names if pick(i)]
            (root / f"{prefix}-{split}.txt").write_text("\n".join(lines) + "\n")
    return root


BEN_LABEL_SETS = [
    ["Coniferous forest", "Mixed forest"],
    ["Sea and ocean"],
    ["Non-irrigated arable land", "Airports"],
    ["Coniferous forest", "Transitional woodland/shrub"],
    ["Sea and ocean", "Estuaries"],
    ["Non-irrigated arable land", "Pastures"],
]


def write_bigearthnet(root: Path, n: int = 6, s1: bool = True) -> Path:
    """BigEarthNet v1 S2 (120/60/20 px bands) and S1 patch folders with label metadata."""
    rng = np.random.default_rng(1)
    resolution = {b: 120 for b in ("B02", "B03", "B04", "B08")} | {b: 20 for b in ("B01", "B09")}
    for i in range(n):
        labels = BEN_LABEL_SETS[i % len(BEN_LABEL_SETS)]
        assert all(name in CORINE_TO_BEN19 for name in labels)
        level = BEN_LABEL_SETS.index(labels)
        s2 = f"S2A_MSIL2A_20170613T101031_{i}_{i}"
        folder = root / "BigEarthNet-v1.0" / s2
        for band in BANDS["s2_l2a"]:
            size = resolution.get(band, 60)
            write_tif(folder / f"{s2}_{band}.tif", class_image(rng, level, 1, size, False))
        meta = {"labels": labels, "tile_source": "synthetic"}
        (folder / f"{s2}_labels_metadata.json").write_text(json.dumps(meta))
        if s1:
            name = f"S1A_IW_GRDH_1SDV_20170613T165043_33UUP_{i}_{i}"
            folder = root / "BigEarthNet-S1-v1.0" / name
            image = class_image(rng, level, 2, 120, True)
            write_tif(folder / f"{name}_VV.tif", image[:1])
            write_tif(folder / f"{name}_VH.tif", image[1:])
            meta = {"labels": labels, "corresponding_s2_patch": s2}
            (folder / f"{name}_labels_metadata.json").write_text(json.dumps(meta))
    return root


GEOBENCH_S2_NAMES = [
    "01 - Coastal aerosol", "02 - Blue", "03 - Green", "04 - Red", "05 - Vegetation Red Edge",
    "06 - Vegetation Red Edge", "07 - Vegetation Red Edge", "08 - NIR",
    "08A - Vegetation Red Edge", "09 - Water vapour", "10 - SWIR - Cirrus", "11 - SWIR",
    "12 - SWIR",
]  # fmt: skip


@contextlib.contextmanager
def _fake_geobench_module() -> Iterator[types.ModuleType]:
    """Register ``ccb.io.dataset`` with the band classes so pickles reference them by name."""
    module = types.ModuleType("ccb.io.dataset")
    for name in ("Sentinel1", "Sentinel2"):
        cls = type(name, (), {"__module__": "ccb.io.dataset"})
        setattr(module, name, cls)
    parents = {"ccb": types.ModuleType("ccb"), "ccb.io": types.ModuleType("ccb.io")}
    sys.modules.update(parents | {"ccb.io.dataset": module})
    try:
        yield module
    finally:
        for name in ("ccb", "ccb.io", "ccb.io.dataset"):
            sys.modules.pop(name, None)


def write_geobench(
    root: Path,
    n: int = 8,
    size: int = 32,
    task: str = "classification",
    band_names: Sequence[str] = GEOBENCH_S2_NAMES,
    num_classes: int = 2,
    extra_s1: bool = False,
) -> Path:
    """GEO-Bench v1 HDF5 samples (``classification``, ``multilabel`` or ``segmentation``)."""
    rng = np.random.default_rng(2)
    root.mkdir(parents=True, exist_ok=True)
    names = [f"sample_{i}" for i in range(n)]
    with _fake_geobench_module() as module:
        for i, name in enumerate(names):
            label_id = i % num_classes
            image = class_image(rng, label_id, len(band_names), size, False).astype(np.float64)
            meta = {}
            with h5py.File(root / f"{name}.hdf5", "w") as f:
                for b, band in enumerate(band_names):
                    f.create_dataset(band, data=image[b])
                    info = module.Sentinel2()
                    info.name = band
                    meta[band] = {"band_info": info, "date": None}
                if extra_s1:
                    f.create_dataset("01 - VH.Real", data=rng.normal(size=(size, size)))
                    info = module.Sentinel1()
                    meta["01 - VH.Real"] = {"band_info": info}
                if task == "segmentation":
                    label = np.full((size, size), label_id, dtype=np.int64)
                    label[: size // 4] = 1 - label_id
                    f.create_dataset("label", data=label)
                elif task == "multilabel":
                    meta["label"] = np.eye(num_classes, dtype=np.int64)[label_id]
                else:
                    meta["label"] = label_id
                f.attrs["pickle"] = str(pickle.dumps(meta))
    partition = {
        "train": names[: n // 2],
        "valid": names[n // 2 : 3 * n // 4],
        "test": names[3 * n // 4 :],
    }
    (root / "default_partition.json").write_text(json.dumps(partition))
    (root / "band_stats.json").write_text(
        json.dumps({b: {"mean": 1.0, "std": 1.0} for b in band_names})
    )
    return root


def write_sen1floods11(root: Path, n: int = 5, size: int = 32, split_files: bool = True) -> Path:
    """Sen1Floods11 S1Hand (dB, NaN nodata), S2Hand (13 bands), LabelHand (-1 = no data)."""
    rng = np.random.default_rng(3)
    chips = [f"Ghana_{100 + i}" for i in range(n)]
    for chip in chips:
        water = np.zeros((size, size), dtype=np.int16)
        water[:, : size // 2] = 1
        label = water.copy()
        label[-2:] = -1
        s1 = np.where(water, -22.0, -8.0)[None].repeat(2, 0) + rng.normal(0, 0.5, (2, size, size))
        s1 = s1.astype(np.float32)
        s1[:, 0, 0] = np.nan
        s2 = np.where(water, 300, 2500)[None].repeat(13, 0) + rng.integers(0, 50, (13, size, size))
        write_tif(root / "S1Hand" / f"{chip}_S1Hand.tif", s1, nodata=np.nan)
        write_tif(root / "S2Hand" / f"{chip}_S2Hand.tif", s2.astype(np.uint16))
        write_tif(root / "LabelHand" / f"{chip}_LabelHand.tif", label[None], nodata=-1)
    if split_files:
        parts = {"train": chips[:3], "valid": chips[3:4], "test": chips[4:]}
        (root / "splits").mkdir(exist_ok=True)
        for split, names in parts.items():
            rows = [f"{c}_S1Hand.tif,{c}_LabelHand.tif" for c in names]
            (root / "splits" / f"flood_{split}_data.csv").write_text("\n".join(rows) + "\n")
    return root


def pretraining_checkpoint(path, drop_path_rate=0.1):
    """A checkpoint in the TerraFMPretrainModule layout of docs/contracts.md."""
    teacher, student = terrafm_tiny(depth=2), terrafm_tiny(depth=2)
    state = {f"teacher.backbone.{k}": v for k, v in teacher.state_dict().items()}
    state |= {f"student.backbone.{k}": v for k, v in student.state_dict().items()}
    state |= {"teacher.head.last.weight": torch.zeros(4, 4), "center": torch.zeros(1, 4)}
    hparams = {
        "backbone": "terrafm_tiny",
        "backbone_kwargs": {"depth": 2, "drop_path_rate": drop_path_rate},
    }
    torch.save({"state_dict": state, "hyper_parameters": hparams, "epoch": 3}, path)
    return teacher, student
