"""``terrafm-data majortom-remote``: a Major-TOM Core subset streamed into a store.

Products are selected from the published metadata parquets (bounding box on the cell centre,
grid cells, time range, cloud cover, nodata share, number of cells), joined by ``grid_cell`` as
:mod:`~terrafm_lightning.prep.sources.majortom` does, and only the selected row groups of the
image parquets are read (the parquet footer, then that product's band columns, through fsspec
range requests). Tiles go through the same decoder and store writer as ``terrafm-data majortom``,
so the store equals the one made from the same files on disk.

Where things are: ``base_url`` holds one folder per dataset (``Core-S1RTC``, ``Core-S2L1C``,
``Core-S2L2A``), each with ``metadata.parquet`` and ``images/<part>.parquet``; a ``{name}`` in
``base_url`` is replaced by the dataset name instead (the Hugging Face default,
``.../Major-TOM/{name}/resolve/main``). The image parquet of a product is the file named by
its ``parquet_url`` in that ``images/`` folder, so a mirror, a local copy or an ``s3://`` bucket
(credentials and endpoint from the usual AWS environment variables) work the same.
"""

from __future__ import annotations

import io
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from terrafm_lightning.modalities import MODALITIES
from terrafm_lightning.prep.driver import PrepReport
from terrafm_lightning.prep.errors import InputError
from terrafm_lightning.prep.fetch import parquet_file, read_bytes, with_retries
from terrafm_lightning.prep.sources.majortom import (
    check_metadata,
    plan_from_tables,
    row_columns,
    write_cells,
)

DATASETS = {"s1": "Core-S1RTC", "s2_l1c": "Core-S2L1C", "s2_l2a": "Core-S2L2A"}
"""The Major-TOM Core dataset of each modality."""
DEFAULT_BASE_URL = "https://huggingface.co/datasets/Major-TOM/{name}/resolve/main"
"""The published datasets on Hugging Face (``{name}``: the dataset)."""


@dataclass(frozen=True)
class Selection:
    """Which products to take (every filter given must hold; ``None`` means no filter).

    Attributes:
        bbox: (west, south, east, north) in degrees, on the cell centre (``centre_lon/lat``).
        grid_cells: Major-TOM grid cells (``282D_485L``...).
        start: first acquisition time (inclusive, ISO 8601).
        end: last acquisition time (inclusive; a date means the whole day).
        max_cloud: most ``cloud_cover`` (percent, S2 only: S1 has none).
        max_nodata: most ``nodata`` share (0..1).
        cells: keep the first ``cells`` grid cells (sorted by name) of the joined selection.
    """

    bbox: tuple[float, float, float, float] | None = None
    grid_cells: tuple[str, ...] | None = None
    start: str | None = None
    end: str | None = None
    max_cloud: float | None = None
    max_nodata: float | None = None
    cells: int | None = None

    def describe(self) -> str:
        """The filters given, for messages."""
        given = {k: v for k, v in self.__dict__.items() if v is not None}
        return ", ".join(f"{k}={v}" for k, v in given.items()) or "no filter"


def dataset_root(base_url: str, modality: str) -> str:
    """The folder (URL) of a modality's Major-TOM dataset under ``base_url``."""
    name = DATASETS[modality]
    base = base_url.rstrip("/")
    return base.replace("{name}", name) if "{name}" in base else f"{base}/{name}"


def read_remote_metadata(root: str) -> pd.DataFrame:
    """``<root>/metadata.parquet`` with a ``file`` column: the image parquet of each product.

    Raises:
        InputError: the metadata cannot be read, or lacks the Major-TOM columns.
    """
    url = f"{root}/metadata.parquet"
    try:
        data = read_bytes(url)
    except InputError as err:
        hint = f"check --base-url: it must hold {posixpath.basename(root)}/"
        raise InputError(f"{err} ({hint})") from err
    try:
        meta = pq.read_table(io.BytesIO(data)).to_pandas()
    except Exception as err:
        raise InputError(f"{url} is not a parquet file: {err}") from err
    check_metadata(meta, url)
    meta["file"] = [f"{root}/images/{posixpath.basename(str(u))}" for u in meta["parquet_url"]]
    return meta


def select(meta: pd.DataFrame, selection: Selection, where: str) -> pd.DataFrame:
    """The products of ``meta`` passing ``selection``'s filters, one per grid cell (the first).

    Raises:
        InputError: a filter needs a column that ``meta`` lacks.
    """

    def column(name: str) -> pd.Series:
        if name not in meta.columns:
            raise InputError(f"{where} has no {name} column, needed by the selection")
        return meta[name]

    keep = np.ones(len(meta), bool)
    if selection.bbox is not None:
        west, south, east, north = selection.bbox
        lon, lat = column("centre_lon"), column("centre_lat")
        keep &= (lon >= west) & (lon <= east) & (lat >= south) & (lat <= north)
    if selection.grid_cells is not None:
        keep &= meta["grid_cell"].isin(selection.grid_cells).to_numpy()
    times = pd.to_datetime(meta["timestamp"], utc=True).dt.tz_localize(None)
    if selection.start is not None:
        keep &= (times >= pd.Timestamp(selection.start).tz_localize(None)).to_numpy()
    if selection.end is not None:
        end = pd.Timestamp(selection.end).tz_localize(None)
        if "T" in selection.end:
            keep &= (times <= end).to_numpy()
        else:  # a date: the whole day
            keep &= (times < end + pd.Timedelta(days=1)).to_numpy()
    if selection.max_cloud is not None and "cloud_cover" in meta.columns:
        keep &= (meta["cloud_cover"] <= selection.max_cloud).to_numpy()
    if selection.max_nodata is not None:
        keep &= (column("nodata") <= selection.max_nodata).to_numpy()
    return meta[keep].drop_duplicates("grid_cell", keep="first")


def plan_remote(
    base_url: str,
    modalities: Sequence[str],
    selection: Selection,
    require_all: bool = True,
) -> tuple[list[dict[str, Any]], list[str]]:
    """The planned cells of a selection (as :func:`majortom.plan_from_tables`) and notes.

    Raises:
        InputError: unreadable metadata, or a selection matching no cell.
    """
    tables = {}
    for m in modalities:
        root = dataset_root(base_url, m)
        tables[m] = select(read_remote_metadata(root), selection, f"{root}/metadata.parquet")
    places = ", ".join(dataset_root(base_url, m) for m in modalities)
    empty = [m for m, t in tables.items() if t.empty]
    if len(empty) == len(tables) or (require_all and empty):
        counts = ", ".join(f"{len(t)} {m} products" for m, t in tables.items())
        raise InputError(
            f"the selection ({selection.describe()}) matches no "
            f"{'cell with every modality' if require_all else 'cell'} in {places} ({counts}); "
            "widen the bounding box, time range or cloud/nodata limits"
            + (", or pass --allow-missing" if require_all else "")
        )
    cells, notes = plan_from_tables(tables, require_all, places)
    if selection.cells is not None:
        cells = cells[: selection.cells]
    return cells, notes


def fetch_bytes(cells: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Per modality, the compressed bytes of the band columns the cells' rows hold.

    Reads the footer of each image parquet involved (one ranged read per file).
    """
    wanted: dict[str, dict[str, set[int]]] = {}
    for cell in cells:
        for m in MODALITIES:
            if m in cell:
                wanted.setdefault(m, {}).setdefault(cell[m]["file"], set()).add(cell[m]["row"])
    total: dict[str, int] = {}
    for m, files in wanted.items():
        columns = set(row_columns(m))
        for file, rows in files.items():
            meta = with_retries(lambda f=file: _footer(f), file)
            total[m] = total.get(m, 0) + sum(
                row_group_bytes(meta, group, columns) for group in row_groups(meta, rows)
            )
    return total


def _footer(file: str) -> pq.FileMetaData:
    with parquet_file(file) as f:
        return f.metadata


def row_groups(meta: pq.FileMetaData, rows: set[int]) -> list[int]:
    """The row groups of a parquet file holding ``rows``."""
    groups, start = [], 0
    for group in range(meta.num_row_groups):
        n = meta.row_group(group).num_rows
        if any(start <= r < start + n for r in rows):
            groups.append(group)
        start += n
    return groups


def row_group_bytes(meta: pq.FileMetaData, group: int, columns: set[str]) -> int:
    """Compressed bytes of ``columns`` in row group ``group``."""
    rg = meta.row_group(group)
    return sum(
        rg.column(k).total_compressed_size
        for k in range(rg.num_columns)
        if rg.column(k).path_in_schema in columns
    )


def dry_run_lines(cells: Sequence[Mapping[str, Any]], tiles_per_cell: int) -> list[str]:
    """What a selection costs: products, cells, tiles and bytes to fetch, per modality."""
    sizes = fetch_bytes(cells)
    lines = [f"{len(cells)} cells -> {len(cells) * tiles_per_cell} tiles"]
    for m, size in sizes.items():
        products = sum(m in c for c in cells)
        lines.append(f"{DATASETS[m]}: {products} products, {size / 1e6:.1f} MB to fetch")
    total = sum(sizes.values())
    lines.append(
        f"total {total / 1e9:.3f} GB to fetch (~{total / 100e6 / 60:.1f} min at 100 MB/s, "
        f"~{total / 12.5e6 / 60:.1f} min at 100 Mbit/s)"
    )
    lines += [f"{c['_cell']}: " + ", ".join(c[m]["product_id"] for m in MODALITIES if m in c)
              for c in cells[:20]]  # fmt: skip
    if len(cells) > 20:
        lines.append(f"... and {len(cells) - 20} more cells")
    return lines


def prepare_majortom_remote(
    base_url: str,
    modalities: Sequence[str],
    path: str,
    selection: Selection,
    tile_size: int = 534,
    cell_size: int = 1068,
    require_all: bool = True,
    **write_options: Any,
) -> PrepReport:
    """Write (or finish writing) a store from a selection of Major-TOM Core products.

    Args:
        base_url: where the datasets are (see the module docstring).
        modalities: of ``s1``, ``s2_l1c``, ``s2_l2a``.
        path: output store.
        selection: which products.
        tile_size: tile size in pixels.
        cell_size: Major-TOM cell size in pixels (1068).
        require_all: keep only cells present in every modality.
        **write_options: options of :func:`majortom.write_cells` (encoding, overwrite,
            storage_options of the output, scheduler, workers, skip_bad, progress).
    """
    cells, notes = plan_remote(base_url, modalities, selection, require_all)
    source = f"terrafm-data majortom-remote {base_url} ({selection.describe()})"
    return write_cells(
        cells,
        notes,
        [m for m in MODALITIES if m in modalities],
        path,
        tile_size,
        cell_size,
        source,
        **write_options,
    )
