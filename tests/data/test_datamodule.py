from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from terrafm_lightning.data.datamodule import TerraFMDataModule
from terrafm_lightning.data.sampler import worldcover_tile_weights
from terrafm_lightning.modalities import BANDS, MODALITIES
from terrafm_lightning.prep.cli import main as prep_main
from terrafm_lightning.store.format import StoreError, TileReadError, open_store
from tests.generators.configs import one_line_error, tiny_config
from tests.generators.stores import make_synthetic_store

SMALL_CROPS = {"global_crop_size": 32, "local_crop_size": 16, "n_local_crops": 2}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_store(tmp_path_factory.mktemp("dm") / "store.zarr", n_samples=32)


def _module(path: Path, **kwargs: object) -> TerraFMDataModule:
    options = {"batch_size": 4, "num_workers": 0, **SMALL_CROPS, **kwargs}
    return TerraFMDataModule(str(path), **options)


def test_construction_reads_nothing_and_setup_reads_the_store_once(store: Path) -> None:
    dm = _module(store, high_frequency_threshold=0.1)
    assert dm.train_dataset is None and dm.multicrop is None  # no I/O in __init__
    with pytest.raises(RuntimeError, match="setup"):
        _ = dm.class_frequencies
    dm.setup("fit")
    stored = open_store(str(store)).attrs["class_frequencies"]
    assert dm.class_frequencies == {int(c): f for c, f in stored.items()}
    assert dm.high_frequency_classes == sorted(int(c) for c, f in stored.items() if f >= 0.1)
    assert 0 < len(dm.high_frequency_classes) < 11
    train = dm.train_dataset
    dm.setup("validate")
    assert dm.train_dataset is train  # later stages reuse the split
    missing = TerraFMDataModule(str(store.parent / "nowhere.zarr"))  # constructing is fine
    with pytest.raises(StoreError, match="nowhere.zarr"):
        missing.setup("fit")
    with pytest.raises(ValueError, match="worker_context"):
        _module(store, worker_context="fork")


def test_cpu_batch_and_device_crops_follow_the_contract(store: Path) -> None:
    dm = _module(store, tau=0.5)
    dm.setup("fit")
    meta = open_store(str(store))
    hist = meta["worldcover_hist"][:][dm.train_dataset.samples]
    frequencies = [dm.class_frequencies[c] for c in dm.classes]
    np.testing.assert_allclose(dm.train_weights, worldcover_tile_weights(hist, frequencies, 0.5))
    batch = next(iter(dm.train_dataloader()))
    assert batch["available"].shape == (4, 3) and batch["available"].dtype == torch.bool
    assert batch["worldcover_hist"].shape == (4, 11)
    assert batch["dominant_class"].dtype == torch.int64 and batch["index"].dtype == torch.int64
    for column, m in enumerate(MODALITIES):
        assert batch[m].shape == (4, len(BANDS[m]), 64, 64)
        assert batch[m].dtype == (torch.float32 if m == "s1" else torch.uint16)
        assert torch.isfinite(batch[m].float()).all()
        assert (batch[m][~batch["available"][:, column]] == 0).all()
    for row, index in enumerate(batch["index"].tolist()):
        np.testing.assert_array_equal(batch["s2_l2a"][row].numpy(), meta["s2_l2a"][index])
    out = dm.on_after_batch_transfer(batch, 0)
    assert out["global_crops"]["s1"].shape == (2 * 4, 2, 32, 32)
    assert out["local_crops"]["s2_l1c"].shape == (2 * 4, 12, 16, 16)
    assert out["teacher_presence"].shape == (2 * 4, 3) and out["student_presence"].shape == (16, 3)
    assert dm.state_dict()["sampler"]["position"] == 4


def test_nodata_replacement_threshold_and_skips(tmp_path: Path, store: Path) -> None:
    path = tmp_path / "store.zarr"
    shutil.copytree(store, path)
    root = open_store(str(path), mode="r+")
    s1 = root["s1"][3]
    s1[:, :40, :] = np.nan  # 62.5% nodata: above the threshold below
    root["s1"][3] = s1
    l2a = root["s2_l2a"][5]
    l2a[:, :8, :] = 0  # 12.5% nodata: kept, zeros stay zeros
    root["s2_l2a"][5] = l2a
    written = root["written"][:]
    written[7] = False
    root["written"][:] = written
    dm = _module(path, nodata_threshold=0.5, tau=0.0)
    dm.setup("fit")
    assert dm.skipped_samples == 1 and 7 not in dm.train_dataset.samples
    dataset = dm.train_dataset
    item = dataset[int(np.flatnonzero(dataset.samples == 3)[0])]
    assert not item["available"][0] and (item["s1"] == 0).all()
    item = dataset[int(np.flatnonzero(dataset.samples == 5)[0])]
    assert item["available"][2] and item["s2_l2a"].dtype == torch.uint16
    assert (item["s2_l2a"][:, :8] == 0).all() and (item["s2_l2a"][:, 8:].int() > 0).all()
    # Restricting to S1 makes sample 3 unusable at read time: a clear error naming it.
    s1_only = _module(path, modalities=["s1"], tau=0.0)
    s1_only.setup("fit")
    position = int(np.flatnonzero(s1_only.train_dataset.samples == 3)[0])
    with pytest.raises(TileReadError, match=rf"{path}: sample 3 has no modality"):
        s1_only.train_dataset[position]


def test_corrupt_chunk_names_store_sample_and_array(tmp_path: Path, store: Path) -> None:
    path = tmp_path / "store.zarr"
    shutil.copytree(store, path)
    shard = path / "s2_l2a" / "c" / "1" / "0" / "0" / "0"  # samples 4..7
    data = bytearray(shard.read_bytes())
    data[16:4000] = b"\x07" * (4000 - 16)
    shard.write_bytes(bytes(data))
    dm = _module(path, tau=0.0, modalities=["s2_l2a"])
    dm.setup("fit")
    position = int(np.flatnonzero(dm.train_dataset.samples == 4)[0])
    with pytest.raises(TileReadError, match=rf"store {path}: cannot read s2_l2a of sample 4"):
        dm.train_dataset[position]


def test_validation_split_and_whole_tile_view(store: Path) -> None:
    dm = _module(store, val_fraction=0.25, tau=0.0)
    dm.setup("fit")
    train, val = set(dm.train_dataset.samples), set(dm.val_dataset.samples)
    assert not train & val and len(val) == round(0.25 * (len(train) + len(val)))
    batch = next(iter(dm.val_dataloader()))
    assert batch["index"].tolist() == sorted(batch["index"].tolist())
    out = dm.multicrop.whole_tiles(batch)
    assert out["inputs"]["s2_l2a"].shape == (4, 12, 32, 32)
    codes = open_store(str(store))["dominant_class"][:][batch["index"].numpy()]
    np.testing.assert_array_equal(out["dominant_class"].numpy(), codes)


def test_spawned_workers_open_the_store_themselves(tmp_path: Path, store: Path) -> None:
    dm = _module(store, num_workers=2, persistent_workers=True, tau=0.0, batch_size=2)
    loader = dm.train_dataloader()
    seen = [batch["index"] for _, batch in zip(range(6), loader, strict=False)]
    assert len(seen) == 6 and dm.train_dataset._reader is None
    # A bad tile read in a worker surfaces as TileReadError naming store and sample.
    path = tmp_path / "store.zarr"
    shutil.copytree(store, path)
    for shard in (path / "s1" / "c").glob("*/0/0/0"):
        shard.write_bytes(shard.read_bytes()[:100])  # truncated shards
    bad = _module(path, num_workers=1, tau=0.0, modalities=["s1"])
    with pytest.raises(TileReadError, match=rf"store {path}: cannot read s1 of sample \d+"):
        next(iter(bad.train_dataloader()))


class _Recorder(pl.LightningModule):
    def __init__(self, out: Path) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.out = out

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        record = {"rank": self.global_rank, "epoch": self.current_epoch, "index": batch["index"]}
        with self.out.open("a") as handle:
            handle.write(json.dumps({**record, "index": batch["index"].tolist()}) + "\n")
        assert batch["global_crops"]["s2_l2a"].shape[0] == 2 * len(batch["index"])
        return (self.weight - batch["global_crops"]["s2_l2a"].mean()).pow(2).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _trainer(tmp_path: Path, **kwargs: object) -> pl.Trainer:
    options = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
    }
    return pl.Trainer(**{**options, **kwargs})


def test_lightning_checkpoint_resumes_mid_epoch_exactly(tmp_path: Path, store: Path) -> None:
    full = tmp_path / "full.jsonl"
    _trainer(tmp_path, max_epochs=2).fit(_Recorder(full), _module(store))
    reference = _records(full)
    assert len(reference) == 16  # 32 draws / batch 4, two epochs

    every_3 = ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=3, save_top_k=-1)
    kwargs = {"enable_checkpointing": True, "callbacks": [every_3]}
    _trainer(tmp_path, max_steps=4, **kwargs).fit(_Recorder(tmp_path / "x.jsonl"), _module(store))
    checkpoint = tmp_path / "step=3.ckpt"
    saved = torch.load(checkpoint, weights_only=True)["TerraFMDataModule"]["sampler"]
    assert saved["position"] == 12 and saved["epoch"] == 0
    part = tmp_path / "part.jsonl"
    _trainer(tmp_path, max_epochs=2).fit(_Recorder(part), _module(store), ckpt_path=checkpoint)
    resumed = _records(part)
    assert [r["index"] for r in resumed] == [r["index"] for r in reference[3:]]
    assert [r["epoch"] for r in resumed] == [r["epoch"] for r in reference[3:]]


def test_runs_that_cannot_train_say_so_in_one_line(
    tmp_path: Path, store: Path, capsys: pytest.CaptureFixture
) -> None:
    """Through ``terrafm fit``: a batch larger than a rank's epoch, and an empty store."""
    config = str(tiny_config(store, tmp_path / "run", max_epochs=1))
    # The recipe draws 48 samples per epoch; a batch of 64 would train nothing.
    line = one_line_error(["fit", "--config", config, "--data.init_args.batch_size", "64"], capsys)
    assert line == (
        f"terrafm: error: store {store}: batch_size 64 is larger than the 48 training samples "
        "per rank (48 over 1 rank), so no batch would train: lower --data.init_args.batch_size "
        "to at most 48 or raise --data.init_args.samples_per_epoch"
    )
    assert not list((tmp_path / "run").glob("runs/*/checkpoints/*.ckpt"))
    empty = tmp_path / "empty.zarr"
    args = ["synthetic", str(empty), "--samples", "0", "--scheduler", "sync", "--no-progress"]
    assert prep_main(args) == 0
    line = one_line_error(["fit", "--config", config, "--data.init_args.path", str(empty)], capsys)
    assert line == (
        f"terrafm: error: store {empty} has no samples (it was created with 0 tiles): write "
        "tiles into it with terrafm-data, or choose another store"
    )
