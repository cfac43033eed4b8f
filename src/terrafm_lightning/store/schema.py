"""The store schema, written once: arrays, dtypes, dimension names, fill values, nodata rules.

:func:`store.format.create_store` creates exactly these arrays and :mod:`store.validate` checks a
store against them; nothing else spells the layout out (``docs/data_store.md`` describes it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr.codecs

from terrafm_lightning.modalities import BANDS, MODALITIES, WORLDCOVER_CLASSES
from terrafm_lightning.store.codecs import compressors

FORMAT_VERSION = 2
"""2: skip / drop bookkeeping as per-sample arrays and ``worldcover_coverage`` (1: ``skipped``
root attribute)."""
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
SKIP_REASON = "skip_reason"
"""Per-sample message of the last failure (``--skip-bad``); empty once the tile is written."""
DROPPED = "dropped"
"""Per-sample flag of tiles dropped on purpose (``worldcover --drop-water-above``)."""
NAT = np.datetime64("NaT", "s")
REQUIRED_ATTRS = (
    "format_version",
    "modalities",
    "bands",
    "units",
    "scale_offset",
    "nodata",
    "worldcover_classes",
    "class_frequencies",
    "tile_size",
    "samples_per_shard",
)


@dataclass(frozen=True)
class Encoding:
    """Chunking, sharding and compression of the pixel arrays (defaults chosen by measurement)."""

    samples_per_shard: int = 16
    cname: str = "zstd"
    clevel: int = 1
    shuffle: str = "bitshuffle"
    codec: str = "blosc"
    """``"blosc"`` or ``"zstd"`` (GPU-decodable; see :mod:`terrafm_lightning.store.codecs`)."""
    chunk_checksum: bool = True
    """End every inner chunk with zarr's ``crc32c`` codec (off only to measure its cost or to
    write a store as before checksums were added)."""

    def compressors(self) -> tuple[zarr.abc.codec.BytesBytesCodec, ...]:
        """The codecs applied to every inner chunk of the pixel and WorldCover arrays."""
        return compressors(self.codec, self.clevel, self.cname, self.shuffle, self.chunk_checksum)


@dataclass(frozen=True)
class ArraySpec:
    """One array of the store: per-sample trailing shape, dtype, dimension names, fill value."""

    trailing: tuple[int, ...]
    dtype: str
    dims: tuple[str, ...]
    fill: Any
    pixels: bool = False
    """Chunked one sample x full trailing shape and sharded (else 1-D metadata chunking)."""


def pixel_arrays(modalities: Sequence[str], tile_size: int) -> dict[str, ArraySpec]:
    """Name -> spec of the pixel arrays (one per modality) and the WorldCover raster."""
    out = {
        m: ArraySpec(
            (len(BANDS[m]), tile_size, tile_size),
            PIXEL_DTYPES[m],
            ("sample", f"band_{m}", "y", "x"),
            NODATA[m],
            pixels=True,
        )
        for m in modalities
    }
    out["worldcover"] = ArraySpec(
        (tile_size, tile_size), "uint8", ("sample", "y", "x"), WORLDCOVER_NODATA, pixels=True
    )
    return out


def metadata_arrays(modalities: Sequence[str]) -> dict[str, ArraySpec]:
    """Name -> spec of the per-sample metadata arrays."""
    n_mod, n_classes = len(modalities), len(WORLDCOVER_CODES)
    sample = ("sample",)
    out = {
        "grid_cell": ArraySpec((), "str", sample, ""),
        "tile_index": ArraySpec((), "int8", sample, -1),
        "centre_lat": ArraySpec((), "float64", sample, np.nan),
        "centre_lon": ArraySpec((), "float64", sample, np.nan),
        "crs": ArraySpec((), "str", sample, ""),
        "transform": ArraySpec((6,), "float64", ("sample", "affine"), np.nan),
        "available": ArraySpec((n_mod,), "bool", ("sample", "modality"), False),
        "nodata_fraction": ArraySpec((n_mod,), "float32", ("sample", "modality"), 1.0),
        "worldcover_hist": ArraySpec((n_classes,), "float32", ("sample", "wc_class"), 0.0),
        "worldcover_valid": ArraySpec((), "float32", sample, 0.0),
        "worldcover_coverage": ArraySpec((), "float32", sample, 0.0),
        "dominant_class": ArraySpec((), "uint8", sample, WORLDCOVER_NODATA),
        SKIP_REASON: ArraySpec((), "str", sample, ""),
        DROPPED: ArraySpec((), "bool", sample, False),
        WORLDCOVER_WRITTEN: ArraySpec((), "bool", sample, False),
        WRITTEN: ArraySpec((), "bool", sample, False),
    }
    for m in modalities:
        out[f"time_{m}"] = ArraySpec((), "datetime64[s]", sample, NAT)
    return out


def store_arrays(modalities: Sequence[str], tile_size: int) -> dict[str, ArraySpec]:
    """Every per-sample array of a store holding ``modalities`` (in :data:`MODALITIES` order)."""
    return {**pixel_arrays(modalities, tile_size), **metadata_arrays(modalities)}


def coordinates(modalities: Sequence[str]) -> dict[str, np.ndarray]:
    """Name -> values of the 1-D coordinate arrays (each its own dimension, an xarray index)."""
    out = {f"band_{m}": np.array(BANDS[m]) for m in modalities}
    out["modality"] = np.array(list(modalities))
    out["wc_class"] = np.array(WORLDCOVER_CODES, dtype="uint8")
    return out


def ordered_modalities(modalities: Sequence[str]) -> list[str]:
    """``modalities`` in :data:`MODALITIES` order, without duplicates."""
    return [m for m in MODALITIES if m in set(modalities)]


def nodata_mask(modality: str, pixels: np.ndarray) -> np.ndarray:
    """(y, x) True where any band of ``pixels`` (band, y, x) is nodata."""
    if np.isnan(NODATA[modality]):
        return np.isnan(pixels).any(axis=0)
    if NODATA[modality] == 0 and pixels.dtype.kind == "u":
        return pixels.min(axis=0) == 0  # one reduction, no (band, y, x) boolean temporary
    return (pixels == NODATA[modality]).any(axis=0)
