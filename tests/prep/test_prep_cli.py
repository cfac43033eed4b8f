"""``terrafm-data``: help texts of every argument, and joining an existing dask cluster."""

import argparse
import contextlib
import logging
import os
import socket

import numpy as np
import pytest
import xarray as xr
from distributed import Client, LocalCluster

from terrafm_lightning.prep.cli import build_parser, main
from terrafm_lightning.prep.driver import local_cluster
from terrafm_lightning.prep.sources.synthetic import synthetic_scene

COMMANDS = (
    "synthetic", "geotiff", "majortom", "majortom-remote", "worldcover", "stats", "validate",
)  # fmt: skip


def test_every_argument_of_every_command_has_help(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no line wrapping (argparse also breaks at hyphens)
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(COMMANDS)
    for name, parser in sub.choices.items():
        for action in parser._actions:
            assert action.help and action.help.strip(), f"{name} {action.dest} has no help"
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        assert exit_.value.code == 0
        text = capsys.readouterr().out
        assert text.startswith(f"usage: terrafm-data {name}")
        words = " ".join(text.split())  # undo argparse's line wrapping
        for action in parser._actions:
            shown = action.help % {**vars(action), "prog": parser.prog}
            assert " ".join(shown.split()) in words


def test_scheduler_address_joins_an_existing_cluster(tmp_path, capsys):
    out = str(tmp_path / "syn.zarr")
    with LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        silence_logs=logging.ERROR,
    ) as cluster:
        address = cluster.scheduler_address
        args = ["synthetic", out, "--samples", "8", "--tile-size", "16", "--samples-per-shard", "2"]
        assert main([*args, "--scheduler", address, "--no-progress"]) == 0
        assert "8 tiles written" in capsys.readouterr().out
        assert main(["stats", out, "--scheduler", address]) == 0
        # The tasks went through this cluster's scheduler, and its worker outlived the runs.
        assert {"sample_shard_task", "stats_shard_task"} <= set(cluster.scheduler.task_prefixes)
        assert len(cluster.scheduler.workers) == 1
    ds = xr.open_zarr(out)
    assert ds["written"].values.all()
    np.testing.assert_array_equal(ds["s1"].values[5], synthetic_scene(0, 5, 16).pixels["s1"])
    assert set(ds.attrs["stats"]) == {"s1", "s2_l1c", "s2_l2a"}


def test_local_cluster_workers_keep_glibc_adaptive_trim(monkeypatch):
    # dask's MALLOC_TRIM_THRESHOLD_=65536 made every tile buffer page-fault afresh (1.6x slower).
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    with local_cluster(1) as cluster, Client(cluster) as client:
        environ = client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
        threads = client.run(lambda: os.environ.get("OMP_NUM_THREADS"))
    assert list(environ.values()) == [None]
    assert list(threads.values()) == ["1"]  # the rest of dask's worker environment stays


def test_local_cluster_warns_nothing_when_port_8787_is_taken(recwarn):
    # Another dask cluster on the machine holds the default HTTP port: no console warning.
    with socket.socket() as other:
        with contextlib.suppress(OSError):  # already taken by a real cluster: as good
            other.bind(("", 8787))
            other.listen()
        with local_cluster(1) as cluster:
            assert cluster.scheduler.http_server.port != 8787
    assert [str(w.message) for w in recwarn if "already in use" in str(w.message)] == []
