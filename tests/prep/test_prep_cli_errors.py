"""``terrafm-data`` mistakes in one line: Ctrl-C, empty files, foreign outputs; ``--debug``."""

import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from terrafm_lightning.prep import cli
from terrafm_lightning.prep.cli import main
from terrafm_lightning.prep.errors import InputError
from terrafm_lightning.prep.lock import lock_path
from tests.conftest import shared_path
from tests.generators.prep_inputs import foreign_zarr
from tests.generators.stores import copy_terramind

CLI = [sys.executable, "-m", "terrafm_lightning.prep.cli"]
SYNC = ["--scheduler", "sync", "--no-progress"]
SMALL = ["--samples", "4", "--tile-size", "16", *SYNC]


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_zero_byte_geotiff_is_named(tmp_path, capsys):
    src = copy_terramind(shared_path("data", "terramind_examples"), tmp_path / "src")
    empty = src / "S2L1C" / "433D_629L_3_1.tif"
    empty.write_bytes(b"")
    code, stdout, err = run(capsys, "geotiff", str(src), str(tmp_path / "a.zarr"), *SYNC)
    assert (code, stdout) == (2, "")
    assert err == (
        f"terrafm-data geotiff: error: sample 2: cannot read {empty}: the file is empty "
        "(0 bytes) (stopped; fix the input or pass --skip-bad)\n"
    )


def test_fresh_run_says_nothing_about_resume(tmp_path, capsys):
    out = str(tmp_path / "s.zarr")
    assert run(capsys, "synthetic", out, *SMALL) == (0, "4 tiles written\n", "")
    assert run(capsys, "synthetic", out, *SMALL) == (
        0,
        "0 tiles written, 4 already done (resumed)\n",
        "",
    )


def test_another_tools_zarr_or_folder_is_never_replaced(tmp_path, capsys):
    other = tmp_path / "other.zarr"
    values = foreign_zarr(other)
    before = sorted(p.relative_to(other) for p in other.rglob("*"))
    for overwrite in ([], ["--overwrite"]):
        code, stdout, err = run(capsys, "synthetic", str(other), *SMALL, *overwrite)
        assert (code, stdout) == (2, "")
        assert err == (
            f"terrafm-data synthetic: error: {other} is a Zarr store made by another tool, not a "
            "terrafm store; it is left untouched: choose another output path\n"
        )
    assert sorted(p.relative_to(other) for p in other.rglob("*")) == before
    group = zarr.open_group(str(other), mode="r")
    np.testing.assert_array_equal(group["data"][:], values)
    assert group.attrs["made_by"] == "another tool"
    assert not Path(lock_path(str(other))).exists()
    folder = tmp_path / "results"
    (folder / "keep.txt").parent.mkdir()
    (folder / "keep.txt").write_text("precious")
    for overwrite in ([], ["--overwrite"]):
        code, _, err = run(capsys, "synthetic", str(folder), *SMALL, *overwrite)
        assert code == 2
        assert err == (
            f"terrafm-data synthetic: error: {folder} exists and is not a terrafm store (no "
            "zarr.json); it is left untouched: choose another output path\n"
        )
    assert [p.name for p in folder.iterdir()] == ["keep.txt"]
    # An empty folder, or a terrafm store with --overwrite, is written.
    (tmp_path / "empty").mkdir()
    assert run(capsys, "synthetic", str(tmp_path / "empty"), *SMALL)[0] == 0
    assert run(capsys, "synthetic", str(tmp_path / "empty"), *SMALL, "--overwrite")[:2] == (
        0,
        "4 tiles written\n",
    )


def test_debug_shows_the_traceback(tmp_path):
    src = tmp_path / "src"
    (src / "S1RTC").mkdir(parents=True)
    args = ["geotiff", str(src), str(tmp_path / "a.zarr"), "--scheduler", "sync"]
    assert main(args) == 2
    with pytest.raises(InputError, match=r"S1RTC: no \*\.tif files for s1"):
        main([*args, "--debug"])


def test_unexpected_failure_is_one_line_exit_1(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "prepare_synthetic", broken)
    assert run(capsys, "synthetic", str(tmp_path / "s.zarr"), *SMALL) == (
        1,
        "",
        "terrafm-data synthetic: error: RuntimeError: a bug (unexpected; --debug shows the "
        "traceback)\n",
    )
    with pytest.raises(RuntimeError, match="a bug"):
        main(["synthetic", str(tmp_path / "s.zarr"), *SMALL, "--debug"])
