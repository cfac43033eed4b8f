"""Raster helpers shared by the sources: read (with band selection), alignment, tiling.

Alignment is rioxarray's ``reproject`` (GDAL warp); the rest is array bookkeeping no library
offers in this form (cutting a cell into row-major tiles with their affines).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import rasterio
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
from rasterio.crs import CRS
from rasterio.warp import Resampling

from terrafm_lightning.bands import BandError, documented_orders, file_bands, stem_indices
from terrafm_lightning.modalities import BANDS
from terrafm_lightning.prep.errors import InputError

GDAL_READ_OPTIONS = {"GTIFF_VIRTUAL_MEM_IO": True}
"""GDAL settings of every GeoTIFF read: uncompressed data is read through a memory mapping, past
GDAL's block cache (measured per read: a 1068 px uint16 band from memory 0.4-0.5 against
1.4 ms, a 12-band pixel-interleaved 1068 px file 31 against 37-46 ms; compressed files are read
as without it)."""


def band_indexes(modality: str, descriptions: Sequence[str | None], source: str) -> list[int]:
    """1-based bands of a raster to read for ``modality``, in stem band order, matched by name.

    Names come from the band descriptions, else from the documented order of the band count
    (:func:`~terrafm_lightning.bands.file_bands`); bands the stem does not take (B10) are not
    read.

    Raises:
        InputError: naming ``source`` when the bands do not fit the modality.
    """
    orders, count = documented_orders(modality), len(descriptions)
    if count not in orders and not all(descriptions):
        allowed = " or ".join(map(str, orders))
        raise InputError(f"{source} has {count} bands; {modality} needs {allowed}")
    try:
        names = file_bands(descriptions, orders.get(count, ()), source)
        indices = stem_indices(names, modality, source)
    except BandError as err:
        raise InputError(f"{source}: {err}") from err
    missing = [b for b, i in zip(BANDS[modality], indices, strict=True) if i is None]
    if missing:
        raise InputError(f"{source}: no {modality} bands {missing} among its bands {names}")
    return [i + 1 for i in indices]


def align(
    pixels: np.ndarray,
    crs: CRS,
    transform: rasterio.Affine,
    dst_crs: CRS,
    dst_transform: rasterio.Affine,
    shape: tuple[int, int],
    nodata: float,
) -> np.ndarray:
    """Reproject (nearest) ``pixels`` (band, y, x) onto a destination grid unless it already is.

    Nearest keeps stored values equal to source values.
    """
    if crs == dst_crs and transform.almost_equals(dst_transform) and pixels.shape[1:] == shape:
        return pixels
    source = (
        xr.DataArray(pixels, dims=("band", "y", "x"))
        .rio.write_crs(crs)
        .rio.write_transform(transform)
        .rio.write_nodata(nodata, encoded=False)
    )
    warped = source.rio.reproject(
        dst_crs, shape=shape, transform=dst_transform, resampling=Resampling.nearest
    )
    return np.ascontiguousarray(warped.values)


def tile_window(tile_index: int, tiles_per_side: int, size: int) -> tuple[slice, slice]:
    """Row-major (rows, cols) slices of tile ``tile_index`` in a cut raster."""
    row, col = divmod(tile_index, tiles_per_side)
    return slice(row * size, (row + 1) * size), slice(col * size, (col + 1) * size)


def tile_transform(
    transform: rasterio.Affine, tile_index: int, tiles_per_side: int, size: int
) -> tuple[float, ...]:
    """Affine (a, b, c, d, e, f) of a tile cut from a raster with ``transform``."""
    rows, cols = tile_window(tile_index, tiles_per_side, size)
    shifted = transform @ rasterio.Affine.translation(cols.start, rows.start)
    return tuple(shifted)[:6]


def read_geotiff(
    path: Path, modality: str
) -> tuple[np.ndarray, CRS, rasterio.Affine, float | None, dict]:
    """Read the bands of ``modality`` (not B10), CRS, transform, nodata, tags; errors name the file.

    Reading only the wanted bands avoids decoding B10 and copying the other twelve afterwards.
    The file is read whole and decoded from memory: GDAL's memory-mapped reads of the file were
    faster in one process but scaled 1.16x from 1 to 2 dask workers, against 1.7x from memory
    (``benchmarks/prep.py``, 2 cores).
    """
    try:
        content = path.read_bytes()
    except OSError as err:
        raise InputError(f"cannot read {path}: {err}") from err
    if not content:  # rasterio's MemoryFile would fail with a TypeError naming no file
        raise InputError(f"cannot read {path}: the file is empty (0 bytes)")
    try:
        with (
            rasterio.Env(**GDAL_READ_OPTIONS),
            rasterio.MemoryFile(content) as memory,
            memory.open(driver="GTiff") as src,
        ):
            bands = band_indexes(modality, src.descriptions, str(path))
            return src.read(bands), src.crs, src.transform, src.nodata, src.tags()
    except (OSError, rasterio.errors.RasterioError) as err:
        raise InputError(f"cannot read {path}: {err}") from err
