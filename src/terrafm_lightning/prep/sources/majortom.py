"""``terrafm-data majortom``: Major-TOM Core-S1RTC / Core-S2L1C / Core-S2L2A parquet -> store.

Each modality root holds ``metadata.parquet`` (``grid_cell``, ``product_id``, ``timestamp``,
``parquet_url``, ``parquet_row``, ...) and the image parquet files it points to (looked up by
file name in the root or its ``images/`` folder). Cells are joined by ``grid_cell`` (all three
modalities by default) and each cell (1068 px) is cut into row-major tiles (4 x 534 px).

Radiometry rules:
- S1 RTC comes as linear gamma0 with nodata -32768: nodata, non-finite and non-positive values
  become NaN, the rest 10*log10 (dB); a negative valid value (a dB file) is refused
  (:mod:`terrafm_lightning.prep.units`), as is float S2 or S2 outside 0..65535.
- S2: products of processing baseline >= 04.00 carry a +1000 DN offset. The baseline is read
  from the product id (``_Nxxyy_``); when the id has none, products acquired on or after
  2022-01-25 (the baseline 04.00 switch) are taken to carry it. The offset is subtracted from
  valid pixels (clipped to 1 so they stay valid; 0 stays nodata).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import rasterio
from rasterio.io import MemoryFile

from terrafm_lightning.modalities import BANDS, MODALITIES
from terrafm_lightning.prep.driver import PrepReport
from terrafm_lightning.prep.errors import InputError
from terrafm_lightning.prep.fetch import is_remote, parquet_file, with_retries
from terrafm_lightning.prep.gaps import gap_reason
from terrafm_lightning.prep.pairing import pair_inputs
from terrafm_lightning.prep.raster import GDAL_READ_OPTIONS, align, tile_transform, tile_window
from terrafm_lightning.prep.units import s1_to_db, s2_to_dn
from terrafm_lightning.prep.writer import write_tiles
from terrafm_lightning.store.records import Sample
from terrafm_lightning.store.schema import NODATA, Encoding

COLUMNS: dict[str, tuple[str, ...]] = {
    "s1": ("vv", "vh"),
    "s2_l1c": BANDS["s2_l1c"],
    "s2_l2a": BANDS["s2_l2a"],
}
"""Major-TOM band columns read per modality (L1C's B10 column is not read)."""
S1_NODATA = -32768.0


def row_columns(modality: str) -> tuple[str, ...]:
    """The columns read from a product's row: its cell and product id (checked), its bands."""
    return ("grid_cell", "product_id", *COLUMNS[modality])


S2_OFFSET = 1000
OFFSET_SINCE = np.datetime64("2022-01-25")
_BASELINE = re.compile(r"_N(\d{4})_")


def has_offset(product_id: str, timestamp: np.datetime64) -> bool:
    """Whether an S2 product carries the +1000 DN offset (baseline >= 04.00)."""
    match = _BASELINE.search(product_id)
    if match:
        return int(match.group(1)) >= 400
    return bool(np.datetime64(timestamp, "D") >= OFFSET_SINCE)


def harmonise_s2(dn: np.ndarray, offset: bool) -> np.ndarray:
    """uint16 ``dn`` with the baseline offset removed; nodata 0 kept, valid DN stay >= 1.

    Changed in place (no 27 MB temporary per cell and modality).
    """
    if not offset:
        return dn
    nodata = dn == 0
    np.maximum(dn, S2_OFFSET + 1, out=dn)  # uint16 throughout: DN 1..1000 end at 1 (valid)
    dn -= S2_OFFSET
    np.copyto(dn, 0, where=nodata)
    return dn


METADATA_COLUMNS = ("grid_cell", "product_id", "timestamp", "parquet_url", "parquet_row")
"""Columns every Major-TOM metadata parquet must have (others are read when present)."""


def check_metadata(meta: pd.DataFrame, where: str) -> None:
    """Raise naming ``where`` when a metadata table lacks a needed column."""
    if missing := set(METADATA_COLUMNS) - set(meta.columns):
        raise InputError(
            f"{where} lacks columns {sorted(missing)}: not a Major-TOM metadata parquet "
            f"(needs {list(METADATA_COLUMNS)})"
        )


def read_metadata(root: Path) -> pd.DataFrame:
    """A modality's metadata table, with the image file resolved locally."""
    path = root / "metadata.parquet"
    try:
        meta = pq.read_table(path).to_pandas()
    except Exception as err:
        raise InputError(f"cannot read Major-TOM metadata {path}: {err}") from err
    check_metadata(meta, str(path))

    def local(url: str) -> str:
        name = Path(str(url)).name
        for candidate in (root / name, root / "images" / name):
            if candidate.exists():
                return str(candidate)
        raise InputError(f"{path}: image parquet {name} not found in {root} or {root}/images")

    meta["file"] = [local(u) for u in meta["parquet_url"]]
    return meta.drop_duplicates("grid_cell", keep="first")


def plan_cells(
    roots: Mapping[str, Path], require_all: bool
) -> tuple[list[dict[str, dict[str, Any]]], list[str]]:
    """Per grid cell (sorted), modality -> {file, row, product_id, timestamp}, and notes.

    The notes list each input of a cell lacking a modality, one line each.
    """
    tables = {m: read_metadata(Path(r)) for m, r in roots.items()}
    return plan_from_tables(tables, require_all, ", ".join(str(r) for r in roots.values()))


def plan_from_tables(
    tables: Mapping[str, pd.DataFrame], require_all: bool, places: str
) -> tuple[list[dict[str, dict[str, Any]]], list[str]]:
    """:func:`plan_cells` from metadata tables (one product per ``grid_cell``, ``file`` set).

    Args:
        tables: modality -> metadata with a ``file`` column (the image parquet to read).
        require_all: keep only cells present in every modality.
        places: where the tables come from (for the notes).
    """
    tables = {m: t.set_index("grid_cell") for m, t in tables.items()}
    found = {
        c: {m: f"{t.at[c, 'file']} row {t.at[c, 'parquet_row']} ({c})" for m, t in tables.items()
            if c in t.index}
        for c in sorted(set().union(*(t.index for t in tables.values())))
    }  # fmt: skip
    cells, notes = pair_inputs(
        found, list(tables), require_all, f"in {places}", "check that they share grid_cell values"
    )
    planned = [
        {
            m: {
                "file": t.at[c, "file"],
                "row": int(t.at[c, "parquet_row"]),
                "product_id": str(t.at[c, "product_id"]),
                "timestamp": str(np.datetime64(pd.Timestamp(t.at[c, "timestamp"]), "s")),
            }
            for m, t in tables.items()
            if c in t.index
        }
        | {"_cell": c}
        for c in cells
    ]
    return planned, notes


def _row(file: str, row: int, columns: Sequence[str]) -> dict[str, Any]:
    """One parquet row (the row group holding it, then the row), restricted to ``columns``.

    A remote ``file`` is read with ranged requests (its footer, then the selected column chunks
    of that one row group), retried on transient failures. Binary values come back as zero-copy
    ``pyarrow`` buffers, other values as Python objects.
    """
    if is_remote(file):
        return with_retries(lambda: _read_row(file, row, columns), file)
    try:
        return _read_row(file, row, columns)
    except InputError:
        raise
    except Exception as err:
        raise InputError(f"cannot read row {row} of {file}: {err}") from err


def _read_row(file: str, row: int, columns: Sequence[str]) -> dict[str, Any]:
    with parquet_file(file) as meta:
        if missing := [c for c in columns if c not in meta.schema_arrow.names]:
            raise InputError(
                f"{file} has no columns {missing} (the metadata's product needs them; is the "
                "metadata parquet from the same Major-TOM dataset?)"
            )
        start = 0
        for group in range(meta.num_row_groups):
            rows = meta.metadata.row_group(group).num_rows
            if row < start + rows:
                # One thread, as every prep worker (arrow would decode columns on all cores).
                table = meta.read_row_group(group, columns=list(columns), use_threads=False)
                if table.num_rows != rows:
                    raise InputError(f"{file} row group {group}: {table.num_rows} of {rows} rows")
                values = {}
                for name in table.column_names:
                    value = table.column(name)[row - start]
                    is_binary = pa.types.is_binary(value.type) or pa.types.is_large_binary(
                        value.type
                    )
                    values[name] = value.as_buffer() if is_binary else value.as_py()
                return values
            start += rows
    raise InputError(f"{file} has no row {row} (it holds {start}; the metadata is of another file)")


@lru_cache(maxsize=6)
def decode_cell(
    modality: str, file: str, row: int, product_id: str, timestamp: str
) -> tuple[np.ndarray, rasterio.crs.CRS, rasterio.Affine]:
    """A cell's bands (band, y, x) in store units, with the grid of its first band.

    Cached for the tiles cut from the cell (two cells of three modalities per process).

    Raises:
        InputError: the row is missing, lacks a band, or holds another product than the
            metadata's ``product_id``.
    """
    columns = COLUMNS[modality]
    values = _row(file, row, row_columns(modality))
    if values["product_id"] != product_id:
        raise InputError(
            f"{file} row {row} holds product {values['product_id']}, the metadata says "
            f"{product_id} (metadata and image parquets out of step: fetch both again)"
        )
    stack, grid = None, None
    with rasterio.Env(**GDAL_READ_OPTIONS):  # one GDAL environment for all bands
        for k, column in enumerate(columns):
            blob = values.get(column)
            if blob is None or not blob.size:
                raise InputError(f"{file} row {row} ({values['grid_cell']}): empty column {column}")
            try:
                with MemoryFile(memoryview(blob)) as mem, mem.open(driver="GTiff") as src:
                    this = (src.crs, src.transform, src.shape)
                    if grid is None:
                        grid = this
                        stack = np.empty((len(columns), *src.shape), src.dtypes[0])
                    if (
                        this[0] != grid[0]
                        or this[2] != grid[2]
                        or not this[1].almost_equals(grid[1])
                    ):
                        raise InputError(
                            f"{file} row {row} ({values['grid_cell']}) column {column}: grid "
                            f"{this[2]} differs from column {columns[0]} {grid[2]}"
                        )
                    src.read(1, out=stack[k])  # straight into the stack: no per-band copy
            except rasterio.errors.RasterioError as err:
                raise InputError(
                    f"{file} row {row} ({values['grid_cell']}) column {column}: "
                    f"not a GeoTIFF: {err}"
                ) from err
    source = f"{file} row {row} ({values['grid_cell']})"
    if modality == "s1":
        data = s1_to_db(stack, S1_NODATA, source, linear=True)
    else:
        dn = s2_to_dn(modality, stack, None, source, None)
        data = harmonise_s2(dn, has_offset(product_id, np.datetime64(timestamp)))
    return data, grid[0], grid[1]


def majortom_sample(
    cells: Sequence[Mapping[str, Any]], tile_size: int, tiles_per_side: int, index: int
) -> Sample:
    """Tile ``index % tiles**2`` of cell ``index // tiles**2``, S1 aligned onto the S2 grid."""
    cell, tile_index = divmod(index, tiles_per_side**2)
    sources = {m: cells[cell][m] for m in MODALITIES if m in cells[cell]}
    decoded = {m: decode_cell(m, **s) for m, s in sources.items()}
    _, crs, transform = decoded[_reference(decoded)]
    shape = (tile_size * tiles_per_side,) * 2
    rows, cols = tile_window(tile_index, tiles_per_side, tile_size)
    pixels = {}
    for m, (data, src_crs, src_transform) in decoded.items():
        data = align(data, src_crs, src_transform, crs, transform, shape, NODATA[m])
        if data.shape[1:] != shape:
            raise InputError(
                f"{sources[m]['file']} row {sources[m]['row']} ({cells[cell]['_cell']}): "
                f"{data.shape[1:]} px, expected {shape}"
            )
        pixels[m] = data[:, rows, cols]  # a view: the shard write makes the one copy
    return Sample(
        pixels=pixels,
        grid_cell=cells[cell]["_cell"],
        tile_index=tile_index,
        crs=crs.to_string(),
        transform=tile_transform(transform, tile_index, tiles_per_side, tile_size),
        times={m: np.datetime64(s["timestamp"], "s") for m, s in sources.items()},
    )


def _reference(modalities: Collection[str]) -> str:
    """The modality whose grid the others are aligned onto (S2 L2A, else L1C, else S1)."""
    return next(m for m in ("s2_l2a", "s2_l1c", "s1") if m in modalities)


def majortom_gap(
    cells: Sequence[Mapping[str, Any]],
    tile_size: int,
    tiles_per_side: int,
    index: int,
    modality: str,
) -> tuple[str, str]:
    """(reason, input) of sample ``index``'s ``modality`` input having no valid pixel."""
    cell, tile_index = divmod(index, tiles_per_side**2)
    sources = {m: cells[cell][m] for m in MODALITIES if m in cells[cell]}
    _, crs, transform = decode_cell(_reference(sources), **sources[_reference(sources)])
    data, src_crs, src_transform = decode_cell(modality, **sources[modality])
    tile = rasterio.Affine(*tile_transform(transform, tile_index, tiles_per_side, tile_size))
    name = f"{sources[modality]['file']} row {sources[modality]['row']} ({cells[cell]['_cell']})"
    return gap_reason(modality, data, src_crs, src_transform, crs, tile, tile_size), name


def prepare_majortom(
    roots: Mapping[str, str],
    path: str,
    tile_size: int = 534,
    cell_size: int = 1068,
    require_all: bool = True,
    *,
    keep_partial: bool = False,
    encoding: Encoding | None = None,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    **run_options: Any,
) -> PrepReport:
    """Write (or finish writing) a store from local Major-TOM Core parquet files.

    Args:
        roots: modality -> folder with ``metadata.parquet`` and the image parquet files.
        path: output store.
        tile_size: tile size (cells are cut into (cell_size / tile_size)**2 tiles).
        cell_size: Major-TOM cell size in pixels (1068).
        require_all: keep only cells present in every given modality.
        keep_partial: keep tiles where some input has no valid pixel (that modality marked
            unavailable) instead of refusing them.
        encoding: store chunking/compression.
        overwrite: replace an existing store at ``path``.
        storage_options: fsspec options of the output store.
        **run_options: options of :func:`driver.run_shards`.

    Returns:
        The run's report; ``notes`` lists the inputs of cells lacking a modality.
    """
    cells, notes = plan_cells({m: Path(r) for m, r in roots.items()}, require_all)
    return write_cells(
        cells,
        notes,
        [m for m in MODALITIES if m in roots],
        path,
        tile_size,
        cell_size,
        "terrafm-data majortom " + " ".join(f"{m}={r}" for m, r in roots.items()),
        encoding=encoding,
        overwrite=overwrite,
        storage_options=storage_options,
        keep_partial=keep_partial,
        **run_options,
    )


def write_cells(
    cells: Sequence[Mapping[str, Any]],
    notes: list[str],
    modalities: Sequence[str],
    path: str,
    tile_size: int,
    cell_size: int,
    source: str,
    **write_options: Any,
) -> PrepReport:
    """Tile planned cells (see :func:`plan_from_tables`) into the store at ``path``.

    Args:
        cells: the planned cells.
        notes: lines to report (unpaired inputs).
        modalities: modalities that get an array.
        path: output store.
        tile_size: tile size in pixels.
        cell_size: Major-TOM cell size in pixels.
        source: the store's ``source`` attribute (the command that made it).
        **write_options: options of :func:`writer.write_tiles` (encoding, overwrite, run options).
    """
    if cell_size % tile_size:
        raise InputError(f"cell size {cell_size} is not a multiple of tile size {tile_size}")
    tiles_per_side = cell_size // tile_size
    cells = list(cells)
    plan = {"kind": "majortom", "cells": cells, "tile_size": tile_size, "cell_size": cell_size}
    report = write_tiles(
        path,
        partial(majortom_sample, cells, tile_size, tiles_per_side),
        len(cells) * tiles_per_side**2,
        tile_size,
        modalities,
        plan,
        source,
        explain_gap=partial(majortom_gap, cells, tile_size, tiles_per_side),
        **write_options,
    )
    report.notes = notes + report.notes
    return report
