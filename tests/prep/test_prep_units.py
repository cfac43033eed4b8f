"""Inputs checked against the modality's unit: a mismatch names file, dtype and range; the
documented options convert it exactly."""

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import rasterio
import xarray as xr

from terrafm_lightning.prep.cli import main
from terrafm_lightning.prep.errors import InputError, PrepError
from terrafm_lightning.prep.sources.majortom import prepare_majortom
from terrafm_lightning.prep.units import UnitConversion, to_store_units
from tests.conftest import shared_path
from tests.generators.majortom import CELL, geotiff_bytes, write_fixture
from tests.generators.prep_inputs import as_integer_s1, as_linear_power, as_reflectance
from tests.generators.stores import copy_terramind

STEMS = ["282D_485L_3_3", "38D_378R_2_3", "433D_629L_3_1", "609U_541L_3_0", "637U_59R_1_3"]
"""The real locations in sample order (sorted keys)."""
SYNC = ["--scheduler", "sync", "--no-progress"]


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return copy_terramind(shared_path("data", "terramind_examples"), tmp_path / "src")


def geotiff(capsys, src: Path, out: Path, *options: str) -> tuple[int, str, str]:
    code = main(["geotiff", str(src), str(out), *SYNC, *options])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def value_range(path: Path) -> str:
    with rasterio.open(path) as f:
        pixels = f.read()
    return f"{pixels.min():g}..{pixels.max():g}"


def test_float_reflectance_s2_is_refused_then_converted_exactly(src, tmp_path, capsys):
    dn = {stem: as_reflectance(src / "S2L2A" / f"{stem}.tif") for stem in STEMS}
    out = tmp_path / "a.zarr"
    code, stdout, err = geotiff(capsys, src, out)
    first = src / "S2L2A" / f"{STEMS[0]}.tif"
    assert (code, stdout) == (2, "")
    assert err == (
        f"terrafm-data geotiff: error: {first}: s2_l2a input is float32 with values "
        "0.0001..0.6431; the store holds DN (reflectance x 10000, uint16): pass "
        "--s2-reflectance-scale 10000 for reflectance 0-1, or 1 for float DN\n"
    )
    assert not out.exists()  # found on the first location, before the store is made
    code, stdout, err = geotiff(capsys, src, out, "--s2-reflectance-scale", "10000")
    assert (code, stdout.splitlines()[0], err) == (0, "5 tiles written", "")
    ds = xr.open_zarr(out)
    for i, stem in enumerate(ds["grid_cell"].values):
        np.testing.assert_array_equal(ds["s2_l2a"].values[i], dn[stem])  # DN 1 stays 1
    assert ds["available"].values.all()


def test_linear_power_s1_is_refused_then_stored_as_db(src, tmp_path, capsys):
    db = {stem: as_linear_power(src / "S1RTC" / f"{stem}.tif") for stem in STEMS}
    first = src / "S1RTC" / f"{STEMS[0]}.tif"
    out = tmp_path / "a.zarr"
    code, _, err = geotiff(capsys, src, out)
    assert code == 2
    assert err == (
        f"terrafm-data geotiff: error: {first}: s1 input is float32 with values "
        f"{value_range(first)}; no negative value: this is linear power, not dB; pass "
        "--s1-linear-to-db to store 10*log10 of it\n"
    )
    assert not out.exists()
    code, stdout, _ = geotiff(capsys, src, out, "--s1-linear-to-db")
    assert (code, stdout.splitlines()[0]) == (0, "5 tiles written")
    ds = xr.open_zarr(out)
    for i, stem in enumerate(ds["grid_cell"].values):
        np.testing.assert_allclose(ds["s1"].values[i], db[stem], atol=1e-4)


def test_db_s1_with_the_linear_option_is_refused(src, tmp_path, capsys):
    first = src / "S1RTC" / f"{STEMS[0]}.tif"
    code, _, err = geotiff(capsys, src, tmp_path / "a.zarr", "--s1-linear-to-db")
    assert code == 2
    assert err == (
        f"terrafm-data geotiff: error: {first}: s1 input is float64 with values "
        f"{value_range(first)}; negative values are dB already, not linear power: drop "
        "--s1-linear-to-db\n"
    )


def test_integer_s1_names_the_file_of_its_tile_and_writes_the_others(src, tmp_path, capsys):
    bad = src / "S1RTC" / f"{STEMS[2]}.tif"
    as_integer_s1(bad)
    out = tmp_path / "a.zarr"
    code, _, err = geotiff(capsys, src, out)
    assert code == 2
    assert err == (
        f"terrafm-data geotiff: error: sample 2: {bad}: s1 input is int16 with values "
        f"{value_range(bad)}; S1 must be float dB (or float linear power with "
        "--s1-linear-to-db); integer S1 (DN, amplitude) has no defined conversion "
        "(stopped; fix the input or pass --skip-bad)\n"
    )
    assert xr.open_zarr(out)["written"].values.tolist() == [True, True, False, True, True]


def test_s2_and_s1_value_ranges_outside_the_unit():
    ok = np.array([[[5, 12000], [-9999, 1]]], np.int16)
    expected = (
        r"^x\.tif: s2_l2a input is int16 with values -9999\.\.12000; "
        r"S2 DN lie within 0\.\.65535 \(0 nodata\): declare the file's nodata"
    )
    with pytest.raises(InputError, match=expected):
        to_store_units("s2_l2a", ok, None, "x.tif")
    # Declared, the nodata value is stored as the store's nodata (0).
    assert to_store_units("s2_l2a", ok, -9999, "x.tif").tolist() == [[[5, 12000], [0, 1]]]
    dn_as_float = np.array([[[100.0, 20000.0], [np.nan, 0.4]]], np.float32)
    with pytest.raises(InputError, match=r"values 0\.4\.\.20000; x 10000 exceeds DN 65535"):
        to_store_units("s2_l1c", dn_as_float, None, "x.tif", UnitConversion(10000))
    # Scale 1: float DN rounded; a valid value rounding to 0 stays valid (1); NaN is nodata.
    dn = to_store_units("s2_l1c", dn_as_float, None, "x.tif", UnitConversion(1))
    assert dn.dtype == np.uint16 and dn.tolist() == [[[100, 20000], [0, 1]]]
    undeclared = np.array([[[-12.5, -32768.0]]], np.float32)
    with pytest.raises(InputError, match=r"values -32768\.\.-12\.5; dB values lie within -100"):
        to_store_units("s1", undeclared, None, "x.tif")
    assert np.isnan(to_store_units("s1", undeclared, -32768, "x.tif")).tolist() == [[[False, True]]]


def test_majortom_s1_given_in_db_is_refused_naming_file_and_row(tmp_path):
    roots = write_fixture(tmp_path / "mt")
    part = roots["s1"] / "images" / "part.parquet"
    # Core-S1RTC is linear power: a negative value means the bands were given in dB.
    table = pq.read_table(part).to_pylist()
    for band in ("vv", "vh"):
        table[1][band] = geotiff_bytes(np.full((CELL, CELL), -12.0, np.float32), 301000.0)
    pq.write_table(pa.Table.from_pylist(table), part, row_group_size=1)
    expected = (
        rf"sample 4: {re.escape(str(part))} row 1 \(11U_20R\): s1 input is float32 with values "
        r"-12\.\.-12; negative values are dB already"
    )
    with pytest.raises(PrepError, match=expected):
        prepare_majortom(
            {m: str(p) for m, p in roots.items()},
            str(tmp_path / "a.zarr"),
            tile_size=32,
            cell_size=CELL,
            scheduler="sync",
            progress=False,
        )
