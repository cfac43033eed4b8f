"""``terrafm-data worldcover``: ESA WorldCover tiles (EPSG:4326) onto every tile's grid.

For each written sample the WorldCover raster is reprojected (nearest, rasterio/GDAL, reading
only the window of each map that the tile needs) from the maps that intersect the tile, written
to ``worldcover``, summarised into ``worldcover_hist`` / ``worldcover_valid`` /
``worldcover_coverage`` / ``dominant_class``, and marked ``worldcover_written``.

Coverage: a pixel inside a map's extent with the map's no data (0) is open ocean; a pixel outside
every given map has no map (both are stored as 0; ``worldcover_coverage`` is the share of the
tile inside some map). Tiles with no or partial coverage are counted and listed, and the run says
how many tiles each map covered. Tiles that are mostly water (class 80 plus open ocean, as a share
of the whole tile, so pixels without a map never count as water) can be dropped, keeping a seeded
share (the paper keeps 2%): the driver sets ``dropped`` and clears ``written`` (readers skip
them). Every run recomputes the drops from its own options (no option: nothing dropped), so a
rerun with other settings restores tiles dropped before; the kept share is drawn per sample
index, so rerunning the same command changes nothing.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import zarr
from rasterio.crs import CRS
from rasterio.warp import Resampling, reproject, transform_bounds
from rasterio.windows import Window, from_bounds

from terrafm_lightning.prep.driver import (
    LISTED,
    PrepReport,
    TaskResult,
    guarded,
    run_shards,
    set_dropped,
)
from terrafm_lightning.prep.errors import InputError
from terrafm_lightning.prep.lock import store_lock
from terrafm_lightning.store.format import consolidate, open_store, update_class_frequencies
from terrafm_lightning.store.records import worldcover_record
from terrafm_lightning.store.schema import (
    DROPPED,
    WORLDCOVER_CODES,
    WORLDCOVER_NODATA,
    WORLDCOVER_WRITTEN,
    WRITTEN,
)
from terrafm_lightning.store.sharding import write_samples

WATER = WORLDCOVER_CODES.index(80)
NO_MAP = 255
"""Marks pixels outside a map while reprojecting (never stored: they are stored as 0)."""


def worldcover_files(items: Sequence[str]) -> list[str]:
    """WorldCover GeoTIFFs from files and folders (``*.tif`` in a folder); errors name the path."""
    files = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(str(p) for p in path.glob("*.tif"))
            if not found:
                raise InputError(f"{path}: no WorldCover *.tif files in this folder")
            files += found
        elif path.is_file():
            files.append(str(path))
        else:
            raise InputError(f"{path}: WorldCover file or folder not found")
    return files


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


def _map_part(path: str, dst_crs: CRS, dst_transform: rasterio.Affine, size: int) -> np.ndarray:
    """One map on the tile grid: its codes (0 = ocean) and :data:`NO_MAP` outside its extent."""
    bounds = rasterio.transform.array_bounds(size, size, dst_transform)
    with rasterio.open(path) as src:
        exact = from_bounds(*transform_bounds(dst_crs, src.crs, *bounds), src.transform)
        col, row = math.floor(exact.col_off) - 1, math.floor(exact.row_off) - 1
        width = math.ceil(exact.col_off + exact.width) + 1 - col
        height = math.ceil(exact.row_off + exact.height) + 1 - row
        window = Window(col, row, width, height).intersection(Window(0, 0, src.width, src.height))
        data = src.read(1, window=window)
        source_transform = src.window_transform(window)
        source_crs = src.crs
    part = np.full((size, size), NO_MAP, np.uint8)
    # The map's own 0 (ocean) is a value here, not nodata; only pixels outside the window
    # (outside the map) keep NO_MAP, which no WorldCover map holds.
    reproject(
        data,
        part,
        src_transform=source_transform,
        src_crs=source_crs,
        src_nodata=NO_MAP,
        dst_transform=dst_transform,
        dst_crs=dst_crs,
        dst_nodata=NO_MAP,
        resampling=Resampling.nearest,
    )
    return part


def worldcover_tile(
    sources: Sequence[tuple[str, tuple[float, ...]]],
    crs: str,
    transform: Sequence[float],
    size: int,
) -> tuple[np.ndarray, float, list[str]]:
    """WorldCover of one tile: (size, size) codes, the share covered by a map, the maps used."""
    dst_crs = CRS.from_user_input(crs)
    dst_transform = rasterio.Affine(*transform)
    west, south, east, north = transform_bounds(
        dst_crs, "EPSG:4326", *rasterio.transform.array_bounds(size, size, dst_transform)
    )
    codes = np.zeros((size, size), np.uint8)
    covered = np.zeros((size, size), bool)
    used = []
    for path, (w, s, e, n) in sources:
        if w >= east or e <= west or s >= north or n <= south:
            continue
        try:
            part = _map_part(path, dst_crs, dst_transform, size)
        except (rasterio.errors.RasterioError, rasterio.errors.WindowError) as err:
            raise InputError(f"cannot read WorldCover file {path}: {err}") from err
        inside = part != NO_MAP
        if not inside.any():
            continue
        take = inside & (codes == WORLDCOVER_NODATA)
        codes[take] = part[take]
        covered |= inside
        used.append(path)
    return codes, float(covered.mean()), used


def worldcover_shard_task(
    path: str,
    storage_options: Mapping[str, Any] | None,
    sources: Sequence[tuple[str, tuple[float, ...]]],
    indices: Sequence[int],
) -> TaskResult:
    """WorldCover rasters of one shard: written to the store, metadata and map counts returned."""
    root = open_store(path, mode="r+", storage_options=storage_options)
    size = int(root.attrs["tile_size"])
    idx = np.asarray(indices)
    crs = root["crs"].get_orthogonal_selection((idx,))
    transforms = root["transform"].get_orthogonal_selection((idx, slice(None)))
    meta = {int(i): (str(c), tuple(t)) for i, c, t in zip(idx, crs, transforms, strict=True)}
    tiles, errors = guarded(indices, lambda i: worldcover_tile(sources, *meta[i], size))
    ok = sorted(tiles)
    if ok:
        write_samples(root["worldcover"], ok, [tiles[i][0] for i in ok])
    counts = Counter(p for i in ok for p in tiles[i][2])
    records = {i: worldcover_record(tiles[i][0], tiles[i][1]) for i in ok}
    return TaskResult(records, errors, counts)


def water_drops(root: zarr.Group, threshold: float, keep_share: float, seed: int) -> np.ndarray:
    """(N,) tiles to drop: water + ocean share of the tile above ``threshold``, not kept."""
    valid = root["worldcover_valid"][:].astype(np.float64)
    ocean = np.clip(root["worldcover_coverage"][:] - valid, 0, None)
    water = root["worldcover_hist"][:, WATER] * valid + ocean
    water[water < 1e-6] = 0  # float32 shares: no water must read as exactly none
    # One draw per sample index (not per candidate): a rerun keeps exactly the same tiles.
    keep = np.random.default_rng(seed).random(len(valid)) < keep_share
    candidates = (root[WRITTEN][:] | root[DROPPED][:]) & root[WORLDCOVER_WRITTEN][:]
    return (water > threshold) & ~keep & candidates


def drop_water(
    path: str,
    threshold: float | None,
    keep_share: float = 0.02,
    seed: int = 0,
    storage_options: Mapping[str, Any] | None = None,
) -> tuple[list[int], list[int]]:
    """Recompute the drops of the store at ``path`` (``threshold`` None: drop nothing).

    Returns:
        (newly dropped, restored) sample indices.
    """
    with store_lock(path, storage_options, existing=True):
        changes = _apply_drops(path, threshold, keep_share, seed, storage_options)
        update_class_frequencies(path, storage_options)
        consolidate(path, storage_options)
    return changes


def _apply_drops(
    path: str,
    threshold: float | None,
    keep_share: float,
    seed: int,
    storage_options: Mapping[str, Any] | None,
) -> tuple[list[int], list[int]]:
    root = open_store(path, mode="r+", storage_options=storage_options)
    if threshold is None:
        drop = np.zeros(root[WRITTEN].shape, bool)
        rule = None
    else:
        drop = water_drops(root, threshold, keep_share, seed)
        rule = f"water/open-ocean share > {threshold} (kept share {keep_share}, seed {seed})"
    changes = set_dropped(root, drop)
    root.attrs["drop_rule"] = rule
    return changes


def coverage_notes(root: zarr.Group, counts: Counter, sources: Sequence[str]) -> list[str]:
    """Console lines: tiles per map, then tiles with no or partial coverage (listed, counted)."""
    notes = [f"map {p}: covers {counts.get(p, 0)} tiles (this run)" for p in sources]
    done = root[WORLDCOVER_WRITTEN][:] & (root[WRITTEN][:] | root[DROPPED][:])
    coverage = root["worldcover_coverage"][:]
    partial_cover = (coverage > 0) & (coverage < 1)
    for name, mask in (
        ("no WorldCover map (outside every given map; kept, not counted as water)", coverage == 0),
        ("partial WorldCover coverage (the rest is not counted as water)", partial_cover),
    ):
        which = np.flatnonzero(done & mask)
        if not len(which):
            continue
        notes.append(f"{len(which)} tiles with {name}:")
        shown = which[:LISTED]
        cells = root["grid_cell"].get_orthogonal_selection((shown,))
        tiles = root["tile_index"].get_orthogonal_selection((shown,))
        notes += [
            f"  sample {i}: {c}/{t} coverage {coverage[i]:.2f}"
            for i, c, t in zip(shown.tolist(), cells, tiles, strict=True)
        ]
        if len(which) > LISTED:
            notes.append(f"  ... and {len(which) - LISTED} more (array worldcover_coverage)")
    return notes


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
    """Fill the WorldCover arrays of every written tile of the store at ``path`` (public API).

    Args:
        path: an existing store.
        worldcover: WorldCover GeoTIFF/COG files or folders of them.
        drop_water_above: drop tiles whose water share exceeds this (None: keep all, and
            restore tiles an earlier run dropped).
        keep_water_share: share of those mostly-water tiles kept anyway.
        seed: seed of the kept share.
        storage_options: fsspec options of the store.
        **run_options: options of :func:`driver.run_shards`.

    Returns:
        The run's report: ``dropped`` / ``restored`` indices, ``counts`` of tiles per map and
        ``notes`` on coverage.
    """
    files = worldcover_files(worldcover)
    sources = worldcover_bounds(files)
    with store_lock(path, storage_options, existing=True) as lock:
        root = open_store(path, mode="r+", storage_options=storage_options)
        todo = np.flatnonzero((root[WRITTEN][:] | root[DROPPED][:]) & ~root[WORLDCOVER_WRITTEN][:])
        task = partial(worldcover_shard_task, path, storage_options, sources)
        report = run_shards(
            root,
            todo,
            task,
            lock,
            marker=WORLDCOVER_WRITTEN,
            description="worldcover",
            **run_options,
        )
        report.dropped, report.restored = _apply_drops(
            path, drop_water_above, keep_water_share, seed, storage_options
        )
        report.notes = coverage_notes(
            open_store(path, storage_options=storage_options), report.counts, files
        )
        update_class_frequencies(path, storage_options)
        consolidate(path, storage_options)
    return report
