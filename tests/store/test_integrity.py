"""Chunk checksums: zarr's crc32c codec on every pixel chunk, verified by every reader.

A damaged chunk is an error naming store, modality, sample and shard in the batch reader, zarr
refuses it too, and ``terrafm-data validate --deep`` lists each damaged tile in one line.
Stores written before checksums were added still read and are reported as unchecked.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from terrafm_lightning.data.dataset import StoreTileDataset
from terrafm_lightning.modalities import MODALITIES
from terrafm_lightning.prep.cli import main as prep_main
from terrafm_lightning.store.device_decoding import HostChunkDecoder
from terrafm_lightning.store.format import TileReadError, open_store
from terrafm_lightning.store.sharding import chunk_layout
from terrafm_lightning.store.validate import validate_store
from tests.generators.stores import make_synthetic_store

DAMAGED = 5
"""The damaged sample: second shard (4 samples per shard), second chunk."""


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_store(tmp_path_factory.mktemp("clean") / "s.zarr", 8, 32)


@pytest.fixture(scope="module")
def unchecked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same store written as before chunk checksums (no crc32c in the chunk codecs)."""
    path = tmp_path_factory.mktemp("unchecked") / "s.zarr"
    return make_synthetic_store(path, 8, 32, chunk_checksum=False)


def shard_file(path: Path, name: str, sample: int) -> Path:
    layout = chunk_layout(open_store(str(path))[name])
    return path / name / "c" / str(sample // layout.samples_per_shard) / "0" / "0" / "0"


def flip_payload(path: Path, name: str, sample: int, nbytes: int = 64) -> None:
    """Flip ``nbytes`` bytes in the middle of one chunk's compressed payload (not its crc32c)."""
    layout = chunk_layout(open_store(str(path))[name])
    shard = shard_file(path, name, sample)
    raw = bytearray(shard.read_bytes())
    entries = layout.parse_index(bytes(raw[-layout.index_nbytes :]))
    offset, size = (int(v) for v in entries[sample % layout.samples_per_shard])
    start = offset + size // 2 - nbytes // 2
    raw[start : start + nbytes] = bytes(b ^ 0xFF for b in raw[start : start + nbytes])
    shard.write_bytes(bytes(raw))


def dataset(path: Path, encoded: bool = False) -> StoreTileDataset:
    return StoreTileDataset.from_store(str(path), nodata_threshold=1.0, encoded=encoded)


def validate_lines(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    code = prep_main(["validate", *args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out.splitlines()


def test_every_pixel_chunk_carries_zarrs_crc32c(clean: Path) -> None:
    root = open_store(str(clean))
    for name in (*MODALITIES, "worldcover"):
        inner = root[name].metadata.codecs[0].codecs
        assert isinstance(inner[-1], zarr.codecs.Crc32cCodec), name
        assert chunk_layout(root[name]).chunk_checksum


def test_flipped_payload_is_refused_by_the_reader_zarr_and_validate(
    tmp_path: Path, clean: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "s.zarr"
    shutil.copytree(clean, path)
    flip_payload(path, "s2_l2a", DAMAGED)
    shard = "s2_l2a/c/1/0/0/0"
    expected = rf"store {path}: cannot read s2_l2a of sample {DAMAGED} \(shard {shard}\): "
    expected += "ChunkChecksumError: chunk checksum mismatch"
    with pytest.raises(TileReadError, match=expected):
        dataset(path).__getitems__([4, DAMAGED])
    with pytest.raises(TileReadError, match=expected):  # the device-decode path checks too
        dataset(path, encoded=True).__getitems__([DAMAGED])
    assert dataset(path).__getitems__([4, 7])["index"].tolist() == [4, 7]  # the others read
    with pytest.raises(ValueError, match="Stored and computed checksum do not match"):
        open_store(str(path))["s2_l2a"][DAMAGED]
    with pytest.raises(ValueError, match="Stored and computed checksum do not match"):
        xr.open_zarr(path)["s2_l2a"][DAMAGED].load()
    assert validate_store(str(clean), deep=True) == []
    code, lines = validate_lines([str(path), "--deep"], capsys)
    assert code == 1
    problems = [line for line in lines if line.startswith("problem:")]
    assert problems == [
        f"problem: sample {DAMAGED}: s2_l2a chunk damaged (shard {shard}): ChunkChecksumError: "
        + problems[0].split("ChunkChecksumError: ")[1]
    ]
    assert "chunk checksum mismatch (stored crc32c" in problems[0]
    assert lines[-1] == f"{path}: 1 problems"


def test_damaged_header_and_truncated_shard_are_one_line_each(
    tmp_path: Path, unchecked: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "s.zarr"
    shutil.copytree(unchecked, path)
    layout = chunk_layout(open_store(str(path))["s1"])
    shard = shard_file(path, "s1", 1)
    raw = bytearray(shard.read_bytes())
    raw[:16] = b"\x00" * 16  # sample 0's blosc header (no checksum to catch it first)
    shard.write_bytes(bytes(raw))
    truncated = shard_file(path, "s2_l1c", 4)
    truncated.write_bytes(truncated.read_bytes()[: layout.index_nbytes])
    code, lines = validate_lines([str(path), "--deep"], capsys)
    problems = [line for line in lines if line.startswith("problem:")]
    assert code == 1 and len(problems) == 2, lines
    assert problems[0].startswith("problem: sample 0: s1 chunk damaged (shard s1/c/0/0/0/0): ")
    assert problems[1].startswith(
        "problem: shard s2_l1c/c/1/0/0/0 (samples 4..7) cannot be read: ValueError: shard index"
    )
    # Without --deep the sampled tiles are read through zarr: still one line each, no traceback.
    code, lines = validate_lines([str(path), "--deep-samples", "8"], capsys)
    problems = [line for line in lines if line.startswith("problem:")]
    assert code == 1
    assert [p.split(":")[1] for p in problems] == [
        " sample 0",
        " sample 4",
        " sample 5",
        " sample 6",
        " sample 7",
    ]
    assert all("cannot be read" in p for p in problems)


def test_stores_without_chunk_checksums_read_and_are_reported(
    unchecked: Path, clean: Path, capsys: pytest.CaptureFixture
) -> None:
    root = open_store(str(unchecked))
    assert not chunk_layout(root["s1"]).chunk_checksum
    old, new = dataset(unchecked), dataset(clean)
    positions = list(range(8))
    batch, expected = old.__getitems__(positions), new.__getitems__(positions)
    for key in (*MODALITIES, "available"):
        np.testing.assert_array_equal(batch[key].numpy(), expected[key].numpy())
    encoded = dataset(unchecked, encoded=True)
    device = encoded.batch_decoder(HostChunkDecoder()).decode(encoded.__getitems__(positions))
    np.testing.assert_array_equal(device["s2_l2a"].numpy(), expected["s2_l2a"].numpy())
    code, lines = validate_lines([str(unchecked), "--deep"], capsys)
    assert code == 0
    assert lines == [
        "note: pixel arrays s1, s2_l1c, s2_l2a, worldcover carry no chunk checksums (written "
        "before they were added): damage inside a chunk is found only where it breaks the "
        "decode; write the store again (same command, --overwrite) to add them",
        f"{unchecked}: valid",
    ]
    code, lines = validate_lines([str(clean)], capsys)
    assert (code, lines) == (0, [f"{clean}: valid"])
