"""Major-TOM Core layout written from the real samples (``../shared/data/terramind_examples``).

The five real 224 px locations become five products per dataset, each one row group of an
image parquet in the published column layout (a single-band GeoTIFF per band column, plus
``cloud_mask`` / ``B10`` / ``thumbnail`` columns that the reader must not fetch), spread over two
parts (``images/part_00000.parquet`` rows 0-2, ``part_00001.parquet`` rows 0-1), and a
``metadata.parquet`` per dataset with the published columns (``centre_lat/lon`` from the real
footprint). S1 is turned back from dB into linear gamma0 with -32768 nodata, as Major-TOM ships
it; S2 keeps the real DN (baseline 03.00 products: no offset).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import rasterio
from rasterio.warp import transform as warp_points

from tests.generators.majortom import geotiff_bytes

FOLDERS = {"s1": "S1RTC", "s2_l1c": "S2L1C", "s2_l2a": "S2L2A"}
DATASETS = {"s1": "Core-S1RTC", "s2_l1c": "Core-S2L1C", "s2_l2a": "Core-S2L2A"}
FILE_BANDS = {
    "s1": ("vv", "vh"),
    "s2_l1c": ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10",
               "B11", "B12"),
    "s2_l2a": ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11",
               "B12"),
}  # fmt: skip
"""Band order of the terramind example files (shared/data/README.md)."""
CLOUD_COVER = (5.0, 60.0, 12.0, 0.5, 30.0)
"""Per location (sorted file stems), the S2 cloud_cover written (percent)."""
DATES = ("2020-03-02", "2020-07-15", "2021-01-20", "2021-06-01", "2021-09-30")
"""Per location, the acquisition date written."""
ROWS_PER_PART = 3
SIZE = 224


def locations(samples: Path) -> list[str]:
    """The real locations (file stems), sorted."""
    return sorted(p.stem for p in (samples / "S2L2A").glob("*.tif"))


def grid_cell(stem: str) -> str:
    """``282D_485L_3_3`` -> ``282D_485L``."""
    return "_".join(stem.split("_")[:2])


def write_real_fixture(
    samples: Path, root: Path, compress: str | None = None, size: int = SIZE, copies: int = 1
) -> dict[str, Path]:
    """Core-S1RTC / Core-S2L1C / Core-S2L2A under ``root`` from the real samples.

    Args:
        samples: the ``terramind_examples`` folder.
        root: output folder.
        compress: GeoTIFF compression of the band columns (None: as rasterio writes).
        size: cell size; above 224 px the real pixels are mirrored out to it (benchmarks).
        copies: the locations written this many times, as further grid cells (row + 1000 k).

    Returns:
        modality -> dataset folder.
    """
    out = {}
    for m, folder in FOLDERS.items():
        parts: list[list[dict]] = [
            [] for _ in range(-(-len(locations(samples)) * copies // ROWS_PER_PART))
        ]
        meta = []
        for k, (copy, stem) in enumerate((c, s) for c in range(copies) for s in locations(samples)):
            with rasterio.open(samples / folder / f"{stem}.tif") as src:
                data, crs, transform, bounds = src.read(), src.crs, src.transform, src.bounds
            if size != SIZE:
                reps = -(-size // SIZE)
                data = np.pad(data, ((0, 0), (0, reps * SIZE - SIZE), (0, reps * SIZE - SIZE)),
                              mode="symmetric")[:, :size, :size]  # fmt: skip
            cell = grid_cell(stem)
            if copy:
                cell = (
                    f"{int(cell.split('_')[0][:-1]) + 1000 * copy}{cell.split('_')[0][-1]}_"
                    + (cell.split("_")[1])
                )
            k_date = k % len(DATES)
            if m == "s1":
                linear = np.where(np.isfinite(data), 10 ** (data / 10), -32768.0)
                data = linear.astype(np.float32)
            else:
                data = np.clip(data, 0, None).astype(np.uint16)
            date = DATES[k_date].replace("-", "")
            kind = (
                "S1A_IW_GRDH_1SDV" if m == "s1" else f"S2A_MSI{'L1C' if m == 's2_l1c' else 'L2A'}"
            )
            product = f"{kind}_{date}T101031_N0300_R{22 + copy:03d}_T{stem[:5]}_{date}T120000"
            row = {
                band: _tif(b, crs, transform, compress)
                for band, b in zip(FILE_BANDS[m], data, strict=True)
            }
            if m != "s1":
                mask = np.zeros((size, size), np.uint8)
                row["cloud_mask"] = _tif(mask, crs, transform, compress)
            row["thumbnail"] = geotiff_bytes(np.zeros((8, 8), np.uint8), 0, "PNG")
            row["product_id"] = product
            row["grid_cell"] = cell
            row["timestamp"] = np.datetime64(f"{DATES[k_date]}T10:10:31")
            part, index = divmod(k, ROWS_PER_PART)
            parts[part].append(row)
            lon, lat = warp_points(
                crs,
                "EPSG:4326",
                [(bounds.left + bounds.right) / 2],
                [(bounds.bottom + bounds.top) / 2],
            )
            meta.append(
                {
                    "grid_cell": cell,
                    "grid_row_u": int(cell.split("_")[0][:-1]),
                    "grid_col_r": int(stem.split("_")[1][:-1]),
                    "product_id": product,
                    "timestamp": row["timestamp"],
                    **({} if m == "s1" else {"cloud_cover": CLOUD_COVER[k_date]}),
                    "nodata": 0.0,
                    "centre_lat": lat[0],
                    "centre_lon": lon[0],
                    "crs": crs.to_string(),
                    "parquet_url": f"https://huggingface.co/datasets/Major-TOM/{DATASETS[m]}"
                    f"/resolve/main/images/part_{part:05d}.parquet",
                    "parquet_row": index,
                }
            )
        images = root / DATASETS[m] / "images"
        images.mkdir(parents=True)
        for p, rows in enumerate(parts):
            pq.write_table(
                pa.Table.from_pylist(rows), images / f"part_{p:05d}.parquet", row_group_size=1
            )
        pq.write_table(pa.Table.from_pylist(meta), root / DATASETS[m] / "metadata.parquet")
        out[m] = root / DATASETS[m]
    return out


def _tif(
    band: np.ndarray, crs: rasterio.crs.CRS, transform: rasterio.Affine, compress: str | None
) -> bytes:
    from rasterio.io import MemoryFile

    profile = {
        "driver": "GTiff",
        "height": band.shape[0],
        "width": band.shape[1],
        "count": 1,
        "dtype": band.dtype,
        "crs": crs,
        "transform": transform,
        **({"compress": compress} if compress else {}),
    }
    with MemoryFile() as mem:
        with mem.open(**profile) as dst:
            dst.write(band, 1)
        return mem.read()
