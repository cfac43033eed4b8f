r"""``terrafm-data geotiff``: folders of co-registered S1 / S2-L1C / S2-L2A GeoTIFFs -> store.

Matching rule: one folder per modality under the source root (``S1RTC``, ``S2L1C``, ``S2L2A`` by
default, as the TerraMind examples; searched recursively for ``*.tif`` / ``*.tiff``); files with
the same location key are one location. The key is the file stem, or, with ``match`` (a regular
expression matched against the whole file name), its named groups joined by ``_`` (SEN12MS:
``(?P<scene>.+)_s[12]_(?P<patch>\d+_p\d+)\.tif`` pairs ``ROIs1158_spring_s1_1_p1.tif`` with
``..._s2_1_p1.tif``). Files whose key lacks a modality are listed as unpaired and left out (or kept
with ``require_all=False``); a modality whose folder is ``None`` gets no array. The S2 L2A grid
(else L1C, else S1) is the reference; other modalities are reprojected onto it (nearest, so stored
values are source values) when their grid differs. Files larger than the tile size are cut into
row-major tiles. Pixels are checked against the modality's unit and converted only as asked
(:mod:`terrafm_lightning.prep.units`); the first location is checked before the store is made.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.crs import CRS

from terrafm_lightning.modalities import MODALITIES
from terrafm_lightning.prep.driver import PrepReport
from terrafm_lightning.prep.errors import InputError
from terrafm_lightning.prep.gaps import gap_reason
from terrafm_lightning.prep.pairing import pair_inputs
from terrafm_lightning.prep.raster import align, read_geotiff, tile_transform, tile_window
from terrafm_lightning.prep.units import UnitConversion, to_store_units
from terrafm_lightning.prep.writer import write_tiles
from terrafm_lightning.store.records import Sample
from terrafm_lightning.store.schema import NODATA, Encoding

DEFAULT_FOLDERS: dict[str, str | None] = {"s1": "S1RTC", "s2_l1c": "S2L1C", "s2_l2a": "S2L2A"}
GRID_PRIORITY = ("s2_l2a", "s2_l1c", "s1")
SUFFIXES = (".tif", ".tiff")


@dataclass
class GeoTiffPlan:
    """The matched inputs: per location (sorted by key) modality -> file, and what is left out."""

    locations: list[dict[str, str]]
    keys: list[str]
    modalities: list[str]
    notes: list[str] = field(default_factory=list)


def _option(modality: str) -> str:
    return f"--{modality.replace('_', '-')}-folder"


def location_key(name: str, pattern: re.Pattern | None) -> str | None:
    """The location key of a file name: its stem, or the joined named groups of ``pattern``."""
    if pattern is None:
        return Path(name).stem
    found = pattern.fullmatch(name)
    return "_".join(found.groupdict().values()) if found else None


def plan_geotiffs(
    root: Path,
    folders: Mapping[str, str | None],
    require_all: bool = True,
    match: str | None = None,
) -> GeoTiffPlan:
    """Match the files of the modality folders under ``root`` into locations.

    Raises:
        InputError: naming the folder or file: a missing or empty folder, a key found twice in
            one folder, a bad pattern, or no location left to write.
    """
    pattern = None
    if match is not None:
        try:
            pattern = re.compile(match)
        except re.error as err:
            raise InputError(f"--match {match!r} is not a regular expression: {err}") from err
        if not pattern.groupindex:
            raise InputError(f"--match {match!r} has no named group (?P<name>...) for the key")
    used = {m: f for m, f in folders.items() if f is not None and m in MODALITIES}
    if not used:
        raise InputError("every modality folder is 'none': nothing to prepare")
    files: dict[str, dict[str, str]] = {}
    notes: list[str] = []
    for m, folder in used.items():
        directory = root / folder
        if not directory.is_dir():
            raise InputError(
                f"{directory}: {m} folder not found; name it with {_option(m)} NAME, or pass "
                f"{_option(m)} none to prepare without {m}"
            )
        paths = sorted(p for p in directory.rglob("*") if p.suffix.lower() in SUFFIXES)
        if not paths:
            raise InputError(f"{directory}: no *.tif files for {m}")
        matched = 0
        for path in paths:
            key = location_key(path.name, pattern)
            if key is None:
                notes.append(f"ignored (name does not match --match): {path}")
                continue
            if (other := files.setdefault(key, {}).get(m)) is not None:
                raise InputError(f"{path} and {other} both have location key {key!r} for {m}")
            files[key][m] = str(path)
            matched += 1
        if not matched:
            raise InputError(f"{directory}: no file name matches --match {match!r}")
    keys, unpaired = pair_inputs(
        files,
        list(used),
        require_all,
        f"under {root}",
        "the file names must share a stem (or give --match)",
    )
    return GeoTiffPlan([files[k] for k in keys], keys, list(used), notes + unpaired)


@lru_cache(maxsize=2)
def decode_location(
    files: tuple[tuple[str, str], ...], size: int, conversion: UnitConversion | None = None
) -> tuple[dict[str, np.ndarray], CRS, rasterio.Affine, dict[str, np.datetime64]]:
    """(pixels, crs, transform, times) of one location in store units on the reference grid.

    Cached: the tiles cut from one file decode it once.

    Raises:
        InputError: naming the file that cannot be read, co-registered or converted.
    """
    paths = dict(files)
    decoded = {m: read_geotiff(Path(paths[m]), m) for m in GRID_PRIORITY if m in paths}
    _, crs, transform, _, _ = next(iter(decoded.values()))
    pixels: dict[str, np.ndarray] = {}
    times: dict[str, np.datetime64] = {}
    for m, (raw, src_crs, src_transform, nodata, tags) in decoded.items():
        path = paths[m]
        if src_crs is None:
            raise InputError(f"{path} has no CRS; cannot co-register it")
        data = to_store_units(m, raw, nodata, path, conversion)
        pixels[m] = align(data, src_crs, src_transform, crs, transform, (size, size), NODATA[m])
        if pixels[m].shape[1:] != (size, size):
            raise InputError(f"{path} is {data.shape[1:]} px; expected {(size, size)} (tile size)")
        if "datetime" in tags:
            times[m] = np.datetime64(tags["datetime"][:19], "s")
    return pixels, crs, transform, times


def geotiff_sample(
    locations: Sequence[Mapping[str, str]],
    keys: Sequence[str],
    tile_size: int,
    tiles_per_side: int,
    conversion: UnitConversion | None,
    index: int,
) -> Sample:
    """Sample ``index``: tile ``index % tiles**2`` of location ``index // tiles**2``."""
    location, tile_index = divmod(index, tiles_per_side**2)
    files = tuple(sorted(locations[location].items()))
    pixels, crs, transform, times = decode_location(files, tile_size * tiles_per_side, conversion)
    rows, cols = tile_window(tile_index, tiles_per_side, tile_size)
    return Sample(
        pixels={m: p[:, rows, cols] for m, p in pixels.items()},  # views; the shard write copies
        grid_cell=keys[location],
        tile_index=tile_index,
        crs=crs.to_string(),
        transform=tile_transform(transform, tile_index, tiles_per_side, tile_size),
        times=dict(times),
    )


def geotiff_gap(
    locations: Sequence[Mapping[str, str]],
    tile_size: int,
    tiles_per_side: int,
    conversion: UnitConversion | None,
    index: int,
    modality: str,
) -> tuple[str, str]:
    """(reason, file) of sample ``index``'s ``modality`` input having no valid pixel."""
    location, tile_index = divmod(index, tiles_per_side**2)
    files = tuple(sorted(locations[location].items()))
    _, crs, transform, _ = decode_location(files, tile_size * tiles_per_side, conversion)
    path = locations[location][modality]
    raw, src_crs, src_transform, nodata, _ = read_geotiff(Path(path), modality)
    data = to_store_units(modality, raw, nodata, path, conversion)
    tile = rasterio.Affine(*tile_transform(transform, tile_index, tiles_per_side, tile_size))
    return gap_reason(modality, data, src_crs, src_transform, crs, tile, tile_size), path


def prepare_geotiff(
    source: str,
    path: str,
    tile_size: int | None = None,
    folders: Mapping[str, str | None] | None = None,
    require_all: bool = True,
    match: str | None = None,
    *,
    conversion: UnitConversion | None = None,
    keep_partial: bool = False,
    encoding: Encoding | None = None,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    **run_options: Any,
) -> PrepReport:
    """Write (or finish writing) a store from GeoTIFF folders under ``source`` (public API).

    Args:
        source: root folder holding one sub-folder per modality.
        path: output store.
        tile_size: tile size; default the reference raster size (no cutting).
        folders: modality -> sub-folder name, None for no such modality (default
            :data:`DEFAULT_FOLDERS`; modalities not named use their default folder).
        require_all: keep only locations with every modality.
        match: regular expression with named groups for the location key (default: stem).
        conversion: unit conversions of the inputs (default: none; inputs must be in store
            units).
        keep_partial: keep tiles where some input has no valid pixel (that modality marked
            unavailable) instead of refusing them.
        encoding: store chunking/compression.
        overwrite: replace an existing store at ``path``.
        storage_options: fsspec options of the output store.
        **run_options: options of :func:`driver.run_shards`.

    Returns:
        The run's report; ``notes`` lists unpaired and ignored files.
    """
    plan = plan_geotiffs(
        Path(source), {**DEFAULT_FOLDERS, **dict(folders or {})}, require_all, match
    )
    reference = next(m for m in GRID_PRIORITY if m in plan.locations[0])
    first = plan.locations[0][reference]
    full = read_geotiff(Path(first), reference)[0].shape[-1]
    tile_size = tile_size or full
    if full % tile_size:
        raise InputError(f"{first} is {full} px wide, not a multiple of tile size {tile_size}")
    tiles_per_side = full // tile_size
    # A unit mismatch is usually the whole dataset's: found here, before anything is written.
    decode_location(tuple(sorted(plan.locations[0].items())), full, conversion)
    digest = {
        "kind": "geotiff",
        "locations": plan.locations,
        "tile_size": tile_size,
        **({"keys": plan.keys} if match else {}),
        **(conversion.plan() if conversion else {}),
    }
    report = write_tiles(
        path,
        partial(geotiff_sample, plan.locations, plan.keys, tile_size, tiles_per_side, conversion),
        len(plan.locations) * tiles_per_side**2,
        tile_size,
        plan.modalities,
        digest,
        f"terrafm-data geotiff {source}",
        encoding=encoding,
        overwrite=overwrite,
        storage_options=storage_options,
        explain_gap=partial(geotiff_gap, plan.locations, tile_size, tiles_per_side, conversion),
        keep_partial=keep_partial,
        **run_options,
    )
    report.notes = plan.notes + report.notes
    return report
