"""``terrafm-data validate``: check a store against :mod:`store.schema` and report problems.

Every problem is one line naming the array, sample or shard; a damaged or truncated shard is a
problem, never an exception. ``deep`` reads and verifies every stored chunk (its crc32c, then its
decode); stores written before chunk checksums were added are decoded only, and
:func:`validation_notes` says that they carry none.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import zarr

from terrafm_lightning.modalities import BANDS, MODALITIES
from terrafm_lightning.store.format import StoreError, open_store
from terrafm_lightning.store.records import worldcover_summary
from terrafm_lightning.store.schema import (
    DROPPED,
    NODATA,
    REQUIRED_ATTRS,
    SKIP_REASON,
    WORLDCOVER_CODES,
    WORLDCOVER_WRITTEN,
    WRITTEN,
    nodata_mask,
    store_arrays,
)
from terrafm_lightning.store.shard_reader import ShardReader
from terrafm_lightning.store.sharding import chunk_layout


def validate_store(
    path: str,
    deep_samples: int = 16,
    storage_options: Mapping[str, Any] | None = None,
    deep: bool = False,
) -> list[str]:
    """Problems found in the store at ``path`` (empty when it is valid); opens it read-only.

    Checks attributes, every array of the schema (shape, dtype, dimension names), resume
    markers, metadata consistency, and recomputes nodata fractions and WorldCover summaries from
    the pixels of ``deep_samples`` evenly spread written samples. With ``deep``, every stored
    chunk of every pixel array is read, its checksum verified and decoded (:func:`damaged_chunks`).
    """
    try:
        root = open_store(path, storage_options=storage_options)
    except StoreError as err:
        return [str(err)]
    attrs = root.attrs.asdict()
    problems = [f"root attribute {a!r} missing" for a in REQUIRED_ATTRS if a not in attrs]
    if problems:
        return problems
    modalities = list(attrs["modalities"])
    if unknown := [m for m in modalities if m not in MODALITIES]:
        return [f"unknown modalities {unknown} in attribute 'modalities'"]
    problems += [
        f"bands of {m!r} are {attrs['bands'].get(m)}; expected {list(BANDS[m])}"
        for m in modalities
        if attrs["bands"].get(m) != list(BANDS[m])
    ]
    names = set(root.array_keys())
    n = root[WRITTEN].shape[0] if WRITTEN in names else 0
    for name, spec in store_arrays(modalities, int(attrs["tile_size"])).items():
        expected = (n, *spec.trailing)
        if name not in names:
            problems.append(f"array {name!r} missing")
            continue
        array = root[name]
        dtype_ok = array.dtype.kind in "OTU" if spec.dtype == "str" else array.dtype == spec.dtype
        if array.shape != expected or not dtype_ok:
            problems.append(
                f"array {name!r} is {array.shape} {array.dtype}; expected {expected} {spec.dtype}"
            )
        elif tuple(array.metadata.dimension_names or ()) != spec.dims:
            problems.append(
                f"array {name!r} has dimension names {array.metadata.dimension_names}; "
                f"expected {list(spec.dims)} (xarray needs them)"
            )
    if problems:
        return problems
    damaged = damaged_chunks(root, pixel_array_names(root)) if deep else []
    unreadable = {(name, i) for name, samples, _ in damaged for i in samples}
    lines = [line for _, _, line in damaged]
    return lines + _content_problems(root, attrs, modalities, deep_samples, unreadable)


def pixel_array_names(root: zarr.Group) -> list[str]:
    """The sharded pixel arrays of a store: one per modality, then the WorldCover raster."""
    return [*root.attrs["modalities"], "worldcover"]


def validation_notes(path: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Facts about a store that are not problems: pixel arrays without chunk checksums."""
    try:
        root = open_store(path, storage_options=storage_options)
        unchecked = [n for n in pixel_array_names(root) if not chunk_layout(root[n]).chunk_checksum]
    except (StoreError, ValueError, KeyError):
        return []  # validate_store reports why
    if not unchecked:
        return []
    return [
        f"pixel arrays {', '.join(unchecked)} carry no chunk checksums (written before they were "
        "added): damage inside a chunk is found only where it breaks the decode; write the "
        "store again (same command, --overwrite) to add them"
    ]


def damaged_chunks(root: zarr.Group, names: list[str]) -> list[tuple[str, tuple[int, ...], str]]:
    """(array, samples, line) per damaged tile (checksum or decode failure) or unreadable shard.

    Reads shard by shard: the shard's chunks at once, then each verified and decoded.
    """
    try:
        reader = ShardReader(root, names)
    except StoreError as err:
        return [("", (), str(err))]
    problems = []
    for name in names:
        layout = reader.layouts[name]
        per = layout.samples_per_shard
        n = root[name].shape[0]
        out = np.empty(layout.chunk_shape[1:], layout.dtype)
        for first in range(0, n, per):
            samples = list(range(first, min(first + per, n)))
            chunks = reader.chunks([(name, i) for i in samples])
            shard = reader.shard_key(name, first)
            failed = [c for c in chunks if isinstance(c, BaseException)]
            if len(failed) == len(samples):
                line = (
                    f"shard {shard} (samples {samples[0]}..{samples[-1]}) cannot be read: "
                    f"{type(failed[0]).__name__}: {failed[0]}"
                )
                problems.append((name, tuple(samples), line))
                continue
            for i, chunk in zip(samples, chunks, strict=True):
                try:
                    if isinstance(chunk, BaseException):
                        raise chunk
                    if chunk is not None:
                        layout.decode_into(chunk.as_numpy_array(), out)
                except Exception as err:  # any read, checksum or codec failure names the tile
                    line = (
                        f"sample {i}: {name} chunk damaged (shard {shard}): "
                        f"{type(err).__name__}: {err}"
                    )
                    problems.append((name, (i,), line))
    return problems


def _content_problems(
    root: Any,
    attrs: Mapping[str, Any],
    modalities: list[str],
    deep_samples: int,
    unreadable: set[tuple[str, int]],
) -> list[str]:
    """Resume markers, bookkeeping and metadata against pixels (schema already checked).

    Tiles in ``unreadable`` ((array, sample), already reported) are not read again.
    """
    problems = []
    written = root[WRITTEN][:]
    accounted = written | root[DROPPED][:] | (root[SKIP_REASON][:] != "")
    if missing := np.flatnonzero(~accounted).tolist():
        problems.append(
            f"{len(missing)} samples not written (interrupted run? rerun the same command): "
            f"first {missing[:5]}"
        )
    no_wc = np.flatnonzero(written & ~root[WORLDCOVER_WRITTEN][:])
    if len(no_wc):
        problems.append(f"{len(no_wc)} written samples lack WorldCover (run `worldcover`)")
    if (written & ~root["available"][:].any(axis=1)).any():
        problems.append("written samples without any available modality")
    frequencies = attrs["class_frequencies"]
    if frequencies and abs(sum(frequencies.values()) - 1) > 1e-3:
        problems.append(f"class_frequencies sum to {sum(frequencies.values()):.4f}, not 1")
    fractions = root["nodata_fraction"]
    step = max(1, int(written.sum()) // max(deep_samples, 1))
    for i in np.flatnonzero(written)[::step][:deep_samples].tolist():
        for k, m in enumerate(modalities):
            if (m, i) in unreadable:
                continue
            try:
                pixels = root[m][i]
            except Exception as err:  # a damaged or truncated shard: one line, not a traceback
                problems.append(f"sample {i}: {m} cannot be read: {type(err).__name__}: {err}")
                continue
            share = float(nodata_mask(m, pixels).mean())
            if abs(share - fractions[i, k]) > 1e-4:
                problems.append(
                    f"sample {i}: {m} nodata fraction {fractions[i, k]:.4f} in metadata, "
                    f"{share:.4f} in pixels"
                )
            if m != "s1" and share < 1 and pixels[pixels != NODATA[m]].max() > 30000:
                problems.append(f"sample {i}: {m} has DN > 30000 (offset or scale wrong?)")
        if root[WORLDCOVER_WRITTEN][i] and ("worldcover", i) not in unreadable:
            try:
                wc = root["worldcover"][i]
            except Exception as err:
                problems.append(
                    f"sample {i}: worldcover cannot be read: {type(err).__name__}: {err}"
                )
                continue
            if not set(np.unique(wc).tolist()) <= {0, *WORLDCOVER_CODES}:
                problems.append(f"sample {i}: WorldCover codes {np.unique(wc)} not all valid")
            hist, valid, dominant = worldcover_summary(wc)
            if not np.allclose(hist, root["worldcover_hist"][i], atol=1e-5):
                problems.append(f"sample {i}: worldcover_hist does not match the raster")
            if dominant != root["dominant_class"][i]:
                problems.append(f"sample {i}: dominant_class does not match the raster")
            if valid > root["worldcover_coverage"][i] + 1e-5:
                problems.append(f"sample {i}: WorldCover classes outside the maps' coverage")
    return problems
