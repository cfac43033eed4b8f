"""``worldcover --drop-water-above``: mostly-water tiles dropped, a seeded share kept."""

from pathlib import Path

import numpy as np
import rasterio
import xarray as xr
from rasterio.transform import from_origin

from terrafm_lightning.data.datamodule import TerraFMDataModule
from terrafm_lightning.prep.cli import main
from terrafm_lightning.prep.passes.worldcover import drop_water
from terrafm_lightning.prep.sources.synthetic import prepare_synthetic, synthetic_scene
from terrafm_lightning.store import format as st
from terrafm_lightning.store.records import write_sample
from terrafm_lightning.store.validate import validate_store

SIZE = 32  # 320 m tiles at 10 m
# Tiles in UTM 32N (central meridian 9 E) near the equator, by upper-left corner.
WATER = [(490000.0 + 800 * k, 22000.0) for k in range(10)]  # west of 9 E: all water
OCEAN = [(492000.0, 32000.0), (494000.0, 32000.0)]  # no WorldCover class (open ocean)
LAND = [(502000.0 + 800 * k, 22000.0) for k in range(3)]  # east of 9 E: all tree cover
MIXED = [(499900.0, 22000.0)]  # 100 m of 320 m west of 9 E: ~31% water
TILES = WATER + OCEAN + LAND + MIXED
W = st.WORLDCOVER_CODES.index(80)  # water column of worldcover_hist


def write_worldcover_map(
    path: Path, west: float = 8.85, width: int = 1250, east_code: int = 10
) -> None:
    """EPSG:4326 map from ``west`` (0.0002 deg px), north 0.30 to 0.10: water (80) west of 9 E,
    ``east_code`` east, no data (open ocean) north of 0.27 west of 9 E."""
    res = 0.0002
    north = 0.30
    lon = west + res * (np.arange(width) + 0.5)
    lat = north - res * (np.arange(1000) + 0.5)
    codes = np.where(lon[None, :] < 9.0, 80, east_code).astype(np.uint8).repeat(len(lat), axis=0)
    codes[(lat[:, None] > 0.27) & (lon[None, :] < 9.0)] = 0
    profile = {
        "driver": "GTiff",
        "height": codes.shape[0],
        "width": codes.shape[1],
        "count": 1,
        "dtype": "uint8",
        "crs": "EPSG:4326",
        "transform": from_origin(west, north, res, res),
        "nodata": 0,
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(codes, 1)


def make_store(path: str, tiles: list[tuple[float, float]] = TILES) -> None:
    root = st.create_store(path, len(tiles), SIZE, encoding=st.Encoding(samples_per_shard=4))
    for i, (x0, y0) in enumerate(tiles):
        sample = synthetic_scene(0, i, SIZE)
        sample.crs, sample.transform = "EPSG:32632", (10.0, 0.0, x0, 0.0, -10.0, y0)
        sample.worldcover = None
        write_sample(root, i, sample)
    st.consolidate(path)


def frequencies(ds: xr.Dataset, tiles: np.ndarray) -> np.ndarray:
    totals = (ds["worldcover_hist"].values[tiles] * ds["worldcover_valid"].values[tiles, None]).sum(
        0
    )
    return totals / totals.sum()


def test_drop_water_keeps_seeded_share_and_recomputes_frequencies(tmp_path, capsys):
    path = str(tmp_path / "wc.zarr")
    make_store(path)
    write_worldcover_map(tmp_path / "wc.tif")
    args = ["worldcover", path, str(tmp_path / "wc.tif"), "--scheduler", "sync", "--no-progress"]
    drop = ["--drop-water-above", "0.5", "--keep-water-share", "0.3", "--seed", "1"]
    assert main([*args, *drop]) == 0
    out = capsys.readouterr().out
    ds = xr.open_zarr(path)
    water_tiles = set(range(len(WATER) + len(OCEAN)))
    written = ds["written"].values
    dropped = {i for i in range(len(TILES)) if not written[i]}
    kept_water = water_tiles - dropped
    # Mostly-water and ocean tiles are dropped except the kept share; land and mixed tiles stay.
    assert dropped <= water_tiles and dropped and kept_water
    assert written[len(WATER) + len(OCEAN) :].all()
    assert f"{len(TILES)} tiles written" in out and f"{len(dropped)} tiles dropped" in out
    hist = ds["worldcover_hist"].values
    assert np.allclose(hist[: len(WATER), W], 1) and ds["worldcover_valid"].values[10:12].max() == 0
    assert 0.2 < hist[-1, W] < 0.4  # the mixed tile
    assert set(np.flatnonzero(ds["dropped"].values).tolist()) == dropped
    assert ds.attrs["drop_rule"].startswith("water/open-ocean share > 0.5")
    assert f"map {tmp_path / 'wc.tif'}: covers {len(TILES)} tiles" in out
    # class_frequencies cover the kept tiles only.
    stored = np.array([ds.attrs["class_frequencies"][str(c)] for c in st.WORLDCOVER_CODES])
    np.testing.assert_allclose(stored, frequencies(ds, np.flatnonzero(written)), atol=1e-6)
    assert stored[W] < frequencies(ds, np.arange(len(TILES)))[W] - 0.05
    assert validate_store(path) == []
    # The datamodule never reads a dropped tile.
    dm = TerraFMDataModule(path, batch_size=2, num_workers=0)
    dm.setup("fit")
    assert set(dm.train_dataset.samples.tolist()) == set(range(len(TILES))) - dropped
    # Rerunning the same command changes nothing (the kept share is drawn per sample).
    assert main([*args, *drop]) == 0
    out = capsys.readouterr().out
    assert "0 tiles written" in out and "dropped" not in out
    assert set(np.flatnonzero(xr.open_zarr(path)["dropped"].values).tolist()) == dropped


def test_dropped_tiles_are_not_redone_by_a_rerun_of_the_pixel_pass(tmp_path):
    path = str(tmp_path / "syn.zarr")
    run = {"scheduler": "sync", "progress": False}
    prepare_synthetic(path, 8, 16, encoding=st.Encoding(samples_per_shard=4), **run)
    root = st.open_store(path)
    valid = root["worldcover_valid"][:]
    water = root["worldcover_hist"][:, st.WORLDCOVER_CODES.index(80)] * valid + 1 - valid
    threshold = float(np.sort(water)[-3])  # the top 2 are dropped
    dropped, restored = drop_water(path, threshold, keep_share=0.0)
    assert len(dropped) == 2 and restored == []
    report = prepare_synthetic(path, 8, 16, encoding=st.Encoding(samples_per_shard=4), **run)
    assert report.done == 0
    written = st.open_store(path)["written"][:]
    assert sorted(np.flatnonzero(~written).tolist()) == sorted(dropped)


def test_tiles_outside_every_map_are_reported_never_dropped_and_drops_recomputed(tmp_path, capsys):
    path = str(tmp_path / "wc.zarr")
    # Map 1 spans 8.85..9.10 E; map 2 spans 9.15..9.20 E (grass). At the equator 0.1 deg of
    # longitude is ~11.1 km, so x0 = 511000 straddles map 1's east edge (9.10 E).
    water, partial, east = (490000.0, 22000.0), (511000.0, 22000.0), (518000.0, 22000.0)
    nowhere = (540000.0, 22000.0)  # 9.36 E: outside both maps
    make_store(path, [water, partial, east, nowhere])
    write_worldcover_map(tmp_path / "m1.tif")
    write_worldcover_map(tmp_path / "m2.tif", west=9.15, width=250, east_code=30)
    maps = [str(tmp_path / "m1.tif"), str(tmp_path / "m2.tif")]
    args = ["worldcover", path, *maps, "--scheduler", "sync", "--no-progress"]
    # Threshold 0: any water would drop a tile; only the real water tile goes.
    assert main([*args, "--drop-water-above", "0.0", "--keep-water-share", "0"]) == 0
    out = capsys.readouterr().out
    assert "4 tiles written" in out and "1 tiles dropped" in out
    assert f"map {maps[0]}: covers 2 tiles" in out and f"map {maps[1]}: covers 1 tiles" in out
    assert "1 tiles with no WorldCover map" in out and "  sample 3: " in out
    assert "1 tiles with partial WorldCover coverage" in out and "  sample 1: " in out
    ds = xr.open_zarr(path)
    coverage = ds["worldcover_coverage"].values
    assert coverage[0] == coverage[2] == 1 and coverage[3] == 0 and 0.2 < coverage[1] < 0.6
    assert ds["written"].values.tolist() == [False, True, True, True]
    assert ds["dominant_class"].values.tolist() == [80, 10, 30, 0]
    assert validate_store(path) == []
    # Without the option nothing is dropped: the water tile is restored, pixels intact.
    assert main(args) == 0
    assert "1 dropped tiles restored" in capsys.readouterr().out
    ds = xr.open_zarr(path)
    assert ds["written"].values.all() and not ds["dropped"].values.any()
    assert ds.attrs["drop_rule"] is None
    assert validate_store(path, deep_samples=4) == []
    # Other settings recompute the drops from scratch.
    drop_water(path, 0.99, keep_share=0.0)
    assert xr.open_zarr(path)["dropped"].values.tolist() == [True, False, False, False]
    assert drop_water(path, 1.0, keep_share=0.0) == ([], [0])
    assert xr.open_zarr(path)["written"].values.all()
