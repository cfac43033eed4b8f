import google_crc32c
import numpy as np
import pytest
import xarray as xr
import zarr

from terrafm_lightning.modalities import BANDS
from terrafm_lightning.prep.passes.stats import compute_stats
from terrafm_lightning.prep.sources.synthetic import synthetic_scene
from terrafm_lightning.store import format as st
from terrafm_lightning.store.records import (
    worldcover_summary,
    write_rows,
    write_sample,
)
from terrafm_lightning.store.sharding import (
    EMPTY_CHUNK,
    chunk_layout,
    every_tile_holds_data,
    write_samples,
)
from terrafm_lightning.store.validate import validate_store


def test_write_sample_resume_marker_and_xarray(tmp_path):
    path = str(tmp_path / "s.zarr")
    root = st.create_store(path, 6, 32, encoding=st.Encoding(samples_per_shard=4))
    sample = synthetic_scene(3, 1, 32)
    write_sample(root, 5, sample)
    assert st.pending(root).tolist() == [0, 1, 2, 3, 4]
    assert st.shard_groups(root, st.pending(root)) == [[0, 1, 2, 3], [4]]
    st.consolidate(path)
    ds = xr.open_zarr(path)
    assert list(ds["band_s2_l2a"].values) == list(BANDS["s2_l2a"])
    for m, pixels in sample.pixels.items():
        np.testing.assert_array_equal(ds[m].values[5], pixels)
    assert ds["grid_cell"].values[5] == sample.grid_cell
    assert ds["dominant_class"].values[5] == worldcover_summary(sample.worldcover)[2]
    assert ds["s2_l2a"].encoding["chunks"] == (1, 12, 32, 32)


def test_synthetic_store_is_valid_and_stats_exact(synthetic_store):
    assert validate_store(str(synthetic_store)) == []
    ds = xr.open_zarr(synthetic_store)
    freqs = ds.attrs["class_frequencies"]
    assert abs(sum(freqs.values()) - 1) < 1e-6
    # Long tail: tree cover far more frequent than mangroves.
    assert freqs["10"] > 10 * freqs["95"]
    stats = compute_stats(str(synthetic_store), scheduler="sync")
    avail = ds["available"].values[:, 2]
    pixels = ds["s2_l2a"].values[avail].astype(np.float64)
    for b in (0, 7):
        band = pixels[:, b][pixels[:, b] != 0]
        assert stats["s2_l2a"]["mean"][b] == pytest.approx(band.mean(), rel=1e-9)
        assert stats["s2_l2a"]["std"][b] == pytest.approx(band.std(), rel=1e-9)


def test_synthetic_is_deterministic_and_class_dependent():
    a, b = synthetic_scene(7, 3, 48), synthetic_scene(7, 3, 48)
    for m in a.pixels:
        np.testing.assert_array_equal(a.pixels[m], b.pixels[m])
    # Mean NIR of water pixels is far below that of tree pixels.
    scene = synthetic_scene(0, 0, 128)
    wc, nir = scene.worldcover, scene.pixels.get("s2_l2a", scene.pixels.get("s2_l1c"))[7]
    means = {c: nir[wc == c].mean() for c in np.unique(wc) if c and (wc == c).sum() > 50}
    assert len(means) >= 2 and max(means.values()) > 1.5 * min(means.values())


def test_validate_reports_unwritten_and_bad_metadata(tmp_path):
    path = str(tmp_path / "s.zarr")
    root = st.create_store(path, 4, 16, encoding=st.Encoding(samples_per_shard=2))
    for i in range(3):
        write_sample(root, i, synthetic_scene(0, i, 16))
    root["nodata_fraction"][1, 2] = 0.5
    problems = validate_store(path, deep_samples=4)
    assert any("1 samples not written" in p for p in problems)
    assert any("sample 1" in p and "nodata fraction" in p for p in problems)
    assert validate_store(str(tmp_path / "absent.zarr"))[0].startswith("cannot open store")


@pytest.mark.parametrize("dtype, fill", [("uint16", 0), ("float32", np.nan)])
def test_write_rows_stores_what_zarr_default_write_stores(tmp_path, dtype, fill):
    """The shortcut past zarr's fill checks stores byte-identical shards, empty chunks left out."""
    rng = np.random.default_rng(0)
    block = rng.integers(1, 900, (4, 3, 16, 16)).astype(dtype)
    first_row_fill = block.copy()
    first_row_fill[1, :, 0] = fill  # not provably non-empty: zarr's own checks decide
    with_empty = block.copy()
    with_empty[2] = fill  # an all-fill tile: its chunk is left out
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    for k, data in enumerate((block, first_row_fill, with_empty)):
        arrays = [
            root.create_array(
                f"{name}{k}",
                shape=(8, 3, 16, 16),
                chunks=(1, 3, 16, 16),
                shards=(4, 3, 16, 16),
                dtype=dtype,
                fill_value=fill,
                compressors=st.Encoding().compressors(),
            )
            for name in ("default", "ours")
        ]
        arrays[0][4:8] = data
        write_rows(arrays[1], [4, 5, 6, 7], data)
        stored = [
            (tmp_path / "s.zarr" / a.name.strip("/") / "c/1/0/0/0").read_bytes() for a in arrays
        ]
        assert stored[0] == stored[1]
        np.testing.assert_array_equal(arrays[1][4:8], data)
    assert every_tile_holds_data(block, fill)
    assert not every_tile_holds_data(first_row_fill, fill)
    full = len((tmp_path / "s.zarr" / "ours0" / "c/1/0/0/0").read_bytes())
    assert len((tmp_path / "s.zarr" / "ours2" / "c/1/0/0/0").read_bytes()) < full * 0.8


def _pixel_arrays(root, names, dtype, fill, codec):
    return [
        root.create_array(
            name,
            shape=(7, 3, 16, 16),
            chunks=(1, 3, 16, 16),
            shards=(4, 3, 16, 16),
            dtype=dtype,
            fill_value=fill,
            compressors=st.Encoding(codec=codec).compressors(),
        )
        for name in names
    ]


@pytest.mark.parametrize("codec", ["blosc", "zstd"])
@pytest.mark.parametrize("dtype, fill", [("uint16", 0), ("float32", np.nan)])
def test_write_samples_writes_zarrs_shard_bytes(tmp_path, dtype, fill, codec):
    """One object per shard, byte for byte zarr's: chunks, index, crc32c; empty tiles left out."""
    block = np.random.default_rng(0).integers(1, 900, (7, 3, 16, 16)).astype(dtype)
    block[2] = fill  # all fill: no chunk
    block[5, :, 0] = fill  # first row fill, rest data: stored
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    default, ours = _pixel_arrays(root, ("default", "ours"), dtype, fill, codec)
    default[:] = block
    write_samples(ours, range(7), list(block))
    for shard in ("0", "1"):  # a full shard and the last, partial one (3 of 4 samples)
        stored = [
            (tmp_path / "s.zarr" / n / "c" / shard / "0/0/0").read_bytes()
            for n in ("default", "ours")
        ]
        assert stored[0] == stored[1]
        index = stored[1][-68:-4]
        assert int.from_bytes(stored[1][-4:], "little") == google_crc32c.value(index)
    np.testing.assert_array_equal(ours[:], block)
    layout = chunk_layout(ours)
    raw = (tmp_path / "s.zarr" / "ours/c/0/0/0/0").read_bytes()
    entries = layout.parse_index(raw[-layout.index_nbytes :])
    assert int(entries[2, 0]) == EMPTY_CHUNK
    out = np.empty(block.shape[1:], dtype)
    offset, nbytes = (int(v) for v in entries[1])
    layout.decode_into(raw[offset : offset + nbytes], out)  # what the reader does
    np.testing.assert_array_equal(out, block[1])
    corrupt = bytearray(raw[-layout.index_nbytes :])
    corrupt[0] ^= 1
    with pytest.raises(ValueError, match="checksum"):
        layout.parse_index(bytes(corrupt))


def test_write_samples_keeps_the_rest_of_a_partly_written_shard(tmp_path):
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    (array,) = _pixel_arrays(root, ("a",), "uint16", 0, "blosc")
    block = np.random.default_rng(1).integers(1, 900, (4, 3, 16, 16)).astype("uint16")
    write_samples(array, [1, 2], [block[1], block[2]])
    write_samples(array, [0, 3], [block[0], None])  # None: left out, reads as fill
    expected = block.copy()
    expected[3] = 0
    np.testing.assert_array_equal(array[0:4], expected)
    write_samples(array, [2], [np.zeros((3, 16, 16), "uint16")])  # now all fill: chunk removed
    expected[2] = 0
    np.testing.assert_array_equal(array[0:4], expected)
    shard = tmp_path / "s.zarr/a/c/0/0/0/0"
    write_samples(array, [0, 1], [None, None])
    assert not shard.exists()  # no chunk left: no shard object, as zarr does
    np.testing.assert_array_equal(array[:], 0)
    with pytest.raises(ValueError, match="shape"):
        write_samples(array, [4], [block[0, :, :8]])
