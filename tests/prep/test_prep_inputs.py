"""Input discovery of ``geotiff``: matching rule, ``--match``, unpaired files, no stray arrays."""

import shutil

import numpy as np
import pytest
import rasterio
import xarray as xr

from terrafm_lightning.prep.cli import main
from terrafm_lightning.prep.errors import InputError
from terrafm_lightning.prep.sources.geotiff import prepare_geotiff
from tests.conftest import shared_path
from tests.generators.stores import copy_terramind, write_sen12ms_layout

RUN = {"scheduler": "sync", "progress": False}
SEN12MS = r"(?P<scene>.+)_s[12]_(?P<patch>\d+_p\d+)\.tif"


@pytest.fixture
def terramind():
    return shared_path("data", "terramind_examples")


def test_missing_modality_folder_is_one_line_naming_it(terramind, tmp_path, capsys):
    src = copy_terramind(terramind, tmp_path / "src", ("S1RTC", "S2L2A"))
    out = tmp_path / "a.zarr"
    assert main(["geotiff", str(src), str(out), "--scheduler", "sync"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{src / 'S2L1C'}: s2_l1c folder not found" in err and "--s2-l1c-folder none" in err
    assert not out.exists() and not (tmp_path / "a.zarr.lock").exists()


def test_folder_none_creates_no_array_for_that_modality(terramind, tmp_path, capsys):
    src = copy_terramind(terramind, tmp_path / "src", ("S1RTC", "S2L1C"))
    out = str(tmp_path / "a.zarr")
    args = ["geotiff", str(src), out, "--s2-l2a-folder", "none", "--scheduler", "sync"]
    assert main(args) == 0
    ds = xr.open_zarr(out)
    assert "s2_l2a" not in ds and "time_s2_l2a" not in ds
    assert ds.attrs["modalities"] == ["s1", "s2_l1c"]
    assert ds["available"].values.all() and list(ds["modality"].values) == ["s1", "s2_l1c"]


def test_sen12ms_names_pair_only_with_match(terramind, tmp_path, capsys):
    keys = write_sen12ms_layout(terramind, tmp_path / "sen12ms")
    folders = {"s1": "ROIs1158_spring_s1", "s2_l1c": "ROIs1158_spring_s2", "s2_l2a": None}
    src = str(tmp_path / "sen12ms")
    # Without --match the stems differ: nothing pairs, and the error says so and how to fix it.
    with pytest.raises(InputError, match=r"no location .* has all of s1, s2_l1c \(10 unpaired"):
        prepare_geotiff(src, str(tmp_path / "a.zarr"), folders=folders, **RUN)
    # --allow-missing without --match: every file is listed, one line each, as unpaired.
    report = prepare_geotiff(
        src, str(tmp_path / "b.zarr"), folders=folders, require_all=False, **RUN
    )
    unpaired = [n for n in report.notes if n.startswith("unpaired (kept (--allow-missing)")]
    assert len(unpaired) == 10 and report.done == 10
    assert any("no s2_l1c): " in n and n.endswith("ROIs1158_spring_s1_1_p1.tif") for n in unpaired)
    # With --match the files pair by the named groups; pixels come from the right files.
    out = str(tmp_path / "c.zarr")
    report = prepare_geotiff(src, out, folders=folders, match=SEN12MS, **RUN)
    assert report.done == 5 and report.notes == []
    ds = xr.open_zarr(out)
    assert sorted(ds["grid_cell"].values) == sorted(keys)
    for i, key in enumerate(ds["grid_cell"].values):
        with rasterio.open(terramind / "S1RTC" / f"{keys[key]}.tif") as f:
            np.testing.assert_array_equal(ds["s1"].values[i], f.read().astype(np.float32))
        with rasterio.open(terramind / "S2L1C" / f"{keys[key]}.tif") as f:
            np.testing.assert_array_equal(ds["s2_l1c"].values[i], np.delete(f.read(), 10, 0))


def test_unpaired_files_listed_and_counted_on_the_console(terramind, tmp_path, capsys):
    src = copy_terramind(terramind, tmp_path / "src")
    (src / "S1RTC" / "637U_59R_1_3.tif").unlink()
    out = str(tmp_path / "a.zarr")
    assert main(["geotiff", str(src), out, "--scheduler", "sync", "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "4 tiles written"  # a fresh run says nothing about resume
    assert [line.split(": ")[0] for line in lines[1:]] == ["unpaired (left out, no s1)"] * 2
    assert {line.rsplit("/", 2)[-2] for line in lines[1:]} == {"S2L1C", "S2L2A"}


def test_bad_match_pattern_duplicate_key_and_empty_folder(terramind, tmp_path):
    src = copy_terramind(terramind, tmp_path / "src")
    out = str(tmp_path / "a.zarr")
    with pytest.raises(InputError, match="has no named group"):
        prepare_geotiff(str(src), out, match=r".*\.tif", **RUN)
    with pytest.raises(InputError, match="not a regular expression"):
        prepare_geotiff(str(src), out, match=r"(?P<key>", **RUN)
    with pytest.raises(InputError, match=r"S1RTC: no file name matches --match"):
        prepare_geotiff(str(src), out, match=r"(?P<key>nothing)\.tif", **RUN)
    nested = src / "S2L2A" / "again"
    nested.mkdir()
    shutil.copy(src / "S2L2A" / "609U_541L_3_0.tif", nested / "609U_541L_3_0.tif")
    with pytest.raises(InputError, match=r"both have location key '609U_541L_3_0' for s2_l2a"):
        prepare_geotiff(str(src), out, **RUN)
    empty = tmp_path / "empty"
    for folder in ("S1RTC", "S2L1C", "S2L2A"):
        (empty / folder).mkdir(parents=True)
    with pytest.raises(InputError, match=r"empty/S1RTC: no \*\.tif files for s1"):
        prepare_geotiff(str(empty), out, **RUN)
