from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import s3fs

from terrafm_lightning.data.datamodule import TerraFMDataModule
from terrafm_lightning.store.format import StoreError, open_store
from tests.conftest import create_bucket, free_port, s3_options
from tests.generators.stores import make_synthetic_store


def test_datamodule_streams_a_store_from_s3(tmp_path: Path, s3_server: int) -> None:
    local = make_synthetic_store(tmp_path / "store.zarr", n_samples=8, tile_size=32)
    options = s3_options(s3_server)
    create_bucket(s3_server)
    fs = s3fs.S3FileSystem(**options)
    fs.put(str(local), "bucket/store.zarr", recursive=True)
    url = "s3://bucket/store.zarr"
    dm = TerraFMDataModule(
        url,
        batch_size=4,
        num_workers=1,
        storage_options=options,
        global_crop_size=16,
        local_crop_size=16,
        n_local_crops=1,
    )
    dm.setup("fit")
    assert dm.class_frequencies == {
        int(c): f for c, f in open_store(str(local)).attrs["class_frequencies"].items()
    }
    batch = next(iter(dm.train_dataloader()))
    reference = open_store(str(local))
    compared = 0
    for row, index in enumerate(batch["index"].tolist()):
        for m in ("s2_l1c", "s2_l2a"):
            if batch["available"][row, 1 + (m == "s2_l2a")]:
                np.testing.assert_array_equal(batch[m][row].numpy(), reference[m][index])
                compared += 1
    assert compared >= 4
    crops = dm.on_after_batch_transfer(batch, 0)
    assert crops["global_crops"]["s1"].shape == (2 * 4, 2, 16, 16)

    with pytest.raises(StoreError, match="s3://bucket/missing.zarr"):
        TerraFMDataModule("s3://bucket/missing.zarr", storage_options=options).setup("fit")


def test_unreachable_s3_store_names_the_url() -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(StoreError, match="cannot open store at s3://bucket/store.zarr"):
        TerraFMDataModule("s3://bucket/store.zarr", storage_options=s3_options(port)).setup("fit")
