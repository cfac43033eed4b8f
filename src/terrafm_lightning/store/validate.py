"""``terrafm-data validate``: check a store against the format and report problems."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from terrafm_lightning.modalities import BANDS, MODALITIES
from terrafm_lightning.store.format import (
    NODATA,
    PIXEL_DTYPES,
    WORLDCOVER_CODES,
    WORLDCOVER_WRITTEN,
    WRITTEN,
    StoreError,
    nodata_mask,
    open_store,
    worldcover_summary,
)

REQUIRED_ATTRS = ("modalities", "bands", "units", "scale_offset", "worldcover_classes", "tile_size")


def validate_store(
    path: str, deep_samples: int = 16, storage_options: Mapping[str, Any] | None = None
) -> list[str]:
    """Problems found in the store at ``path`` (empty when it is valid).

    Checks attributes, array shapes/dtypes/dimension names, resume markers, metadata
    consistency, and recomputes nodata fractions and WorldCover summaries from the pixels of
    ``deep_samples`` evenly spread written samples.
    """
    try:
        root = open_store(path, storage_options=storage_options)
    except StoreError as err:
        return [str(err)]
    attrs = root.attrs.asdict()
    problems = [f"root attribute {a!r} missing" for a in REQUIRED_ATTRS if a not in attrs]
    if problems:
        return problems
    size = int(attrs["tile_size"])
    modalities = list(attrs["modalities"])
    names = set(root.array_keys())
    n = root[WRITTEN].shape[0] if WRITTEN in names else 0
    for m in modalities:
        if m not in MODALITIES:
            problems.append(f"unknown modality {m!r} in attribute 'modalities'")
            continue
        expected = (n, len(BANDS[m]), size, size)
        if m not in names:
            problems.append(f"array {m!r} missing")
        elif root[m].shape != expected or root[m].dtype != np.dtype(PIXEL_DTYPES[m]):
            problems.append(
                f"array {m!r} is {root[m].shape} {root[m].dtype}; expected {expected} "
                f"{PIXEL_DTYPES[m]}"
            )
        elif attrs["bands"].get(m) != list(BANDS[m]):
            problems.append(f"bands of {m!r} are {attrs['bands'].get(m)}; expected {BANDS[m]}")
    for name in ("worldcover", WRITTEN, WORLDCOVER_WRITTEN, "available", "nodata_fraction"):
        if name not in names:
            problems.append(f"array {name!r} missing")
        elif root[name].metadata.dimension_names is None:
            problems.append(f"array {name!r} has no dimension names (xarray cannot open it)")
    if problems:
        return problems
    written = root[WRITTEN][:]
    skipped = {int(k) for k in attrs.get("skipped", {})}
    unfinished = np.flatnonzero(~written)
    if missing := [int(i) for i in unfinished if int(i) not in skipped]:
        problems.append(
            f"{len(missing)} samples not written (interrupted run? rerun the same command): "
            f"first {missing[:5]}"
        )
    no_wc = np.flatnonzero(written & ~root[WORLDCOVER_WRITTEN][:])
    if len(no_wc):
        problems.append(f"{len(no_wc)} written samples lack WorldCover (run `worldcover`)")
    available = root["available"][:]
    if (written & ~available.any(axis=1)).any():
        problems.append("written samples without any available modality")
    frequencies = attrs.get("class_frequencies", {})
    if frequencies and abs(sum(frequencies.values()) - 1) > 1e-3:
        problems.append(f"class_frequencies sum to {sum(frequencies.values()):.4f}, not 1")
    fractions = root["nodata_fraction"]
    for i in np.flatnonzero(written)[:: max(1, written.sum() // max(deep_samples, 1))][
        :deep_samples
    ]:
        for k, m in enumerate(modalities):
            pixels = root[m][int(i)]
            share = float(nodata_mask(m, pixels).mean())
            if abs(share - fractions[int(i), k]) > 1e-4:
                problems.append(
                    f"sample {i}: {m} nodata fraction {fractions[int(i), k]:.4f} in metadata, "
                    f"{share:.4f} in pixels"
                )
            if m != "s1" and share < 1 and pixels[pixels != NODATA[m]].max() > 30000:
                problems.append(f"sample {i}: {m} has DN > 30000 (offset or scale wrong?)")
        if root[WORLDCOVER_WRITTEN][int(i)]:
            wc = root["worldcover"][int(i)]
            if not set(np.unique(wc).tolist()) <= {0, *WORLDCOVER_CODES}:
                problems.append(f"sample {i}: WorldCover codes {np.unique(wc)} not all valid")
            hist, _, dominant = worldcover_summary(wc)
            if not np.allclose(hist, root["worldcover_hist"][int(i)], atol=1e-5):
                problems.append(f"sample {i}: worldcover_hist does not match the raster")
            if dominant != root["dominant_class"][int(i)]:
                problems.append(f"sample {i}: dominant_class does not match the raster")
    return problems
