"""Major-TOM prep on a parquet fixture in the real Core column layout (GeoTIFF bytes per band)."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xarray as xr
from rasterio.io import MemoryFile
from rasterio.transform import from_origin

from terrafm_lightning.data.majortom import COLUMNS, has_offset, prepare_majortom
from terrafm_lightning.data.synthetic import synthetic_scene

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
    scene = synthetic_scene(5, 4 * k, CELL)
    full = synthetic_scene(5, 0, CELL).pixels  # every modality present
    return {m: scene.pixels.get(m, full[m]) for m in full}


def write_fixture(root: Path, skip: dict[str, set] | None = None) -> dict[str, Path]:
    """Core-S1RTC / Core-S2L1C / Core-S2L2A folders: images/part.parquet + metadata.parquet."""
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
                bands = dict(zip(COLUMNS["s1"], data.astype(np.float32), strict=True))
            else:
                dn = pixels.astype(np.uint16) + np.where(pixels > 0, 1000 * (k > 0), 0)
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


def test_has_offset_rule():
    assert has_offset("S2B_MSIL1C_20230101T000000_N0509_R1_T1_x", np.datetime64("2023-01-01"))
    assert not has_offset("S2B_MSIL1C_20210101T000000_N0300_R1_T1_x", np.datetime64("2023-01-01"))
    assert has_offset("no-baseline", np.datetime64("2022-02-01"))
    assert not has_offset("no-baseline", np.datetime64("2021-12-31"))


def test_majortom_fixture_to_store(tmp_path):
    roots = write_fixture(tmp_path / "mt", skip={"s1": {"12U_21R"}})
    out = str(tmp_path / "mt.zarr")
    report = prepare_majortom(
        {m: str(p) for m, p in roots.items()},
        out,
        tile_size=32,
        cell_size=CELL,
        scheduler="sync",
        progress=False,
    )
    assert report.done == 8  # the cell without S1 is dropped: 2 cells x 4 tiles
    ds = xr.open_zarr(out)
    assert list(ds["grid_cell"].values) == ["10U_20R"] * 4 + ["11U_20R"] * 4
    assert list(ds["tile_index"].values) == [0, 1, 2, 3] * 2
    for k in range(2):
        pixels = cell_pixels(k)
        for t in range(4):
            r, c = divmod(t, 2)
            win = np.s_[:, 32 * r : 32 * (r + 1), 32 * c : 32 * (c + 1)]
            # Offset removed for the baseline-04.00 cell: pixels equal the source DN.
            np.testing.assert_array_equal(ds["s2_l2a"].values[4 * k + t], pixels["s2_l2a"][win])
            np.testing.assert_array_equal(ds["s2_l1c"].values[4 * k + t], pixels["s2_l1c"][win])
            s1 = ds["s1"].values[4 * k + t]
            np.testing.assert_allclose(
                s1[:, 3:, 3:] if t == 0 else s1,
                (pixels["s1"][win][:, 3:, 3:] if t == 0 else pixels["s1"][win]),
                atol=1e-4,
            )
    assert np.isnan(ds["s1"].values[0][:, :3, :3]).all()  # -32768 -> NaN
    assert ds["time_s1"].values[0] == np.datetime64("2021-06-01T10:10:31")
    transform = ds["transform"].values[1]
    assert transform[2] == pytest.approx(300000.0 + 320.0)


def test_majortom_allow_missing_keeps_partial_cells(tmp_path):
    roots = write_fixture(tmp_path / "mt", skip={"s1": {"12U_21R"}})
    out = str(tmp_path / "mt.zarr")
    prepare_majortom(
        {m: str(p) for m, p in roots.items()},
        out,
        tile_size=32,
        cell_size=CELL,
        require_all=False,
        scheduler="sync",
        progress=False,
    )
    ds = xr.open_zarr(out)
    assert ds.sizes["sample"] == 12
    assert not ds["available"].values[8:, 0].any() and ds["available"].values[8:, 2].all()
