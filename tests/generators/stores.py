"""Small stores, and GeoTIFF inputs for them, written in-process for tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import rasterio

from terrafm_lightning.prep.sources.synthetic import prepare_synthetic
from terrafm_lightning.store.schema import Encoding

TERRAMIND_FOLDERS = ("S1RTC", "S2L1C", "S2L2A")


def make_synthetic_store(
    path: Path,
    n_samples: int = 32,
    tile_size: int = 64,
    seed: int = 0,
    samples_per_shard: int = 4,
    codec: str = "blosc",
    chunk_checksum: bool = True,
) -> Path:
    """Write a small synthetic store in-process (no dask; ~20 ms per 64 px tile) and return it.

    ``chunk_checksum=False`` writes it as stores were written before chunk checksums.
    """
    prepare_synthetic(
        str(path),
        n_samples,
        tile_size,
        seed,
        encoding=Encoding(
            samples_per_shard=samples_per_shard, codec=codec, chunk_checksum=chunk_checksum
        ),
        overwrite=True,
        scheduler="sync",
        progress=False,
    )
    return path


def write_tif(
    path: Path, pixels: np.ndarray, crs: str, transform: rasterio.Affine, nodata: float | None
) -> None:
    """A plain GeoTIFF of ``pixels`` (band, y, x), creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {"driver": "GTiff", "count": pixels.shape[0], "dtype": pixels.dtype.name}
    with rasterio.open(
        path, "w", **profile, height=pixels.shape[1], width=pixels.shape[2], crs=crs,
        transform=transform, nodata=nodata,
    ) as f:  # fmt: skip
        f.write(pixels)


def copy_terramind(src: Path, dst: Path, folders: tuple[str, ...] = TERRAMIND_FOLDERS) -> Path:
    """The real TerraMind example folders copied to ``dst`` (to damage or rename in a test)."""
    for folder in folders:
        shutil.copytree(src / folder, dst / folder)
    return dst


def write_sen12ms_layout(src: Path, dst: Path) -> dict[str, str]:
    """The real TerraMind S1 / S2 L1C files under SEN12MS names and folders.

    SEN12MS: ``ROIs1158_spring_s1/s1_1/ROIs1158_spring_s1_1_p<k>.tif`` beside
    ``ROIs1158_spring_s2/s2_1/ROIs1158_spring_s2_1_p<k>.tif``: the stems differ (``s1`` / ``s2``
    in the middle), so only a ``--match`` pattern pairs them. Returns patch key -> source stem.
    """
    stems = sorted(p.stem for p in (src / "S2L1C").glob("*.tif"))
    keys = {}
    for k, stem in enumerate(stems, start=1):
        for folder, sensor in (("S1RTC", "s1"), ("S2L1C", "s2")):
            target = dst / f"ROIs1158_spring_{sensor}" / f"{sensor}_1"
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(
                src / folder / f"{stem}.tif", target / f"ROIs1158_spring_{sensor}_1_p{k}.tif"
            )
        keys[f"ROIs1158_spring_1_p{k}"] = stem
    return keys
