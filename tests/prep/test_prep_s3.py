"""Prep straight to object storage: ``synthetic`` + ``stats`` + ``validate`` on a loopback S3."""

import json

import numpy as np
import xarray as xr

from terrafm_lightning.prep.cli import main
from terrafm_lightning.prep.sources.synthetic import synthetic_scene
from tests.conftest import create_bucket, s3_options


def test_prep_writes_a_valid_store_to_s3(s3_server, capsys):
    create_bucket(s3_server)
    options = s3_options(s3_server)
    url = "s3://bucket/prep/syn.zarr"
    storage = ["--storage-options", json.dumps(options)]
    args = ["synthetic", url, "--samples", "12", "--tile-size", "16", "--samples-per-shard", "4"]
    # Dask worker processes write the pixel shards to S3; the driver writes the metadata.
    assert main([*args, *storage, "--workers", "1", "--no-progress"]) == 0
    assert "12 tiles written" in capsys.readouterr().out
    assert main(["stats", url, *storage, "--scheduler", "sync"]) == 0
    assert main(["validate", url, *storage]) == 0
    assert "valid" in capsys.readouterr().out
    ds = xr.open_zarr(url, storage_options=options)
    assert ds["written"].values.all() and ds.attrs["stats"]["s2_l2a"]["count"][0] > 0
    for i in (0, 7, 11):
        expected = synthetic_scene(0, i, 16)
        for m, pixels in expected.pixels.items():
            np.testing.assert_array_equal(ds[m].values[i], pixels)
    # A rerun of the same command resumes against the S3 store and finds nothing to do.
    assert main([*args, *storage, "--scheduler", "sync", "--no-progress"]) == 0
    assert "0 tiles written, 12 already done" in capsys.readouterr().out
