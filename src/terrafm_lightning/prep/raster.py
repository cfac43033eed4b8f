"""Raster helpers shared by the sources: read (with band selection), alignment, tiling.

Alignment is rioxarray's ``reproject`` (GDAL warp); the rest is array bookkeeping no library
offers in this form (cutting a cell into row-major tiles with their affines).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
from rasterio.crs import CRS
from rasterio.warp import Resampling

from terrafm_lightning.modalities import BANDS, S2_L1C_ALL_BANDS
from terrafm_lightning.prep.errors import InputError

_L1C_WITHOUT_B10 = [i + 1 for i, b in enumerate(S2_L1C_ALL_BANDS) if b != "B10"]
GDAL_READ_OPTIONS = {"GTIFF_VIRTUAL_MEM_IO": True}
"""GDAL settings of every GeoTIFF read: uncompressed data is read through a memory mapping, past
GDAL's block cache (measured per read: a 1068 px uint16 band from memory 0.4-0.5 against
1.4 ms, a 12-band pixel-interleaved 1068 px file 31 against 37-46 ms; compressed files are read
as without it)."""


def band_indexes(modality: str, count: int, source: str) -> list[int]:
    """1-based bands of a ``count``-band raster to read for ``modality`` (L1C: all but B10).

    Raises:
        InputError: naming ``source`` when the band count does not fit the modality.
    """
    if modality == "s2_l1c" and count == len(S2_L1C_ALL_BANDS):
        return _L1C_WITHOUT_B10
    if count != len(BANDS[modality]):
        allowed = "12 or 13" if modality == "s2_l1c" else str(len(BANDS[modality]))
        raise InputError(f"{source} has {count} bands; {modality} needs {allowed}")
    return list(range(1, count + 1))


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
            bands = band_indexes(modality, src.count, str(path))
            return src.read(bands), src.crs, src.transform, src.nodata, src.tags()
    except (OSError, rasterio.errors.RasterioError) as err:
        raise InputError(f"cannot read {path}: {err}") from err
