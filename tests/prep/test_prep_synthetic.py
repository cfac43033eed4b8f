import os
import signal
import subprocess
import sys
import time

import numpy as np
import xarray as xr
import zarr

from terrafm_lightning.prep.cli import main
from terrafm_lightning.prep.sources.synthetic import synthetic_scene
from terrafm_lightning.store.validate import validate_store

CLI = [sys.executable, "-m", "terrafm_lightning.prep.cli"]


def test_cli_synthetic_end_to_end_with_dask(tmp_path, capsys):
    out = str(tmp_path / "syn.zarr")
    args = ["synthetic", out, "--samples", "24", "--tile-size", "32", "--samples-per-shard", "4"]
    assert main([*args, "--workers", "2", "--no-progress"]) == 0
    assert "24 tiles written" in capsys.readouterr().out
    assert main(["stats", out, "--scheduler", "sync"]) == 0
    assert main(["validate", out]) == 0
    ds = xr.open_zarr(out)
    assert ds.attrs["stats"]["s1"]["provenance"].startswith("terrafm-data stats")
    np.testing.assert_array_equal(
        ds["s2_l1c"].values[13],
        synthetic_scene(0, 13, 32).pixels.get("s2_l1c", np.zeros((12, 32, 32), np.uint16)),
    )
    # Same command again: nothing left to do.
    assert main([*args, "--scheduler", "sync", "--no-progress"]) == 0
    assert "0 tiles written, 24 already done" in capsys.readouterr().out


def test_killed_prep_run_resumes_without_missing_or_half_written_tiles(tmp_path):
    out = str(tmp_path / "kill.zarr")
    n = 96
    cmd = [
        *CLI,
        "synthetic",
        out,
        "--samples",
        str(n),
        "--tile-size",
        "128",
        "--samples-per-shard",
        "4",
        "--workers",
        "1",
        "--no-progress",
    ]
    proc = subprocess.Popen(
        cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        done = 0
        deadline = time.monotonic() + 90
        while done == 0 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            try:
                done = int(zarr.open_group(out, mode="r")["written"][:].sum())
            except Exception:  # store not created yet
                continue
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its dask workers
        proc.wait()
    written = zarr.open_group(out, mode="r")["written"][:]
    assert 0 < written.sum() < n, "the kill must land mid-run"
    result = subprocess.run(
        cmd[:-3] + ["--scheduler", "sync", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "already done" in result.stdout
    assert validate_store(out, deep_samples=n) == []
    root = zarr.open_group(out, mode="r")
    assert root["written"][:].all()
    for i in range(n):
        expected = synthetic_scene(0, i, 128)
        for m in ("s1", "s2_l2a"):
            if m in expected.pixels:
                np.testing.assert_array_equal(root[m][i], expected.pixels[m])
        assert root["grid_cell"][i] == expected.grid_cell


def test_nuisance_changes_brightness_per_sensor_but_not_land_cover():
    plain, nuisance = (synthetic_scene(0, k, 32, nuisance=s) for k, s in ((5, 0.0), (5, 1.0)))
    np.testing.assert_array_equal(plain.worldcover, nuisance.worldcover)
    assert plain.pixels.keys() == nuisance.pixels.keys()
    # Default strength 0 draws nothing extra: the stores of the default generator are unchanged.
    np.testing.assert_array_equal(plain.pixels["s1"], synthetic_scene(0, 5, 32).pixels["s1"])
    for m in ("s2_l1c", "s2_l2a"):
        ratio = nuisance.pixels[m].astype(np.float64) / plain.pixels[m].astype(np.float64)
        assert ratio.std() > 0.05  # a spatially varying gain, not a constant factor
    # The S1 offset is large compared with the per-pixel speckle it sits on.
    assert abs(float(np.mean(nuisance.pixels["s1"] - plain.pixels["s1"]))) > 0.05
    # The two S2 products carry independent fields (own acquisitions).
    gain = {
        m: np.log(nuisance.pixels[m][7].astype(np.float64) / plain.pixels[m][7]).mean()
        for m in ("s2_l1c", "s2_l2a")
    }
    assert abs(gain["s2_l1c"] - gain["s2_l2a"]) > 0.01
