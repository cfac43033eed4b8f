"""Bad input on the prep side: clear errors naming file and tile, or counted skips."""

import subprocess
import sys

import numpy as np
import pytest
import rasterio
import xarray as xr

from terrafm_lightning.prep.cli import main
from terrafm_lightning.prep.errors import InputError, PrepError
from terrafm_lightning.prep.sources.geotiff import prepare_geotiff
from terrafm_lightning.prep.sources.majortom import prepare_majortom
from terrafm_lightning.store.format import StoreError
from terrafm_lightning.store.validate import validate_store
from tests.conftest import shared_path
from tests.generators.majortom import CELL, write_fixture
from tests.generators.stores import copy_terramind

RUN = {"scheduler": "sync", "progress": False}


@pytest.fixture
def geotiffs(tmp_path):
    return copy_terramind(shared_path("data", "terramind_examples"), tmp_path / "src")


def test_truncated_geotiff_stops_naming_file_or_is_skipped(geotiffs, tmp_path):
    bad = geotiffs / "S2L2A" / "38D_378R_2_3.tif"
    bad.write_bytes(bad.read_bytes()[:2000])
    with pytest.raises(PrepError, match=r"sample 1: .*38D_378R_2_3\.tif.*--skip-bad"):
        prepare_geotiff(str(geotiffs), str(tmp_path / "a.zarr"), **RUN)
    out = str(tmp_path / "b.zarr")
    report = prepare_geotiff(str(geotiffs), out, skip_bad=True, **RUN)
    assert report.done == 4 and list(report.skipped) == [1]
    ds = xr.open_zarr(out)
    assert ds["written"].values.tolist() == [True, False, True, True, True]
    assert "38D_378R_2_3" in ds["skip_reason"].values[1] and ds["skip_reason"].values[0] == ""
    assert not any("not written" in p for p in validate_store(out))


def test_wrong_band_count_and_all_nodata_tile(geotiffs, tmp_path):
    with rasterio.open(geotiffs / "S2L2A" / "282D_485L_3_3.tif") as f:
        profile, data = f.profile, f.read()
    profile.update(count=5)
    with rasterio.open(geotiffs / "S2L2A" / "282D_485L_3_3.tif", "w", **profile) as f:
        f.write(data[:5])
    # The first location is checked before the store is made: nothing is written.
    with pytest.raises(InputError, match=r"282D_485L_3_3\.tif has 5 bands; s2_l2a needs 12"):
        prepare_geotiff(str(geotiffs), str(tmp_path / "a.zarr"), **RUN)
    assert not (tmp_path / "a.zarr").exists()
    for folder in ("S1RTC", "S2L1C", "S2L2A"):
        path = geotiffs / folder / "282D_485L_3_3.tif"
        path.unlink()
    stem = "38D_378R_2_3"
    for folder, fill in (("S1RTC", np.nan), ("S2L1C", 0), ("S2L2A", 0)):
        path = geotiffs / folder / f"{stem}.tif"
        with rasterio.open(path) as f:
            profile, data = f.profile, f.read()
        with rasterio.open(path, "w", **profile) as f:
            f.write(np.full_like(data, fill))
    with pytest.raises(PrepError, match=f"{stem}/0 is empty or all nodata"):
        prepare_geotiff(str(geotiffs), str(tmp_path / "b.zarr"), **RUN)


def test_missing_modality_dropped_or_kept(geotiffs, tmp_path):
    (geotiffs / "S1RTC" / "637U_59R_1_3.tif").unlink()
    assert prepare_geotiff(str(geotiffs), str(tmp_path / "a.zarr"), **RUN).done == 4
    out = str(tmp_path / "b.zarr")
    prepare_geotiff(str(geotiffs), out, require_all=False, **RUN)
    ds = xr.open_zarr(out)
    assert ds["available"].values.tolist()[4] == [False, True, True]


def test_majortom_corrupt_band_truncated_parquet_and_grid_mismatch(tmp_path):
    roots = write_fixture(tmp_path / "mt")
    part = roots["s2_l2a"] / "images" / "part.parquet"
    good = part.read_bytes()
    part.write_bytes(good[: len(good) // 2])
    kwargs = {"tile_size": 32, "cell_size": CELL, **RUN}
    with pytest.raises(PrepError, match=r"cannot read row 0 of .*Core-S2L2A/images/part\.parquet"):
        prepare_majortom({m: str(p) for m, p in roots.items()}, str(tmp_path / "a.zarr"), **kwargs)
    (roots["s1"] / "metadata.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(InputError, match=r"Core-S1RTC/metadata\.parquet"):
        prepare_majortom({m: str(p) for m, p in roots.items()}, str(tmp_path / "b.zarr"), **kwargs)


def test_resume_refuses_other_inputs_and_unreachable_store(geotiffs, tmp_path):
    out = str(tmp_path / "a.zarr")
    prepare_geotiff(str(geotiffs), out, **RUN)
    (geotiffs / "S1RTC" / "637U_59R_1_3.tif").unlink()
    with pytest.raises(StoreError, match="different inputs"):
        prepare_geotiff(str(geotiffs), out, **RUN)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="file/store.zarr"):
        prepare_geotiff(str(geotiffs), str(blocker / "store.zarr"), **RUN)


def test_cli_bad_input_on_dask_worker_is_one_clear_line(geotiffs, tmp_path):
    bad = geotiffs / "S1RTC" / "609U_541L_3_0.tif"
    bad.write_bytes(b"not a tiff")
    cmd = [
        sys.executable,
        "-m",
        "terrafm_lightning.prep.cli",
        "geotiff",
        str(geotiffs),
        str(tmp_path / "a.zarr"),
        "--workers",
        "1",
        "--no-progress",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "sample 3" in result.stderr and "609U_541L_3_0.tif" in result.stderr
    assert main(["validate", str(tmp_path / "missing.zarr")]) == 1
