"""Read-only commands write nothing; a second writer of the same store is refused."""

import json
import os
import subprocess
import sys
import time

import pytest

from terrafm_lightning.prep.cli import main
from terrafm_lightning.prep.errors import PrepError
from terrafm_lightning.prep.lock import STALE_SECONDS, StoreLock, lock_path
from terrafm_lightning.prep.sources.synthetic import prepare_synthetic
from terrafm_lightning.store.format import StoreError, open_store
from terrafm_lightning.store.validate import validate_store

RUN = {"scheduler": "sync", "progress": False}


def test_read_only_commands_on_a_missing_store_create_nothing(tmp_path, capsys):
    missing = str(tmp_path / "nope.zarr")
    assert main(["stats", missing, "--scheduler", "sync"]) == 2
    assert "cannot open store at" in capsys.readouterr().err
    assert main(["validate", missing]) == 1
    assert main(["worldcover", missing, str(tmp_path), "--scheduler", "sync"]) == 2
    with pytest.raises(StoreError, match="no store there"):
        open_store(missing)
    with pytest.raises(StoreError, match="no store there"):
        open_store(missing, mode="r+")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_read_only_commands_on_another_tools_zarr_store_name_it_and_write_nothing(tmp_path, capsys):
    import zarr

    other = tmp_path / "other.zarr"
    zarr.open_group(str(other), mode="w", zarr_format=3).create_array("x", shape=(4,), dtype="i4")
    before = {p: p.stat().st_mtime_ns for p in other.rglob("*")}
    expected = (
        f"{other} is a Zarr store made by another tool, not a terrafm store (no format_version): "
        "give the path of a store written by terrafm-data"
    )
    assert main(["stats", str(other), "--scheduler", "sync"]) == 2
    err = capsys.readouterr().err
    assert expected in err and "--overwrite" not in err and "Traceback" not in err
    assert main(["validate", str(other)]) == 1
    assert expected in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in other.rglob("*")} == before


def test_validate_and_open_of_an_existing_store_write_nothing(synthetic_store):
    before = {p: p.stat().st_mtime_ns for p in synthetic_store.rglob("*")}
    assert validate_store(str(synthetic_store)) == []
    open_store(str(synthetic_store))["written"][:]
    assert {p: p.stat().st_mtime_ns for p in synthetic_store.rglob("*")} == before
    assert not os.path.exists(lock_path(str(synthetic_store)))


def test_second_writer_refused_while_the_first_lives(tmp_path):
    out = str(tmp_path / "s.zarr")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = StoreLock(out)
        lock.pid = holder.pid  # a live process on this host holds the store
        lock.beat()
        with pytest.raises(PrepError, match=rf"{out} is being written by another run \(pid"):
            prepare_synthetic(out, 4, 16, **RUN)
        assert main(["synthetic", out, "--samples", "4", "--tile-size", "16"]) == 2
        assert not (tmp_path / "s.zarr").exists()  # refused before anything was written
    finally:
        holder.kill()
        holder.wait()
    # Its process is gone: the lock is stale and the next run takes it over, then releases it.
    assert prepare_synthetic(out, 4, 16, **RUN).done == 4
    assert not os.path.exists(lock_path(out))


def test_lock_with_an_old_heartbeat_from_another_host_is_taken_over(tmp_path):
    out = str(tmp_path / "s.zarr")
    stale = {"run_id": "x", "host": "elsewhere", "pid": 1, "heartbeat": time.time()}
    with open(lock_path(out), "w") as f:
        json.dump(stale, f)
    with pytest.raises(PrepError, match=r"pid 1 on elsewhere"):
        prepare_synthetic(out, 4, 16, **RUN)
    with open(lock_path(out), "w") as f:
        json.dump({**stale, "heartbeat": time.time() - STALE_SECONDS - 1}, f)
    assert prepare_synthetic(out, 4, 16, **RUN).done == 4
