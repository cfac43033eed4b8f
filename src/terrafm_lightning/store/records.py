"""Per-sample records: the :class:`Sample` a source builds, its metadata, and their writes.

A shard is written by one process only: the prep driver hands each task whole shards, and the
metadata plus the resume markers are written by the driver alone, the marker last.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr
from rasterio.crs import CRS
from rasterio.warp import transform as warp_transform

from terrafm_lightning.store.schema import (
    NAT,
    WORLDCOVER_CODES,
    WORLDCOVER_NODATA,
    WORLDCOVER_WRITTEN,
    WRITTEN,
    nodata_mask,
)
from terrafm_lightning.store.sharding import every_tile_holds_data, write_samples


@dataclass
class Sample:
    """One co-registered tile as written to the store.

    Attributes:
        pixels: modality -> (band, y, x) array in the store dtype; a missing modality is absent.
        grid_cell: Major-TOM grid cell (or file stem) the tile comes from.
        tile_index: index of the tile inside its cell (row-major).
        crs: CRS of the tile grid (WKT or ``EPSG:n``).
        transform: affine of the tile grid as (a, b, c, d, e, f).
        times: modality -> acquisition time; missing modalities get NaT.
        worldcover: (y, x) uint8 class raster, or None when it comes from a later pass.
    """

    pixels: dict[str, np.ndarray]
    grid_cell: str
    tile_index: int
    crs: str
    transform: tuple[float, ...]
    times: dict[str, np.datetime64] = field(default_factory=dict)
    worldcover: np.ndarray | None = None


def worldcover_summary(worldcover: np.ndarray) -> tuple[np.ndarray, float, int]:
    """Class shares over valid pixels, the valid share of the tile, and the dominant class code."""
    counts = np.bincount(worldcover.ravel(), minlength=256)[list(WORLDCOVER_CODES)]
    valid = counts.sum()
    if valid == 0:
        return np.zeros(len(WORLDCOVER_CODES), np.float32), 0.0, WORLDCOVER_NODATA
    hist = (counts / valid).astype(np.float32)
    return hist, float(valid / worldcover.size), WORLDCOVER_CODES[int(np.argmax(counts))]


def worldcover_record(worldcover: np.ndarray, coverage: float = 1.0) -> dict[str, Any]:
    """The per-sample WorldCover metadata of a class raster covering ``coverage`` of the tile."""
    hist, valid, dominant = worldcover_summary(worldcover)
    return {
        "worldcover_hist": hist,
        "worldcover_valid": valid,
        "worldcover_coverage": np.float32(coverage),
        "dominant_class": dominant,
    }


def tile_centre(crs: str, transform: Sequence[float], tile_size: int) -> tuple[float, float]:
    """(lat, lon) of the tile centre."""
    a, b, c, d, e, f = transform
    half = tile_size / 2
    x, y = c + a * half + b * half, f + d * half + e * half
    lon, lat = warp_transform(CRS.from_user_input(crs), "EPSG:4326", [x], [y])
    return float(lat[0]), float(lon[0])


def write_pixels(root: zarr.Group, indices: Sequence[int], samples: Sequence[Sample]) -> None:
    """Write the pixel arrays (and WorldCover raster, if given) of samples of one shard.

    A missing modality leaves its chunk out (it reads as nodata), so a rewritten slot never keeps
    stale pixels.
    """
    for m in root.attrs["modalities"]:
        write_samples(root[m], indices, [s.pixels.get(m) for s in samples])
    if all(s.worldcover is not None for s in samples):
        write_samples(root["worldcover"], indices, [s.worldcover for s in samples])


def write_rows(array: zarr.Array, indices: Sequence[int], block: np.ndarray) -> None:
    """Write ``block[k]`` to sample ``indices[k]``, one slice per run of consecutive samples.

    A whole-shard run is one write without read-modify-write of the shard. What is stored does
    not depend on the path taken: chunks that are all fill are left out either way.
    """
    idx = np.asarray(indices)
    if (np.diff(idx) < 0).any():  # reorder (a copy) only when needed
        order = np.argsort(idx)
        idx, block = idx[order], block[order]
    if every_tile_holds_data(block, array.fill_value):
        # zarr would store every chunk anyway: skip its two full fill-value comparisons (one
        # per shard, one per chunk), about half the CPU of a shard write.
        array = array.with_config({"write_empty_chunks": True})
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    for start, stop in zip(np.r_[0, breaks], np.r_[breaks, len(idx)], strict=True):
        array[int(idx[start]) : int(idx[stop - 1]) + 1] = block[start:stop]


def sample_record(root_attrs: Mapping[str, Any], sample: Sample) -> dict[str, Any]:
    """Per-sample metadata of ``sample`` (computed where the pixels are, in the prep worker)."""
    modalities = list(root_attrs["modalities"])
    size = int(root_attrs["tile_size"])
    nodata = np.ones(len(modalities), np.float32)
    for k, m in enumerate(modalities):
        if m in sample.pixels:
            nodata[k] = nodata_mask(m, sample.pixels[m]).mean()
    lat, lon = tile_centre(sample.crs, sample.transform, size)
    record: dict[str, Any] = {
        "grid_cell": sample.grid_cell,
        "tile_index": sample.tile_index,
        "centre_lat": lat,
        "centre_lon": lon,
        "crs": sample.crs,
        "transform": np.asarray(sample.transform, np.float64),
        "available": nodata < 1.0,
        "nodata_fraction": nodata,
    }
    for m in modalities:
        record[f"time_{m}"] = np.datetime64(sample.times.get(m, NAT), "s")
    if sample.worldcover is not None:
        record.update(worldcover_record(sample.worldcover))
        record[WORLDCOVER_WRITTEN] = True
    return record


def write_records(
    root: zarr.Group, records: Mapping[int, Mapping[str, Any]], marker: str = WRITTEN
) -> None:
    """Write per-sample metadata for many samples, then set their ``marker`` flag (last).

    Only the metadata chunks holding these samples are touched: the cost does not grow with
    the store.
    """
    if not records:
        return
    indices = np.array(sorted(records))
    names = {name for record in records.values() for name in record}
    for name in sorted(names - {marker}):
        write_column(root, name, indices, np.stack([np.asarray(records[i][name]) for i in indices]))
    write_column(root, marker, indices, np.ones(len(indices), bool))


def write_column(root: zarr.Group, name: str, indices: np.ndarray, values: np.ndarray) -> None:
    """Set ``root[name][indices[k]] = values[k]`` for sorted sample indices."""
    array = root[name]
    rest = (slice(None),) * (array.ndim - 1)
    array.set_orthogonal_selection((indices, *rest), values)


def write_sample(root: zarr.Group, index: int, sample: Sample) -> None:
    """Write one sample: pixel arrays, metadata, then the ``written`` flag.

    Only safe when no other process writes the same shard (the prep driver guarantees that).
    """
    write_pixels(root, [index], [sample])
    write_records(root, {index: sample_record(root.attrs.asdict(), sample)})
