"""Major-TOM Core fixtures in the published layout: metadata.parquet + images/*.parquet."""

from functools import cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rasterio.io import MemoryFile
from rasterio.transform import from_origin

from terrafm_lightning.prep.sources.majortom import COLUMNS
from terrafm_lightning.prep.sources.synthetic import synthetic_scene

CELLS = ["10U_20R", "11U_20R", "12U_21R"]
CELL = 64
CRS = "EPSG:32632"


def geotiff_bytes(band: np.ndarray, x0: float, driver: str = "GTiff") -> bytes:
    with MemoryFile() as mem:
        profile = {
            "driver": driver,
            "height": band.shape[0],
            "width": band.shape[1],
            "count": 1,
            "dtype": band.dtype,
            "crs": CRS,
            "transform": from_origin(x0, 5e6, 10, 10),
        }
        with mem.open(**profile) as dst:
            dst.write(band, 1)
        return mem.read()


def cell_pixels(k: int) -> dict[str, np.ndarray]:
    """Store-unit pixels of fixture cell ``k`` (every modality; read-only, cached)."""
    return _cell_pixels(k, CELL)


@cache
def _cell_pixels(k: int, size: int) -> dict[str, np.ndarray]:
    scene = synthetic_scene(5, 4 * k, size)
    full = synthetic_scene(5, 0, size).pixels  # every modality present
    return {m: scene.pixels.get(m, full[m]) for m in full}


def write_fixture(
    root: Path, skip: dict[str, set] | None = None, blank: dict[str, set] | None = None
) -> dict[str, Path]:
    """Core-S1RTC / Core-S2L1C / Core-S2L2A folders: images/part.parquet + metadata.parquet.

    ``skip``: modality -> cells left out; ``blank``: modality -> cells whose pixels are all
    nodata (-32768 for S1, 0 for S2).
    """
    folders = {"s1": "Core-S1RTC", "s2_l1c": "Core-S2L1C", "s2_l2a": "Core-S2L2A"}
    out = {}
    for m, folder in folders.items():
        rows, meta = [], []
        for k, cell in enumerate(CELLS):
            if cell in (skip or {}).get(m, set()):
                continue
            pixels = cell_pixels(k)[m]
            # Baseline 04.00 products (2022+) carry +1000; the first cell is baseline 03.00.
            baseline = "N0300" if k == 0 else "N0400"
            date = "20210601" if k == 0 else "20220601"
            if m == "s1":
                data = 10 ** (np.nan_to_num(pixels, nan=0.0) / 10)
                data[:, :3, :3] = -32768.0
                if cell in (blank or {}).get(m, set()):
                    data[:] = -32768.0
                bands = dict(zip(COLUMNS["s1"], data.astype(np.float32), strict=True))
            else:
                dn = pixels.astype(np.uint16) + np.where(pixels > 0, 1000 * (k > 0), 0)
                if cell in (blank or {}).get(m, set()):
                    dn[:] = 0
                bands = dict(zip(COLUMNS[m], dn.astype(np.uint16), strict=True))
                if m == "s2_l1c":
                    bands["B10"] = np.full((CELL, CELL), 20, np.uint16)
            row = {c: geotiff_bytes(b, 300000.0 + 1000 * k) for c, b in bands.items()}
            row["thumbnail"] = geotiff_bytes(np.zeros((8, 8), np.uint8), 0, "PNG")
            row["product_id"] = f"S2A_MSIL2A_{date}T101031_{baseline}_R022_T32UNU_{date}T120000"
            row["grid_cell"] = cell
            row["timestamp"] = np.datetime64(f"{date[:4]}-{date[4:6]}-{date[6:]}T10:10:31")
            rows.append(row)
            meta.append(
                {
                    "grid_cell": cell,
                    "grid_row_u": 10 + k,
                    "grid_col_r": 20,
                    "product_id": row["product_id"],
                    "timestamp": row["timestamp"],
                    "cloud_cover": 0.1,
                    "nodata": 0.0,
                    "centre_lat": 45.0,
                    "centre_lon": 9.0,
                    "crs": CRS,
                    "parquet_url": f"https://huggingface.co/x/{folder}/images/part.parquet",
                    "parquet_row": len(rows) - 1,
                }
            )
        (root / folder / "images").mkdir(parents=True)
        pq.write_table(
            pa.Table.from_pylist(rows), root / folder / "images" / "part.parquet", row_group_size=1
        )
        pq.write_table(pa.Table.from_pylist(meta), root / folder / "metadata.parquet")
        out[m] = root / folder
    return out


def write_geotiff_cells(root: Path) -> Path:
    """The fixture's cells as co-registered GeoTIFF folders (the ``geotiff`` layout).

    ``S1RTC`` (dB), ``S2L1C`` (13 bands, B10 at its place) and ``S2L2A`` under ``root``, one
    ``<cell>.tif`` each per cell.
    """
    from tests.generators.stores import write_tif

    for k, cell in enumerate(CELLS):
        pixels = cell_pixels(k)
        l1c = np.insert(pixels["s2_l1c"], 10, np.full((CELL, CELL), 20, np.uint16), axis=0)
        transform = from_origin(300000.0 + 1000 * k, 5e6, 10, 10)
        for folder, data, nodata in (
            ("S1RTC", pixels["s1"], np.nan),
            ("S2L1C", l1c, 0),
            ("S2L2A", pixels["s2_l2a"], 0),
        ):
            write_tif(root / folder / f"{cell}.tif", data, CRS, transform, nodata)
    return root
