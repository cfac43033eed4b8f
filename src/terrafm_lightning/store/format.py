"""The co-registered Zarr v3 store: format constants, creation, sample writes and resume state.

One store per dataset (format in ``docs/contracts.md``, measurements in ``docs/data_store.md``).
Pixel arrays are chunked one sample x all bands x full tile (a whole-tile read is one decode) and
sharded over :attr:`Encoding.samples_per_shard` samples (few objects). A shard is written by one
process only: the prep driver hands each task whole shards, and metadata plus the ``written``
resume marker are written by the driver alone, ``written`` last.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr
import zarr.codecs
from rasterio.crs import CRS
from rasterio.warp import transform as warp_transform

from terrafm_lightning.modalities import BANDS, MODALITIES, UNITS, WORLDCOVER_CLASSES
from terrafm_lightning.store.codecs import compressor

FORMAT_VERSION = 1
WORLDCOVER_CODES: tuple[int, ...] = tuple(WORLDCOVER_CLASSES)
"""The 11 WorldCover class codes, in ``worldcover_hist`` column order."""
WORLDCOVER_NODATA = 0
PIXEL_DTYPES: dict[str, str] = {"s1": "float32", "s2_l1c": "uint16", "s2_l2a": "uint16"}
NODATA: dict[str, float] = {"s1": float("nan"), "s2_l1c": 0, "s2_l2a": 0}
SCALE_OFFSET: dict[str, dict[str, float]] = {
    "s1": {"scale": 1.0, "offset": 0.0},
    "s2_l1c": {"scale": 1e-4, "offset": 0.0},
    "s2_l2a": {"scale": 1e-4, "offset": 0.0},
}
"""Physical value = stored x scale + offset (dB for S1, reflectance for S2)."""
METADATA_CHUNK = 65536
"""Samples per chunk of the 1-D metadata arrays (written only by the prep driver)."""
WRITTEN = "written"
WORLDCOVER_WRITTEN = "worldcover_written"
NAT = np.datetime64("NaT", "s")
DROPPED = "dropped:"
"""Prefix of the ``skipped`` reason of tiles dropped on purpose (``worldcover --drop-water-above``);
reruns of the pixel pass leave them unwritten."""


@dataclass(frozen=True)
class Encoding:
    """Chunking, sharding and compression of the pixel arrays (defaults chosen by measurement)."""

    samples_per_shard: int = 16
    cname: str = "zstd"
    clevel: int = 1
    shuffle: str = "bitshuffle"
    codec: str = "blosc"
    """``"blosc"`` or ``"zstd"`` (GPU-decodable; see :mod:`terrafm_lightning.store.codecs`)."""

    def compressor(self) -> zarr.abc.codec.BytesBytesCodec:
        """The codec applied to every inner chunk."""
        return compressor(self.codec, self.clevel, self.cname, self.shuffle)


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


class StoreError(ValueError):
    """A store is missing, unreachable or does not match the expected format."""


def _metadata_arrays(n_modalities: int) -> dict[str, tuple[tuple[int, ...], str, list[str], Any]]:
    """Name -> (trailing shape, dtype, dimension names, fill value) of the per-sample metadata."""
    n_classes = len(WORLDCOVER_CODES)
    return {
        "grid_cell": ((), "str", ["sample"], ""),
        "tile_index": ((), "int8", ["sample"], -1),
        "centre_lat": ((), "float64", ["sample"], np.nan),
        "centre_lon": ((), "float64", ["sample"], np.nan),
        "crs": ((), "str", ["sample"], ""),
        "transform": ((6,), "float64", ["sample", "affine"], np.nan),
        "available": ((n_modalities,), "bool", ["sample", "modality"], False),
        "nodata_fraction": ((n_modalities,), "float32", ["sample", "modality"], 1.0),
        "worldcover_hist": ((n_classes,), "float32", ["sample", "wc_class"], 0.0),
        "worldcover_valid": ((), "float32", ["sample"], 0.0),
        "dominant_class": ((), "uint8", ["sample"], WORLDCOVER_NODATA),
        WORLDCOVER_WRITTEN: ((), "bool", ["sample"], False),
        WRITTEN: ((), "bool", ["sample"], False),
    }


def create_store(
    path: str,
    n_samples: int,
    tile_size: int,
    modalities: Sequence[str] = MODALITIES,
    encoding: Encoding | None = None,
    attributes: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> zarr.Group:
    """Create an empty store of ``n_samples`` tiles (overwrites whatever is at ``path``).

    Args:
        path: local path or fsspec URL (``s3://...``).
        n_samples: number of sample slots.
        tile_size: tile height and width in pixels.
        modalities: modalities stored, in :data:`MODALITIES` order.
        encoding: chunking and compression of the pixel arrays.
        attributes: extra root attributes (for example the prep source description).
        storage_options: fsspec options for remote paths.

    Returns:
        The opened root group.
    """
    encoding = encoding or Encoding()
    modalities = [m for m in MODALITIES if m in set(modalities)]
    if not modalities:
        raise StoreError("a store needs at least one modality")
    try:
        root = zarr.open_group(_store(path, storage_options), mode="w", zarr_format=3)
    except Exception as err:
        raise StoreError(f"cannot create store at {path}: {err}") from err
    root.attrs.update(
        {
            "format_version": FORMAT_VERSION,
            "modalities": modalities,
            "bands": {m: list(BANDS[m]) for m in modalities},
            "units": {m: UNITS[m] for m in modalities},
            "scale_offset": {m: SCALE_OFFSET[m] for m in modalities},
            "nodata": {m: None if np.isnan(NODATA[m]) else NODATA[m] for m in modalities},
            "stats": {},
            "worldcover_classes": list(WORLDCOVER_CODES),
            "class_frequencies": {},
            "tile_size": tile_size,
            "samples_per_shard": encoding.samples_per_shard,
            "skipped": {},
            **dict(attributes or {}),
        }
    )
    shard = min(encoding.samples_per_shard, n_samples)
    for m in modalities:
        n_bands = len(BANDS[m])
        array = root.create_array(
            m,
            shape=(n_samples, n_bands, tile_size, tile_size),
            chunks=(1, n_bands, tile_size, tile_size),
            shards=(shard, n_bands, tile_size, tile_size),
            dtype=PIXEL_DTYPES[m],
            fill_value=NODATA[m],
            compressors=encoding.compressor(),
            dimension_names=["sample", f"band_{m}", "y", "x"],
        )
        array.attrs.update(
            {"nodata": None if np.isnan(NODATA[m]) else NODATA[m], "units": UNITS[m]}
        )
        _coordinate(root, f"band_{m}", np.array(BANDS[m]))
    wc = root.create_array(
        "worldcover",
        shape=(n_samples, tile_size, tile_size),
        chunks=(1, tile_size, tile_size),
        shards=(shard, tile_size, tile_size),
        dtype="uint8",
        fill_value=WORLDCOVER_NODATA,
        compressors=encoding.compressor(),
        dimension_names=["sample", "y", "x"],
    )
    wc.attrs["nodata"] = WORLDCOVER_NODATA
    chunk = min(METADATA_CHUNK, n_samples)
    for name, (trailing, dtype, dims, fill) in _metadata_arrays(len(modalities)).items():
        root.create_array(
            name,
            shape=(n_samples, *trailing),
            chunks=(chunk, *trailing),
            dtype=str if dtype == "str" else dtype,
            fill_value=fill,
            dimension_names=dims,
        )
    for m in modalities:
        root.create_array(
            f"time_{m}",
            shape=(n_samples,),
            chunks=(chunk,),
            dtype="datetime64[s]",
            fill_value=NAT,
            dimension_names=["sample"],
        )
    _coordinate(root, "modality", np.array(modalities))
    _coordinate(root, "wc_class", np.array(WORLDCOVER_CODES, dtype="uint8"))
    consolidate(path, storage_options)
    return root


def _coordinate(root: zarr.Group, name: str, values: np.ndarray) -> None:
    """Write a small 1-D coordinate array whose dimension is itself (xarray index)."""
    array = root.create_array(
        name,
        shape=values.shape,
        dtype=str if values.dtype.kind == "U" else values.dtype,
        dimension_names=[name],
    )
    array[:] = values


def consolidate(path: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Consolidate metadata so ``xarray.open_zarr`` (and S3 readers) open the store in one read."""
    with warnings.catch_warnings():
        # Consolidated metadata is a zarr-python extension of v3; xarray reads it.
        warnings.simplefilter("ignore", category=UserWarning)
        zarr.consolidate_metadata(_store(path, storage_options))


def _store(path: str, storage_options: Mapping[str, Any] | None) -> zarr.abc.store.Store:
    if "://" in path and not path.startswith("file://"):
        return zarr.storage.FsspecStore.from_url(path, storage_options=dict(storage_options or {}))
    return zarr.storage.LocalStore(path.removeprefix("file://"))


def open_store(
    path: str, mode: str = "r", storage_options: Mapping[str, Any] | None = None
) -> zarr.Group:
    """Open an existing store, checking its format version.

    Raises:
        StoreError: naming the path when it is unreachable or not a store of this format.
    """
    try:
        root = zarr.open_group(
            _store(path, storage_options),
            mode="r" if mode == "r" else "r+",
            zarr_format=3,
            use_consolidated=False,
        )
    except Exception as err:
        raise StoreError(f"cannot open store at {path}: {err}") from err
    version = root.attrs.get("format_version")
    if version != FORMAT_VERSION:
        raise StoreError(
            f"{path} is not a terrafm-lightning store of format_version {FORMAT_VERSION} "
            f"(found {version!r})"
        )
    return root


def store_modalities(root: zarr.Group) -> list[str]:
    """The modalities a store holds."""
    return list(root.attrs["modalities"])


def pending(root: zarr.Group, marker: str = WRITTEN) -> np.ndarray:
    """Indices of samples whose ``marker`` flag is still False (what a resumed run must do).

    Tiles dropped on purpose (``skipped`` reason starting with :data:`DROPPED`) are not redone.
    """
    todo = ~root[marker][:]
    skipped = root.attrs.get("skipped", {})
    todo[[int(i) for i, reason in skipped.items() if reason.startswith(DROPPED)]] = False
    return np.flatnonzero(todo)


def shard_groups(root: zarr.Group, indices: Iterable[int]) -> list[list[int]]:
    """Split sample indices into per-shard groups: the unit of work of one prep task."""
    per_shard = int(root.attrs["samples_per_shard"])
    groups: dict[int, list[int]] = {}
    for i in sorted(int(i) for i in indices):
        groups.setdefault(i // per_shard, []).append(i)
    return list(groups.values())


def nodata_mask(modality: str, pixels: np.ndarray) -> np.ndarray:
    """(y, x) True where any band of ``pixels`` (band, y, x) is nodata."""
    if np.isnan(NODATA[modality]):
        return np.isnan(pixels).any(axis=0)
    return (pixels == NODATA[modality]).any(axis=0)


def worldcover_summary(worldcover: np.ndarray) -> tuple[np.ndarray, float, int]:
    """Class shares over valid pixels, the valid share of the tile, and the dominant class code."""
    counts = np.bincount(worldcover.ravel(), minlength=256)[list(WORLDCOVER_CODES)]
    valid = counts.sum()
    if valid == 0:
        return np.zeros(len(WORLDCOVER_CODES), np.float32), 0.0, WORLDCOVER_NODATA
    hist = (counts / valid).astype(np.float32)
    return hist, float(valid / worldcover.size), WORLDCOVER_CODES[int(np.argmax(counts))]


def worldcover_record(worldcover: np.ndarray) -> dict[str, Any]:
    """The per-sample WorldCover metadata of a class raster."""
    hist, valid, dominant = worldcover_summary(worldcover)
    return {"worldcover_hist": hist, "worldcover_valid": valid, "dominant_class": dominant}


def tile_centre(crs: str, transform: Sequence[float], tile_size: int) -> tuple[float, float]:
    """(lat, lon) of the tile centre."""
    a, b, c, d, e, f = transform
    half = tile_size / 2
    x, y = c + a * half + b * half, f + d * half + e * half
    lon, lat = warp_transform(CRS.from_user_input(crs), "EPSG:4326", [x], [y])
    return float(lat[0]), float(lon[0])


def write_pixels(root: zarr.Group, indices: Sequence[int], samples: Sequence[Sample]) -> None:
    """Write the pixel arrays (and WorldCover raster, if given) of samples of one shard.

    Missing modalities are written as nodata so a rewritten slot never keeps stale pixels.
    """
    modalities = store_modalities(root)
    size = int(root.attrs["tile_size"])
    for m in modalities:
        n_bands = len(BANDS[m])
        block = np.full((len(samples), n_bands, size, size), NODATA[m], PIXEL_DTYPES[m])
        for k, sample in enumerate(samples):
            if m in sample.pixels:
                block[k] = sample.pixels[m]
        write_rows(root[m], indices, block)
    if all(s.worldcover is not None for s in samples):
        write_rows(root["worldcover"], indices, np.stack([s.worldcover for s in samples]))


def write_rows(array: zarr.Array, indices: Sequence[int], block: np.ndarray) -> None:
    """Write ``block[k]`` to sample ``indices[k]``, one slice per run of consecutive samples.

    A whole-shard run is one write without read-modify-write of the shard.
    """
    order = np.argsort(indices)
    idx, block = np.asarray(indices)[order], block[order]
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
    """Write per-sample metadata for many samples, then set their ``marker`` flag (last)."""
    if not records:
        return
    indices = np.array(sorted(records))
    names = {name for record in records.values() for name in record}
    for name in sorted(names - {marker}):
        values = np.stack([np.asarray(records[i][name]) for i in indices])
        array = root[name]
        rest = (slice(None),) * (array.ndim - 1)
        array.set_orthogonal_selection((indices, *rest), values)
    root[marker].set_orthogonal_selection((indices,), np.ones(len(indices), bool))


def write_sample(root: zarr.Group, index: int, sample: Sample) -> None:
    """Write one sample: pixel arrays, metadata, then the ``written`` flag.

    Only safe when no other process writes the same shard (the prep driver guarantees that).
    """
    write_pixels(root, [index], [sample])
    write_records(root, {index: sample_record(root.attrs.asdict(), sample)})


def update_class_frequencies(
    path: str, storage_options: Mapping[str, Any] | None = None
) -> dict[str, float]:
    """Recompute ``class_frequencies`` over the valid WorldCover pixels of all written tiles.

    Opens the store afresh: a group opened earlier would write back its stale attributes
    (zarr rewrites all of them), undoing ``skipped`` entries made since.
    """
    root = open_store(path, mode="r+", storage_options=storage_options)
    done = root[WORLDCOVER_WRITTEN][:] & root[WRITTEN][:]
    weights = root["worldcover_valid"][:][done].astype(np.float64)
    totals = (root["worldcover_hist"][:][done].astype(np.float64) * weights[:, None]).sum(axis=0)
    total = totals.sum()
    shares = totals / total if total > 0 else totals
    frequencies = {str(code): float(s) for code, s in zip(WORLDCOVER_CODES, shares, strict=True)}
    root.attrs["class_frequencies"] = frequencies
    return frequencies
