"""Major-TOM prep on a parquet fixture in the real Core column layout (GeoTIFF bytes per band)."""

import numpy as np
import pytest
import xarray as xr

from terrafm_lightning.prep.sources.majortom import has_offset, prepare_majortom
from tests.generators.majortom import CELL, cell_pixels, write_fixture


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
    assert report.done == 8  # the cell without S1 is left out, and listed: 2 cells x 4 tiles
    assert len(report.notes) == 2 and all(
        n.startswith("unpaired (left out, no s1): ") and n.endswith("(12U_21R)")
        for n in report.notes
    )
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
