"""The co-registered Zarr v3 store: create, open, resume state and dataset-wide attributes.

One store per dataset (schema in :mod:`store.schema`, format in ``docs/data_store.md``). Pixel
arrays are chunked one sample x all bands x full tile (a whole-tile read is one decode) and
sharded over :attr:`Encoding.samples_per_shard` samples (few objects). Opening never creates
anything: a missing store is an error naming the path.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import fsspec
import numpy as np
import zarr

from terrafm_lightning.errors import UserError
from terrafm_lightning.modalities import BANDS, MODALITIES, UNITS
from terrafm_lightning.store.schema import (
    DROPPED,
    FORMAT_VERSION,
    METADATA_CHUNK,
    NODATA,
    SCALE_OFFSET,
    WORLDCOVER_CODES,
    WORLDCOVER_NODATA,
    WORLDCOVER_WRITTEN,
    WRITTEN,
    Encoding,
    coordinates,
    ordered_modalities,
    store_arrays,
)


class StoreError(UserError):
    """A store is missing, unreachable or does not match the expected format."""


class TileReadError(StoreError):
    """A tile cannot be read, is damaged or has no usable modality (names store and sample)."""


def _nodata_attr(value: float) -> float | None:
    return None if np.isnan(value) else value


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
        modalities: modalities stored (kept in :data:`MODALITIES` order).
        encoding: chunking and compression of the pixel arrays.
        attributes: extra root attributes (for example the prep source description).
        storage_options: fsspec options for remote paths.

    Returns:
        The opened root group.
    """
    encoding = encoding or Encoding()
    modalities = ordered_modalities(modalities)
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
            "nodata": {m: _nodata_attr(NODATA[m]) for m in modalities},
            "stats": {},
            "worldcover_classes": list(WORLDCOVER_CODES),
            "class_frequencies": {},
            "tile_size": tile_size,
            "samples_per_shard": encoding.samples_per_shard,
            **dict(attributes or {}),
        }
    )
    shard = min(encoding.samples_per_shard, n_samples)
    chunk = min(METADATA_CHUNK, n_samples)
    for name, spec in store_arrays(modalities, tile_size).items():
        shape = (n_samples, *spec.trailing)
        layout: dict[str, Any] = (
            {
                "chunks": (1, *spec.trailing),
                "shards": (shard, *spec.trailing),
                "compressors": encoding.compressors(),
            }
            if spec.pixels
            else {"chunks": (chunk, *spec.trailing)}
        )
        array = root.create_array(
            name,
            shape=shape,
            dtype=str if spec.dtype == "str" else spec.dtype,
            fill_value=spec.fill,
            dimension_names=list(spec.dims),
            **layout,
        )
        if name in modalities:
            array.attrs.update({"nodata": _nodata_attr(NODATA[name]), "units": UNITS[name]})
        elif name == "worldcover":
            array.attrs["nodata"] = WORLDCOVER_NODATA
    for name, values in coordinates(modalities).items():
        array = root.create_array(
            name,
            shape=values.shape,
            dtype=str if values.dtype.kind == "U" else values.dtype,
            dimension_names=[name],
        )
        array[:] = values
    consolidate(path, storage_options)
    return root


def consolidate(path: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Consolidate metadata so ``xarray.open_zarr`` (and S3 readers) open the store in one read."""
    with warnings.catch_warnings():
        # Consolidated metadata is a zarr-python extension of v3; xarray reads it.
        warnings.simplefilter("ignore", category=UserWarning)
        zarr.consolidate_metadata(_store(path, storage_options))


def _store(
    path: str, storage_options: Mapping[str, Any] | None, read_only: bool = False
) -> zarr.abc.store.Store:
    if "://" in path and not path.startswith("file://"):
        return zarr.storage.FsspecStore.from_url(
            path, storage_options=dict(storage_options or {}), read_only=read_only
        )
    return zarr.storage.LocalStore(path.removeprefix("file://"), read_only=read_only)


def exists(path: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether a store (its root ``zarr.json``) exists at ``path``; never creates anything."""
    try:
        fs, root = fsspec.core.url_to_fs(path, **dict(storage_options or {}))
        return bool(fs.exists(f"{root.rstrip('/')}/zarr.json"))
    except Exception as err:
        raise StoreError(f"cannot open store at {path}: unreachable: {err}") from err


def require_store(path: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Raise :class:`StoreError` naming ``path`` when no store is there (creates nothing)."""
    if not exists(path, storage_options):
        raise StoreError(f"cannot open store at {path}: no store there (no zarr.json)")


def open_store(
    path: str, mode: str = "r", storage_options: Mapping[str, Any] | None = None
) -> zarr.Group:
    """Open an existing store, checking its format version; never creates files.

    Raises:
        StoreError: naming the path when it is absent, unreachable or not a store of this format.
    """
    require_store(path, storage_options)
    try:
        root = zarr.open_group(
            _store(path, storage_options, read_only=mode == "r"),
            mode="r" if mode == "r" else "r+",
            zarr_format=3,
            use_consolidated=False,
        )
    except Exception as err:
        raise StoreError(f"cannot open store at {path}: {err}") from err
    version = root.attrs.get("format_version")
    if version is None:
        raise StoreError(
            f"{path} is a Zarr store made by another tool, not a terrafm store (no "
            "format_version): give the path of a store written by terrafm-data"
        )
    if version != FORMAT_VERSION:
        raise StoreError(
            f"{path} is a terrafm-lightning store of format_version {version!r}, this version "
            f"reads {FORMAT_VERSION}; write it again with the same terrafm-data command and "
            "--overwrite"
        )
    return root


def store_modalities(root: zarr.Group) -> list[str]:
    """The modalities a store holds."""
    return list(root.attrs["modalities"])


def pending(root: zarr.Group, marker: str = WRITTEN) -> np.ndarray:
    """Indices of samples whose ``marker`` flag is still False (what a resumed run must do).

    Tiles dropped on purpose (``dropped`` True) are not redone.
    """
    return np.flatnonzero(~root[marker][:] & ~root[DROPPED][:])


def shard_groups(root: zarr.Group, indices: Iterable[int]) -> list[list[int]]:
    """Split sample indices into per-shard groups: the unit of work of one prep task."""
    per_shard = int(root.attrs["samples_per_shard"])
    groups: dict[int, list[int]] = {}
    for i in sorted(int(i) for i in indices):
        groups.setdefault(i // per_shard, []).append(i)
    return list(groups.values())


def update_class_frequencies(
    path: str, storage_options: Mapping[str, Any] | None = None
) -> dict[str, float]:
    """Recompute ``class_frequencies`` over the valid WorldCover pixels of all written tiles.

    Empty when no written tile has a WorldCover class (no map covers the store). Opens the store
    afresh: a group opened earlier would write back its stale attributes (zarr rewrites all).
    """
    root = open_store(path, mode="r+", storage_options=storage_options)
    done = root[WORLDCOVER_WRITTEN][:] & root[WRITTEN][:]
    weights = root["worldcover_valid"][:][done].astype(np.float64)
    totals = (root["worldcover_hist"][:][done].astype(np.float64) * weights[:, None]).sum(axis=0)
    total = totals.sum()
    frequencies = (
        {str(code): float(s / total) for code, s in zip(WORLDCOVER_CODES, totals, strict=True)}
        if total > 0
        else {}
    )
    root.attrs["class_frequencies"] = frequencies
    return frequencies
