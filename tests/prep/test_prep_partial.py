"""A tile whose input modality has no valid pixel: an error naming input and reason, or kept
(``--keep-partial``) and reported per tile in the summary and in ``skip_reason``."""

import re
from pathlib import Path

import numpy as np
import pytest
import rasterio
import xarray as xr

from terrafm_lightning.prep.cli import main
from terrafm_lightning.prep.errors import PrepError
from terrafm_lightning.prep.gaps import ALL_NODATA, NO_OVERLAP, NONE_IN_TILE, gap_reason
from terrafm_lightning.prep.sources.majortom import prepare_majortom
from terrafm_lightning.store.validate import validate_store
from tests.conftest import shared_path
from tests.generators.majortom import CELL, write_fixture
from tests.generators.prep_inputs import all_zero, swap_in_other_location
from tests.generators.stores import copy_terramind

SYNC = ["--scheduler", "sync", "--no-progress"]
STEM = "38D_378R_2_3"
"""Sample 1 of the real locations (sorted keys)."""


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return copy_terramind(shared_path("data", "terramind_examples"), tmp_path / "src")


def geotiff(capsys, src: Path, out: Path, *options: str) -> tuple[int, list[str], str]:
    code = main(["geotiff", str(src), str(out), *SYNC, *options])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


def test_s1_of_another_location_stops_then_is_kept_with_keep_partial(src, tmp_path, capsys):
    swap_in_other_location(src / "S1RTC", STEM, "637U_59R_1_3")  # Denmark's S1 at a Chile site
    s1 = src / "S1RTC" / f"{STEM}.tif"
    out = tmp_path / "a.zarr"
    code, lines, err = geotiff(capsys, src, out)
    where = f"tile {STEM}/0: s1 input {s1} {NO_OVERLAP}"
    assert (code, lines) == (2, [])
    assert err == (
        f"terrafm-data geotiff: error: sample 1: {where}; pass --keep-partial to keep such "
        "tiles without it (stopped; fix the input or pass --skip-bad)\n"
    )
    ds = xr.open_zarr(out, consolidated=False)  # a stopped run does not consolidate
    assert ds["written"].values.tolist() == [True, False, True, True, True]  # the rest is kept
    # The same command with --keep-partial resumes: only the partial tile is written.
    code, lines, err = geotiff(capsys, src, out, "--keep-partial")
    assert (code, err) == (0, "")
    assert lines == [
        "1 tiles written, 4 already done (resumed), 1 kept partial",
        "tiles with an input modality without valid pixel (kept, --keep-partial): "
        f"1 s1 {NO_OVERLAP}",
        f"  sample 1: kept partial: {where}",
    ]
    ds = xr.open_zarr(out)
    assert ds["written"].values.all()
    assert ds["available"].values[1].tolist() == [False, True, True]
    assert ds["skip_reason"].values.tolist() == ["", f"kept partial: {where}", "", "", ""]
    with rasterio.open(src / "S2L2A" / f"{STEM}.tif") as f:
        np.testing.assert_array_equal(ds["s2_l2a"].values[1], f.read())
    # The kept tile is a valid written tile; only the WorldCover pass is still to run.
    assert validate_store(str(out)) == ["5 written samples lack WorldCover (run `worldcover`)"]


def test_all_zero_s2_is_named_and_skipped_with_skip_bad(src, tmp_path, capsys):
    l2a = src / "S2L2A" / f"{STEM}.tif"
    all_zero(l2a)
    out = tmp_path / "a.zarr"
    code, lines, err = geotiff(capsys, src, out, "--skip-bad")
    message = (
        f"sample 1: tile {STEM}/0: s2_l2a input {l2a} {ALL_NODATA}; pass --keep-partial to keep "
        "such tiles without it"
    )
    assert (code, err) == (0, "")
    assert lines == [
        "4 tiles written, 1 bad tiles skipped",
        f"skipped {message}",
        f"tiles with an input modality without valid pixel (not written): 1 s2_l2a {ALL_NODATA}",
    ]
    ds = xr.open_zarr(out)
    assert ds["written"].values.tolist() == [True, False, True, True, True]
    assert ds["skip_reason"].values[1] == message


def test_majortom_cell_with_all_nodata_s1_is_refused_or_kept(tmp_path):
    roots = write_fixture(tmp_path / "mt", blank={"s1": {"11U_20R"}})
    part = roots["s1"] / "images" / "part.parquet"
    run = {"tile_size": 32, "cell_size": CELL, "scheduler": "sync", "progress": False}
    inputs = {m: str(p) for m, p in roots.items()}
    where = f"tile 11U_20R/0: s1 input {part} row 1 (11U_20R) {ALL_NODATA}"
    with pytest.raises(PrepError, match=re.escape(f"sample 4: {where}; pass --keep-partial")):
        prepare_majortom(inputs, str(tmp_path / "a.zarr"), **run)
    report = prepare_majortom(inputs, str(tmp_path / "b.zarr"), keep_partial=True, **run)
    assert report.done == 12 and sorted(report.partial) == [4, 5, 6, 7]
    assert report.partial[4] == f"kept partial: {where}"
    assert report.counts == {f"s1 {ALL_NODATA}": 4}
    ds = xr.open_zarr(tmp_path / "b.zarr")
    assert ds["available"].values[:, 0].tolist() == [True] * 4 + [False] * 4 + [True] * 4


def test_gap_reason_tells_no_overlap_from_no_pixel_in_the_tile():
    data = np.full((2, 4, 4), np.nan, np.float32)
    data[:, 0, 0] = -10.0  # valid only in the top-left pixel
    grid = rasterio.Affine(10, 0, 1000, 0, -10, 5000)
    inside = rasterio.Affine(10, 0, 1020, 0, -10, 4980)  # within the input, not at its pixel
    elsewhere = rasterio.Affine(10, 0, 9000, 0, -10, 5000)
    crs = "EPSG:32632"
    assert gap_reason("s1", data, crs, grid, crs, inside, 2) == NONE_IN_TILE
    assert gap_reason("s1", data, crs, grid, crs, elsewhere, 2) == NO_OVERLAP
    assert gap_reason("s1", np.full_like(data, np.nan), crs, grid, crs, inside, 2) == ALL_NODATA
