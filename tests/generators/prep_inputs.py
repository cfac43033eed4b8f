"""Bad ``terrafm-data`` inputs made from the real TerraMind samples: other units, other places.

Each function rewrites (or replaces) files of a copy made by
:func:`tests.generators.stores.copy_terramind`; the real files themselves are never touched.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import rasterio
import zarr


def rewrite_geotiff(path: Path, convert: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Rewrite ``path`` as ``convert(pixels)`` on the same grid; returns the old pixels.

    The dtype follows the converted array; the nodata value is kept.
    """
    with rasterio.open(path) as src:
        profile, pixels = src.profile, src.read()
    new = convert(pixels)
    profile.update(dtype=new.dtype.name)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(new)
    return pixels


def as_reflectance(path: Path) -> np.ndarray:
    """S2 DN -> float32 reflectance (DN / 10000), as many L2A exports ship it."""
    return rewrite_geotiff(path, lambda dn: (dn / 10000).astype(np.float32))


def as_linear_power(path: Path) -> np.ndarray:
    """S1 dB -> float32 linear power (10 ** (dB / 10))."""
    return rewrite_geotiff(path, lambda db: (10 ** (db / 10)).astype(np.float32))


def as_integer_s1(path: Path) -> np.ndarray:
    """S1 dB -> int16 hundredths of dB (an integer product)."""
    return rewrite_geotiff(path, lambda db: np.round(db * 100).astype(np.int16))


def all_zero(path: Path) -> np.ndarray:
    """Every pixel 0 (S2 nodata), as a tile outside the swath."""
    return rewrite_geotiff(path, np.zeros_like)


def swap_in_other_location(folder: Path, stem: str, other: str) -> None:
    """``folder/<stem>.tif`` replaced by ``<other>``'s file: another location's data, other grid."""
    shutil.copy(folder / f"{other}.tif", folder / f"{stem}.tif")


def foreign_zarr(path: Path) -> np.ndarray:
    """A plain Zarr v3 group with one array, as another tool writes; returns the array's values."""
    values = np.arange(6, dtype="int32")
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.attrs["made_by"] = "another tool"
    group.create_array("data", shape=values.shape, dtype=values.dtype)[:] = values
    return values
