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

from terrafm_lightning.eval.datasets.bigearthnet import BEN19_CLASSES, CORINE_TO_BEN19
from terrafm_lightning.eval.datasets.eurosat import EUROSAT_CLASSES
from terrafm_lightning.modalities import BANDS
from terrafm_lightning.models import terrafm_tiny

BAND_CODE = {
    b: 500 + 100 * i
    for i, b in enumerate(("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09"))
} | {"B10": 1500, "B11": 1600, "B12": 1700, "VV": -10, "VH": -25, "SLOPE": 1800, "DEM": 1900}
"""A distinct value per band name: band order is checked by content (code + step * label)."""


def label_step(band: str) -> float:
    """How much a band's value rises per class index (2 dB for S1, 300 DN otherwise)."""
    return 2.0 if band in ("VV", "VH") else 300.0


EUROSAT_FILE_BANDS = (
    "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A",
)  # fmt: skip
"""EuroSAT-MS GeoTIFF band order as published (B8A last), written independently of the reader."""
SEN1FLOODS11_S2 = (
    "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12",
)  # fmt: skip
"""Sen1Floods11 S2Hand band order as documented (B8A after B08), independent of the reader."""
EUROSAT_CLASS_ROOTS = {
    "torchgeo": "ds/images/remote_sensing/otherDatasets/sentinel_2/tif",
    "zenodo": "EuroSAT_MS",
    "flat": ".",
    "sar": "all_imgs",
}


def coded_image(
    rng: np.random.Generator, bands: Sequence[str], label: int, size: int, dtype: str
) -> np.ndarray:
    """(C, H, W): band b holds ``BAND_CODE[b] + label_step(b) * label`` plus noise (std 0.3)."""
    codes = np.array([BAND_CODE[b] + label_step(b) * label for b in bands], dtype=np.float64)
    image = codes[:, None, None] + rng.normal(0, 0.3, (len(bands), size, size))
    return image.round().astype(dtype) if dtype.startswith("uint") else image.astype(dtype)


def assert_band_codes(image: torch.Tensor, stem_bands: Sequence[str], label: int) -> None:
    """Every stem channel of an identity-normalised (C, H, W) image holds its band's code."""
    got = image.float().mean(dim=(-2, -1))
    want = torch.tensor([BAND_CODE[b] + label_step(b) * label for b in stem_bands])
    assert torch.allclose(got, want, atol=1.0), dict(zip(stem_bands, got.tolist(), strict=True))


def identity_stats(*modalities: str) -> dict[str, dict[str, list[float]]]:
    """Normalisation statistics that leave values unchanged (for band-order checks)."""
    return {m: {"mean": [0.0] * len(BANDS[m]), "std": [1.0] * len(BANDS[m])} for m in modalities}


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
    root: Path,
    per_class: int = 3,
    size: int = 32,
    sar: bool = False,
    split_files: bool = True,
    layout: str = "flat",
) -> Path:
    """EuroSAT-MS (13 bands, B8A last) or EuroSAT-SAR (VV, VH) class folders plus split files.

    ``layout``: ``torchgeo`` (``ds/images/...`` as ``EuroSAT(download=True)`` leaves it),
    ``zenodo`` (``EuroSAT_MS/``), ``flat`` (class folders in ``root``) or ``sar``
    (``all_imgs/``, EuroSAT-SAR / Copernicus-Bench). Bands are content-coded (:data:`BAND_CODE`).
    """
    rng = np.random.default_rng(0)
    bands = BANDS["s1"] if sar else EUROSAT_FILE_BANDS
    images = root / EUROSAT_CLASS_ROOTS[layout]
    names = []
    for label, cls in enumerate(EUROSAT_CLASSES):
        for i in range(per_class):
            image = coded_image(rng, bands, label, size, "float32" if sar else "uint16")
            write_tif(images / cls / f"{cls}_{i + 1}.tif", image)
            names.append((i, f"{cls}_{i + 1}"))
    if split_files:
        # Official files list .jpg names (torchgeo convention): matched by stem.
        for split, pick in (
            ("train", lambda i: i < per_class - 1),
            ("val", lambda i: i == per_class - 1),
            ("test", lambda i: i == per_class - 1),
        ):
            lines = [f"{n}.jpg" for i, n in names if pick(i)]
            (root / f"eurosat-{split}.txt").write_text("\n".join(lines) + "\n")
    return root


BEN_LABEL_SETS = [
    ["Coniferous forest", "Mixed forest"],
    ["Sea and ocean"],
    ["Non-irrigated arable land", "Airports"],
    ["Coniferous forest", "Transitional woodland/shrub"],
    ["Sea and ocean", "Estuaries"],
    ["Non-irrigated arable land", "Pastures"],
]


def write_bigearthnet(
    root: Path, n: int = 6, s1: bool = True, split_files: str | None = None
) -> Path:
    """BigEarthNet v1 S2 (120/60/20 px bands) and S1 patch folders with label metadata.

    ``split_files``: ``torchgeo`` (``bigearthnet-{split}.csv``, ``s2,s1`` rows), ``official``
    (``{split}.csv``, S2 names) or None. Patches 0..n-3 train, n-2 val, n-1 test.
    """
    pairs = []
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
            pairs.append(f"{s2},{name}")
        else:
            pairs.append(s2)
    parts = {"train": pairs[:-2], "val": pairs[-2:-1], "test": pairs[-1:]}
    for split, rows in parts.items():
        if split_files == "torchgeo":
            (root / f"bigearthnet-{split}.csv").write_text("\n".join(rows) + "\n")
        elif split_files == "official":
            (root / f"{split}.csv").write_text("\n".join(r.split(",")[0] for r in rows) + "\n")
    return root


def write_bigearthnet_v2(root: Path, n: int = 6) -> Path:
    """BigEarthNet v2 (reBEN) as torchgeo's ``BigEarthNetV2`` reads it; bands content-coded.

    ``metadata.parquet`` (patch_id, labels as 19-class names, split, s1_name),
    ``BigEarthNet-S2/<tile>/<patch>/<patch>_<band>.tif``, ``BigEarthNet-S1/<tile>/<s1>/
    <s1>_{VV,VH}.tif``, ``Reference_Maps/<tile>/<patch>/<patch>_reference_map.tif``.
    """
    import pandas as pd

    rng = np.random.default_rng(5)
    rows = []
    splits = ["train"] * (n - 2) + ["validation", "test"]
    for i in range(n):
        tile = "S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP"
        patch = f"{tile}_{i}_{i}"
        s1_tile = "S1A_IW_GRDH_1SDV_20170613T165043_33UUP"
        s1 = f"{s1_tile}_{i}_{i}_X"  # torchgeo drops the last 3 fields for the S1 tile folder
        s1_dir = "_".join(s1.split("_")[:-3])
        label = i % 2
        for band in BANDS["s2_l2a"]:
            image = coded_image(rng, [band], label, 120 if band in ("B02", "B03") else 60, "uint16")
            write_tif(root / "BigEarthNet-S2" / tile / patch / f"{patch}_{band}.tif", image)
        for band in ("VV", "VH"):
            image = coded_image(rng, [band], label, 120, "float32")
            write_tif(root / "BigEarthNet-S1" / s1_dir / s1 / f"{s1}_{band}.tif", image)
        clc = np.full((1, 120, 120), 312 if label else 523, dtype=np.uint16)
        write_tif(root / "Reference_Maps" / tile / patch / f"{patch}_reference_map.tif", clc)
        labels = [BEN19_CLASSES[9]] if label else [BEN19_CLASSES[18], BEN19_CLASSES[17]]
        rows.append({"patch_id": patch, "labels": labels, "split": splits[i], "s1_name": s1})
    pd.DataFrame(rows).to_parquet(root / "metadata.parquet")
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
    georeferenced: bool = False,
    content_bands: Sequence[str] | None = None,
    partition: bool = True,
) -> Path:
    """GEO-Bench v1 HDF5 samples (``classification``, ``multilabel`` or ``segmentation``).

    ``georeferenced`` pickles an ``affine.Affine`` transform and a ``rasterio.crs.CRS`` per
    band, as geo-bench's writer does for tasks such as m-cashew-plant. ``content_bands``
    content-codes the bands (:data:`BAND_CODE`): band i holds ``content_bands[i]``'s code.
    ``partition=False`` leaves out ``default_partition.json`` (a task folder that cannot run).
    """
    import affine
    from rasterio.crs import CRS

    rng = np.random.default_rng(2)
    root.mkdir(parents=True, exist_ok=True)
    names = [f"sample_{i}" for i in range(n)]
    with _fake_geobench_module() as module:
        for i, name in enumerate(names):
            label_id = i % num_classes
            if content_bands is None:
                image = class_image(rng, label_id, len(band_names), size, False)
            else:
                image = coded_image(rng, content_bands, label_id, size, "uint16")
            image = image.astype(np.float64)
            meta = {}
            with h5py.File(root / f"{name}.hdf5", "w") as f:
                for b, band in enumerate(band_names):
                    f.create_dataset(band, data=image[b])
                    info = module.Sentinel2()
                    info.name = band
                    meta[band] = {"band_info": info, "date": None}
                    if georeferenced:
                        meta[band]["transform"] = affine.Affine(10, 0, 4e5, 0, -10, 5.3e6)
                        meta[band]["crs"] = CRS.from_epsg(32633)
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
    splits = {
        "train": names[: n // 2],
        "valid": names[n // 2 : 3 * n // 4],
        "test": names[3 * n // 4 :],
    }
    if partition:
        (root / "default_partition.json").write_text(json.dumps(splits))
    (root / "band_stats.json").write_text(
        json.dumps({b: {"mean": 1.0, "std": 1.0} for b in band_names})
    )
    return root


def replace_geobench_pickle(path: Path, metadata: object) -> Path:
    """Replace a GEO-Bench sample's pickled metadata with ``metadata`` (bad-input cases)."""
    with h5py.File(path, "r+") as f:
        f.attrs["pickle"] = str(pickle.dumps(metadata))
    return path


def truncated_copy(source: Path, path: Path, keep: float = 0.5) -> Path:
    """The first ``keep`` fraction of ``source``'s bytes (an interrupted download or copy)."""
    data = Path(source).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep)])
    return Path(path)


def write_sen1floods11(
    root: Path, n: int = 5, size: int = 32, split_files: bool = True, bucket: bool = False
) -> Path:
    """Sen1Floods11 S1Hand (dB, NaN nodata), S2Hand (13 bands), LabelHand (-1 = no data).

    ``bucket``: the official ``gs://sen1floods11`` layout (``v1.1/data/flood_events/HandLabeled``
    and ``v1.1/splits/flood_handlabeled``); else the chip folders and ``splits/`` in ``root``.
    """
    rng = np.random.default_rng(3)
    splits_dir = root / "v1.1" / "splits" / "flood_handlabeled" if bucket else root / "splits"
    top = root
    if bucket:
        root = root / "v1.1" / "data" / "flood_events" / "HandLabeled"
    chips = [f"Ghana_{100 + i}" for i in range(n)]
    for chip in chips:
        water = np.zeros((size, size), dtype=np.int16)
        water[:, : size // 2] = 1
        label = water.copy()
        label[-2:] = -1
        s1 = np.where(water, -22.0, -8.0)[None].repeat(2, 0) + rng.normal(0, 0.5, (2, size, size))
        s1 = s1.astype(np.float32)
        s1[:, 0, 0] = np.nan
        # S2Hand: content-coded bands in the documented order, + label_step on non-water pixels.
        s2 = coded_image(rng, SEN1FLOODS11_S2, 0, size, "float32")
        s2 = (s2 + np.where(water, 0, label_step("B01"))).astype(np.uint16)
        write_tif(root / "S1Hand" / f"{chip}_S1Hand.tif", s1, nodata=np.nan)
        write_tif(root / "S2Hand" / f"{chip}_S2Hand.tif", s2.astype(np.uint16))
        write_tif(root / "LabelHand" / f"{chip}_LabelHand.tif", label[None], nodata=-1)
    if split_files:
        parts = {"train": chips[:3], "valid": chips[3:4], "test": chips[4:]}
        splits_dir.mkdir(parents=True, exist_ok=True)
        for split, names in parts.items():
            rows = [f"{c}_S1Hand.tif,{c}_LabelHand.tif" for c in names]
            (splits_dir / f"flood_{split}_data.csv").write_text("\n".join(rows) + "\n")
    return top


def write_segmentation_folders(
    root: Path,
    n: int = 2,
    size: int = 32,
    classes: int = 3,
    splits: Sequence[str] = ("train", "val"),
) -> Path:
    """Image / mask GeoTIFF pairs for terratorch's ``GenericNonGeoSegmentationDataModule``.

    ``root/<split>/images/chip_<i>_img.tif``: the 12 S2 L2A bands (uint16, content-coded, + the
    class's ``label_step`` per pixel); ``root/<split>/masks/chip_<i>_mask.tif``: the class index
    (uint8), ``classes`` vertical stripes.
    """
    rng = np.random.default_rng(5)
    mask = (np.arange(size) * classes // size)[None, :].repeat(size, 0).astype(np.uint8)
    for split in splits:
        for i in range(n):
            image = coded_image(rng, BANDS["s2_l2a"], 0, size, "float32")
            image = (image + label_step("B01") * mask).astype(np.uint16)
            write_tif(root / split / "images" / f"chip_{i}_img.tif", image)
            write_tif(root / split / "masks" / f"chip_{i}_mask.tif", mask[None])
    return root


def pretraining_checkpoint(path, drop_path_rate=0.1, seed=None):
    """A checkpoint in the TerraFMPretrainModule layout of docs/contracts.md.

    ``seed`` draws the weights from a seeded RNG (same seed, same weights).
    """
    if seed is not None:
        torch.manual_seed(seed)
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
