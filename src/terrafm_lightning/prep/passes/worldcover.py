"""``terrafm-data worldcover``: ESA WorldCover tiles (EPSG:4326) onto every tile's grid.

For each written sample the WorldCover raster is reprojected (nearest) from the COGs that
intersect the tile (GDAL reads only the needed blocks of the 36000 px tiles), written to
``worldcover``, summarised into ``worldcover_hist`` / ``worldcover_valid`` / ``dominant_class``,
and marked ``worldcover_written``. Global ``class_frequencies`` are recomputed at the end. Tiles
that are mostly water (class 80 or open-ocean no data) can be dropped, keeping a seeded share
(the paper keeps 2%): dropped tiles get ``written`` False (readers skip them), are listed in
``skipped`` with a reason starting ``dropped:``, are left out of ``class_frequencies`` and are not
redone by reruns of the pixel pass. The kept share is drawn per sample index, so rerunning the
same command drops nothing more.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.warp import Resampling, reproject, transform_bounds

from terrafm_lightning.prep.driver import PrepReport, TaskResult, guarded, run_shards
from terrafm_lightning.prep.sources.geotiff import InputError
from terrafm_lightning.store.format import (
    DROPPED,
    WORLDCOVER_CODES,
    WORLDCOVER_NODATA,
    WORLDCOVER_WRITTEN,
    WRITTEN,
    consolidate,
    open_store,
    update_class_frequencies,
    worldcover_record,
    write_rows,
)

WATER = WORLDCOVER_CODES.index(80)


def worldcover_bounds(paths: Sequence[str]) -> list[tuple[str, tuple[float, ...]]]:
    """(path, lon/lat bounds) of each WorldCover file; errors name the file."""
    out = []
    for path in paths:
        try:
            with rasterio.open(path) as src:
                if src.count != 1 or src.crs is None:
                    raise InputError(f"{path} is not a single-band georeferenced WorldCover map")
                out.append((str(path), tuple(transform_bounds(src.crs, "EPSG:4326", *src.bounds))))
        except rasterio.errors.RasterioError as err:
            raise InputError(f"cannot read WorldCover file {path}: {err}") from err
    return out


def worldcover_tile(
    sources: Sequence[tuple[str, tuple[float, ...]]],
    crs: str,
    transform: Sequence[float],
    size: int,
) -> np.ndarray:
    """(size, size) uint8 WorldCover codes on a tile grid; 0 where no source covers it."""
    dst_crs = CRS.from_user_input(crs)
    dst_transform = rasterio.Affine(*transform)
    west, south, east, north = transform_bounds(
        dst_crs, "EPSG:4326", *rasterio.transform.array_bounds(size, size, dst_transform)
    )
    out = np.zeros((size, size), np.uint8)
    for path, (w, s, e, n) in sources:
        if w >= east or e <= west or s >= north or n <= south:
            continue
        part = np.zeros_like(out)
        try:
            with rasterio.open(path) as src:
                reproject(
                    rasterio.band(src, 1),
                    part,
                    dst_transform=dst_transform,
                    dst_crs=dst_crs,
                    src_nodata=WORLDCOVER_NODATA,
                    dst_nodata=WORLDCOVER_NODATA,
                    resampling=Resampling.nearest,
                )
        except rasterio.errors.RasterioError as err:
            raise InputError(f"cannot read WorldCover file {path}: {err}") from err
        out = np.where(out == WORLDCOVER_NODATA, part, out)
    return out


def worldcover_shard_task(
    path: str,
    storage_options: Mapping[str, Any] | None,
    sources: Sequence[tuple[str, tuple[float, ...]]],
    indices: Sequence[int],
) -> TaskResult:
    """WorldCover rasters of one shard: written to the store, metadata returned."""
    root = open_store(path, mode="r+", storage_options=storage_options)
    size = int(root.attrs["tile_size"])
    idx = np.asarray(indices)
    crs = root["crs"].get_orthogonal_selection((idx,))
    transforms = root["transform"].get_orthogonal_selection((idx, slice(None)))
    meta = {int(i): (str(c), tuple(t)) for i, c, t in zip(idx, crs, transforms, strict=True)}
    rasters, errors = guarded(indices, lambda i: worldcover_tile(sources, *meta[i], size))
    ok = sorted(rasters)
    if ok:
        write_rows(root["worldcover"], ok, np.stack([rasters[i] for i in ok]))
    return TaskResult({i: worldcover_record(rasters[i]) for i in ok}, errors)


def drop_water(
    path: str,
    threshold: float,
    keep_share: float,
    seed: int = 0,
    storage_options: Mapping[str, Any] | None = None,
) -> dict[int, str]:
    """Unmark tiles whose water + ocean share exceeds ``threshold``, keeping ``keep_share``.

    Returns:
        The dropped tiles: index -> reason (also added to the store's ``skipped``).
    """
    root = open_store(path, mode="r+", storage_options=storage_options)
    valid = root["worldcover_valid"][:]
    water = root["worldcover_hist"][:, WATER] * valid + (1 - valid)
    # One draw per sample index (not per candidate): a rerun keeps exactly the same tiles.
    keep = np.random.default_rng(seed).random(len(valid)) < keep_share
    dropped = np.flatnonzero(
        (water > threshold) & ~keep & root[WRITTEN][:] & root[WORLDCOVER_WRITTEN][:]
    )
    reason = f"{DROPPED} water/open-ocean share > {threshold}"
    out = {int(i): reason for i in dropped}
    if out:
        root[WRITTEN].set_orthogonal_selection((dropped,), np.zeros(len(dropped), bool))
        skipped = dict(root.attrs.get("skipped", {}))
        skipped.update({str(i): reason for i in out})
        root.attrs["skipped"] = skipped
    return out


def prepare_worldcover(
    path: str,
    worldcover: Sequence[str],
    *,
    drop_water_above: float | None = None,
    keep_water_share: float = 0.02,
    seed: int = 0,
    storage_options: Mapping[str, Any] | None = None,
    **run_options: Any,
) -> PrepReport:
    """Fill the WorldCover arrays of every written tile of the store at ``path``.

    Args:
        path: an existing store.
        worldcover: WorldCover GeoTIFF/COG files or folders of them.
        drop_water_above: drop tiles whose water share exceeds this (None: keep all).
        keep_water_share: share of those mostly-water tiles kept anyway.
        seed: seed of the kept share.
        storage_options: fsspec options of the store.
        **run_options: options of :func:`parallel.run_shards`.
    """
    files = [
        str(p)
        for item in worldcover
        for p in (sorted(Path(item).glob("*.tif")) if Path(item).is_dir() else [Path(item)])
    ]
    if not files:
        raise InputError(f"no WorldCover files in {list(worldcover)}")
    sources = worldcover_bounds(files)
    root = open_store(path, storage_options=storage_options)
    todo = np.flatnonzero(root[WRITTEN][:] & ~root[WORLDCOVER_WRITTEN][:])
    task = partial(worldcover_shard_task, path, storage_options, sources)
    report = run_shards(
        path,
        todo,
        task,
        marker=WORLDCOVER_WRITTEN,
        storage_options=storage_options,
        description="worldcover",
        **run_options,
    )
    if drop_water_above is not None:
        report.dropped = drop_water(path, drop_water_above, keep_water_share, seed, storage_options)
    update_class_frequencies(path, storage_options)
    consolidate(path, storage_options)
    return report
