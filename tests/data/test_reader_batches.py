"""Batch reads: tiles against zarr's own reads, the device-decode flow against the CPU decode,
shared-memory batches and metadata through spawned workers, the zstd codec's layout."""

from __future__ import annotations

import gc
import pickle
import shutil
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import google_crc32c
import numcodecs
import numpy as np
import pytest
import torch
import torch.multiprocessing  # noqa: F401 - registers the shared-memory tensor reductions
import zarr

from terrafm_lightning.data.datamodule import TerraFMDataModule
from terrafm_lightning.data.dataset import StoreTileDataset
from terrafm_lightning.data.shared_buffers import BufferPool
from terrafm_lightning.modalities import MODALITIES
from terrafm_lightning.prep.cli import main as prep_main
from terrafm_lightning.store.codecs import _zstd_content_size, compressors
from terrafm_lightning.store.device_decoding import HostChunkDecoder, device_decoder
from terrafm_lightning.store.format import open_store
from terrafm_lightning.store.sharding import chunk_layout
from tests.generators.stores import make_synthetic_store

SMALL_CROPS = {"global_crop_size": 32, "local_crop_size": 16, "n_local_crops": 1}


@pytest.fixture(scope="module", params=["blosc", "zstd"])
def store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 12-tile store (3 shards) with one S1 tile 3/4 NaN and one S1 chunk never written."""
    path = tmp_path_factory.mktemp(request.param) / "store.zarr"
    make_synthetic_store(path, n_samples=12, tile_size=32, codec=request.param)
    root = open_store(str(path), mode="r+")
    s1 = root["s1"][2]
    s1[:, :24] = np.nan  # 75% nodata: above the 0.5 threshold, S1 of sample 2 becomes absent
    root["s1"][2] = s1
    s1 = root["s1"][3]
    s1[0, 30, 30] = np.nan  # one nodata pixel in one band: kept, replaced by 0
    root["s1"][3] = s1
    l2a = root["s2_l2a"][5]
    l2a[:, :4] = 0  # 12.5% nodata in S2: kept as zeros
    root["s2_l2a"][5] = l2a
    return path


def _dataset(path: Path, encoded: bool = False) -> StoreTileDataset:
    return StoreTileDataset.from_store(str(path), encoded=encoded)


def test_batches_equal_zarr_reads_with_nodata_rules(store: Path) -> None:
    dataset = _dataset(store)
    root = open_store(str(store))
    positions = [2, 5, 5, 11, 3, 7]  # a repeated tile (draws are with replacement), 3 shards
    batch = dataset.__getitems__(positions)
    assert batch["index"].tolist() == positions
    assert batch["s1"].dtype == torch.float32 and batch["s2_l1c"].dtype == torch.uint16
    for row, index in enumerate(positions):
        for column, m in enumerate(MODALITIES):
            expected = np.nan_to_num(root[m][index], nan=0.0)
            if not batch["available"][row, column]:
                expected = np.zeros_like(expected)
            np.testing.assert_array_equal(batch[m][row].numpy(), expected)
    assert not batch["available"][0, 0]  # sample 2's S1 is 75% NaN
    assert batch["available"][1, 2] and (batch["s2_l2a"][1, :, :4] == 0).all()
    assert batch["available"][4, 0] and batch["s1"][4, 0, 30, 30] == 0
    stored = root["available"][:][positions]
    np.testing.assert_array_equal(batch["available"][1:].numpy(), stored[1:])
    one = dataset[3]
    np.testing.assert_array_equal(one["s2_l1c"].numpy(), root["s2_l1c"][3])
    assert one["available"].shape == (3,)


def test_device_flow_decodes_the_same_tiles(store: Path) -> None:
    dataset = _dataset(store)
    positions = [2, 5, 5, 11, 0, 7]
    cpu = dataset.__getitems__(positions)
    encoded_dataset = _dataset(store, encoded=True)
    encoded = encoded_dataset.__getitems__(positions)
    assert set(encoded) >= {"chunks", "chunk_offsets"} and "s1" not in encoded
    assert encoded["chunks"]["s2_l2a"].dtype == torch.uint8
    device = encoded_dataset.batch_decoder(HostChunkDecoder()).decode(encoded)
    assert set(device) == set(cpu)
    for key, value in cpu.items():
        assert device[key].dtype == value.dtype, key
        torch.testing.assert_close(device[key], value, rtol=0, atol=0, msg=key)


def test_unwritten_chunk_reads_as_absent_on_both_paths(tmp_path: Path, store: Path) -> None:
    path = tmp_path / "store.zarr"
    shutil.copytree(store, path)
    shard = path / "s1" / "c" / "1" / "0" / "0" / "0"  # samples 4..7
    layout = chunk_layout(open_store(str(path))["s1"])
    raw = bytearray(shard.read_bytes())
    index = np.frombuffer(raw[-layout.index_nbytes : -4], "<u8").reshape(-1, 2).copy()
    index[2] = 2**64 - 1  # sample 6: chunk never written, reads as the fill value (NaN)
    raw[-layout.index_nbytes : -4] = index.tobytes()
    raw[-4:] = google_crc32c.value(index.tobytes()).to_bytes(4, "little")
    shard.write_bytes(bytes(raw))
    dataset = _dataset(path)
    cpu = dataset.__getitems__([6, 4])
    assert not cpu["available"][0, 0] and (cpu["s1"][0] == 0).all()
    assert cpu["available"][1, 0]
    encoded = _dataset(path, encoded=True)
    device = encoded.batch_decoder(HostChunkDecoder()).decode(encoded.__getitems__([6, 4]))
    torch.testing.assert_close(device["s1"], cpu["s1"], rtol=0, atol=0)
    assert device["available"].tolist() == cpu["available"].tolist()


def test_datamodule_decodes_on_the_device_through_spawned_workers(store: Path) -> None:
    def first_batch(decoder: HostChunkDecoder | None) -> dict:
        dm = TerraFMDataModule(str(store), batch_size=4, num_workers=1, tau=0.0, **SMALL_CROPS)
        dm.device_decoder = decoder
        batch = next(iter(dm.train_dataloader()))
        if decoder is not None:
            assert "chunks" in batch and batch["chunks"]["s1"].is_shared()
        return dm.transfer_batch_to_device(batch, torch.device("cpu"), 0)

    cpu, device = first_batch(None), first_batch(HostChunkDecoder())
    assert cpu["index"].tolist() == device["index"].tolist()
    for key in (*MODALITIES, "available", "worldcover_hist", "dominant_class"):
        torch.testing.assert_close(device[key], cpu[key], rtol=0, atol=0, msg=key)


def test_metadata_crosses_to_workers_as_shared_memory(synthetic_store: Path) -> None:
    n = 200_000
    rng = np.random.default_rng(0)
    dataset = StoreTileDataset(
        str(synthetic_store),
        np.arange(n),
        rng.random((n, 3)) > 0.5,
        rng.random((n, 11)).astype(np.float32),
        rng.integers(0, 100, n),
        MODALITIES,
    )
    columns = dataset.samples.nbytes + dataset.worldcover_hist.nbytes
    shared = len(ForkingPickler.dumps(dataset))  # how spawn sends it to a worker
    assert columns > 10_000_000 and shared < 5_000
    assert len(pickle.dumps(dataset)) > columns  # what a copy per worker would cost
    copy = ForkingPickler.loads(ForkingPickler.dumps(dataset))
    np.testing.assert_array_equal(copy.worldcover_hist, dataset.worldcover_hist)


def test_zstd_codec_layout_and_frame_sizes(store: Path) -> None:
    layout = chunk_layout(open_store(str(store))["s2_l1c"])
    assert layout.chunk_shape == (1, 12, 32, 32) and layout.samples_per_shard == 4
    assert layout.index_at_end and layout.index_checksum
    for size in (10, 200, 300, 70_000):  # 1-, 2- (offset 256) and 4-byte content-size fields
        frame = numcodecs.Zstd(level=1).encode(np.zeros(size, np.uint8))
        assert _zstd_content_size(memoryview(frame)) == size
    with pytest.raises(ValueError, match="unknown codec 'lz4'"):
        compressors("lz4", 1)
    plain = zarr.create_array(zarr.storage.MemoryStore(), shape=(4, 4), dtype="u2")
    with pytest.raises(ValueError, match="expected one sharding codec"):
        chunk_layout(plain)
    # No CUDA here: the device decoder is None, so workers decode on the CPU.
    assert device_decoder("zstd", torch.device("cpu")) is None


def test_pooled_buffers_are_reused_only_after_the_receiver_let_go() -> None:
    pool = BufferPool(capacity=2)
    tensor, handle = pool.take((2, 3), torch.float32)
    tensor.copy_(torch.arange(6.0).view(2, 3))
    received = ForkingPickler.loads(ForkingPickler.dumps(handle))  # what the main process gets
    assert isinstance(received, torch.Tensor) and received.tolist() == tensor.tolist()
    view = received[1]
    del received, tensor
    gc.collect()
    second, _ = pool.take((2, 3), torch.float32)
    assert len(pool.buffers) == 2  # slot 0 still mapped through the view: a new buffer
    second.fill_(7.0)
    assert view.tolist() == [3.0, 4.0, 5.0]
    del view
    gc.collect()
    third, handle = pool.take((2, 3), torch.float32)  # slot 0 is free again: reused, not grown
    assert len(pool.buffers) == 2 and pool.state.tolist() == [1, 1]
    third.fill_(5.0)
    again = ForkingPickler.loads(ForkingPickler.dumps(handle))  # descriptor already sent
    assert again.tolist() == [[5.0] * 3] * 2
    overflow, handle = pool.take((2, 3), torch.float32)  # pool full: an unpooled buffer
    assert handle is overflow and len(pool.buffers) == 2


def test_prep_cli_writes_the_gpu_codec(tmp_path: Path) -> None:
    out = tmp_path / "gpu.zarr"
    args = ["synthetic", str(out), "--samples", "2", "--tile-size", "32", "--gpu-codec"]
    assert prep_main([*args, "--scheduler", "sync", "--no-progress"]) == 0
    root = open_store(str(out))
    assert {chunk_layout(root[m]).codec for m in MODALITIES} == {"zstd"}
    dataset = _dataset(out)
    np.testing.assert_array_equal(dataset.__getitems__([1])["s2_l2a"][0].numpy(), root["s2_l2a"][1])
