import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import xarray as xr
import zarr

from terrafm_lightning.prep.cli import main
from terrafm_lightning.prep.lock import lock_path
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


def start_until_first_tiles(cmd: list[str], out: str) -> subprocess.Popen:
    """Start ``cmd`` in its own process group (a terminal's foreground job); return once the
    store at ``out`` has its first written tiles (or the run ended, or 120 s passed)."""
    proc = subprocess.Popen(
        cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
        try:
            if zarr.open_group(out, mode="r")["written"][:].any():
                break
        except Exception:  # store not created yet
            continue
    return proc


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
    proc = start_until_first_tiles(cmd, out)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its dask workers
    proc.communicate()
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


@pytest.mark.slow
def test_ctrl_c_is_one_line_exit_130_and_the_rerun_is_exact(tmp_path):
    out = str(tmp_path / "int.zarr")
    n = 96
    cmd = [*CLI, "synthetic", out, "--samples", str(n), "--tile-size", "128"]
    cmd += ["--samples-per-shard", "4", "--no-progress"]
    proc = start_until_first_tiles([*cmd, "--workers", "1"], out)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the driver and its dask workers
    stdout, stderr = proc.communicate(timeout=120)
    assert (proc.returncode, stdout) == (130, "")
    assert stderr == "terrafm-data synthetic: interrupted; rerun the same command to resume\n"
    assert not os.path.exists(lock_path(out))
    written = zarr.open_group(out, mode="r")["written"][:]
    assert 0 < written.sum() < n, "the interrupt must land mid-run"
    rerun = subprocess.run([*cmd, "--scheduler", "sync"], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert (
        rerun.stdout
        == f"{n - written.sum()} tiles written, {written.sum()} already done (resumed)\n"
    )
    # Identical to a store written in one go, array by array.
    fresh = str(tmp_path / "fresh.zarr")
    assert main(["synthetic", fresh, *cmd[cmd.index("--samples") :], "--scheduler", "sync"]) == 0
    resumed, whole = zarr.open_group(out, mode="r"), zarr.open_group(fresh, mode="r")
    assert sorted(resumed.array_keys()) == sorted(whole.array_keys())
    for name in whole.array_keys():
        np.testing.assert_array_equal(resumed[name][:], whole[name][:], err_msg=name)
    assert resumed.attrs["source_digest"] == whole.attrs["source_digest"]


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
