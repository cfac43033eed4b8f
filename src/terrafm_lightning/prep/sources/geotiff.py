"""``terrafm-data geotiff``: folders of co-registered S1 / S2-L1C / S2-L2A GeoTIFFs -> store.

Layout: ``ROOT/<folder>/<stem>.tif`` per modality (TerraMind examples: ``S1RTC``, ``S2L1C``,
``S2L2A``); files with the same stem are one location. The S2 L2A grid (else L1C, else S1) is the
reference; other modalities are reprojected onto it (nearest, so stored values are source values)
when their grid differs. Files larger than the tile size are cut into row-major tiles.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
from rasterio.crs import CRS
from rasterio.warp import Resampling

from terrafm_lightning.modalities import BANDS, MODALITIES, S2_L1C_ALL_BANDS
from terrafm_lightning.prep.driver import (
    PrepReport,
    create_or_resume,
    run_shards,
    sample_shard_task,
)
from terrafm_lightning.store.format import (
    NODATA,
    PIXEL_DTYPES,
    Encoding,
    Sample,
    consolidate,
    pending,
)

DEFAULT_FOLDERS: dict[str, str] = {"s1": "S1RTC", "s2_l1c": "S2L1C", "s2_l2a": "S2L2A"}
GRID_PRIORITY = ("s2_l2a", "s2_l1c", "s1")
_L1C_WITHOUT_B10 = [i for i, b in enumerate(S2_L1C_ALL_BANDS) if b != "B10"]


class InputError(ValueError):
    """A source file is unusable; the message names it."""


def select_bands(modality: str, pixels: np.ndarray, source: str) -> np.ndarray:
    """Check the band count and drop B10 from a 13-band L1C raster."""
    expected = len(BANDS[modality])
    if modality == "s2_l1c" and pixels.shape[0] == len(S2_L1C_ALL_BANDS):
        return pixels[_L1C_WITHOUT_B10]
    if pixels.shape[0] != expected:
        allowed = "12 or 13" if modality == "s2_l1c" else str(expected)
        raise InputError(f"{source} has {pixels.shape[0]} bands; {modality} needs {allowed}")
    return pixels


def to_store_dtype(modality: str, pixels: np.ndarray, nodata: float | None) -> np.ndarray:
    """Cast to the store dtype, mapping the source nodata value to the store's nodata."""
    invalid = ~np.isfinite(pixels) if pixels.dtype.kind == "f" else np.zeros(pixels.shape, bool)
    if nodata is not None and not np.isnan(nodata):
        invalid |= pixels == nodata
    if modality == "s1":
        out = pixels.astype(np.float32)
        out[invalid] = np.nan
        return out
    out = np.clip(pixels, 0, 65535).astype(PIXEL_DTYPES[modality])
    out[invalid] = NODATA[modality]
    return out


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

    rioxarray's ``reproject`` (GDAL warp); nearest keeps stored values equal to source values.
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


def read_geotiff(path: Path) -> tuple[np.ndarray, CRS, rasterio.Affine, float | None, dict]:
    """Read all bands, CRS, transform, nodata and tags; errors name the file."""
    try:
        with rasterio.open(path) as src:
            return src.read(), src.crs, src.transform, src.nodata, src.tags()
    except rasterio.errors.RasterioError as err:
        raise InputError(f"cannot read {path}: {err}") from err


def plan_geotiffs(
    root: Path, folders: Mapping[str, str], require_all: bool
) -> list[dict[str, str]]:
    """Per location, modality -> file path (sorted by stem)."""
    stems: dict[str, dict[str, str]] = {}
    for m, folder in folders.items():
        for path in sorted((root / folder).glob("*.tif")):
            stems.setdefault(path.stem, {})[m] = str(path)
    if not stems:
        raise InputError(f"no *.tif files under {root}/{{{','.join(folders.values())}}}")
    keep = [s for s in sorted(stems) if not require_all or len(stems[s]) == len(folders)]
    return [stems[s] for s in keep]


def geotiff_sample(
    locations: Sequence[Mapping[str, str]], tile_size: int, tiles_per_side: int, index: int
) -> Sample:
    """Sample ``index``: tile ``index % tiles**2`` of location ``index // tiles**2``."""
    location, tile_index = divmod(index, tiles_per_side**2)
    files = locations[location]
    reference = next(m for m in GRID_PRIORITY if m in files)
    _, crs, transform, _, _ = read_geotiff(Path(files[reference]))
    shape = (tile_size * tiles_per_side,) * 2
    pixels: dict[str, np.ndarray] = {}
    times: dict[str, np.datetime64] = {}
    for m, path in files.items():
        raw, src_crs, src_transform, nodata, tags = read_geotiff(Path(path))
        if src_crs is None:
            raise InputError(f"{path} has no CRS; cannot co-register it")
        data = to_store_dtype(m, select_bands(m, raw, path), nodata)
        data = align(data, src_crs, src_transform, crs, transform, shape, NODATA[m])
        if data.shape[1:] != shape:
            raise InputError(f"{path} is {data.shape[1:]} px; expected {shape} (tile size)")
        rows, cols = tile_window(tile_index, tiles_per_side, tile_size)
        pixels[m] = np.ascontiguousarray(data[:, rows, cols])
        if "datetime" in tags:
            times[m] = np.datetime64(tags["datetime"][:19], "s")
    if all(m not in pixels for m in MODALITIES):
        raise InputError(f"location {Path(files[reference]).stem} has no modality")
    return Sample(
        pixels=pixels,
        grid_cell=Path(files[reference]).stem,
        tile_index=tile_index,
        crs=crs.to_string(),
        transform=tile_transform(transform, tile_index, tiles_per_side, tile_size),
        times=times,
    )


def prepare_geotiff(
    source: str,
    path: str,
    tile_size: int | None = None,
    folders: Mapping[str, str] | None = None,
    require_all: bool = True,
    *,
    encoding: Encoding | None = None,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    **run_options: Any,
) -> PrepReport:
    """Write (or finish writing) a store from GeoTIFF folders under ``source``.

    Args:
        source: root folder holding one sub-folder per modality.
        path: output store.
        tile_size: tile size; default the reference raster size (no cutting).
        folders: modality -> sub-folder name (default :data:`DEFAULT_FOLDERS`).
        require_all: keep only locations with every modality.
        encoding: store chunking/compression.
        overwrite: replace an existing store at ``path``.
        storage_options: fsspec options of the output store.
        **run_options: options of :func:`parallel.run_shards`.
    """
    folders = dict(folders or DEFAULT_FOLDERS)
    locations = plan_geotiffs(Path(source), folders, require_all)
    first = locations[0][next(m for m in GRID_PRIORITY if m in locations[0])]
    with rasterio.open(first) as src:
        full = src.width
    tile_size = tile_size or full
    if full % tile_size:
        raise InputError(f"{first} is {full} px wide, not a multiple of tile size {tile_size}")
    tiles_per_side = full // tile_size
    n_samples = len(locations) * tiles_per_side**2
    modalities = [m for m in MODALITIES if m in folders]
    plan = {"kind": "geotiff", "locations": locations, "tile_size": tile_size}
    root = create_or_resume(
        path, n_samples, tile_size, modalities, plan, encoding, overwrite, storage_options
    )
    root.attrs["source"] = f"terrafm-data geotiff {source}"
    make = partial(geotiff_sample, locations, tile_size, tiles_per_side)
    task = partial(sample_shard_task, path, storage_options, make)
    report = run_shards(path, pending(root), task, storage_options=storage_options, **run_options)
    consolidate(path, storage_options)
    return report
