import numpy as np
import rasterio
import xarray as xr
from rasterio.transform import xy
from rasterio.warp import transform as warp

from terrafm_lightning.prep.passes.worldcover import prepare_worldcover
from terrafm_lightning.prep.sources.geotiff import prepare_geotiff
from terrafm_lightning.prep.sources.synthetic import synthetic_scene
from terrafm_lightning.store import format as st
from terrafm_lightning.store.records import write_sample
from tests.conftest import shared_path
from tests.generators.stores import write_tif


def test_geotiff_real_samples_pixel_equal(tmp_path):
    src = shared_path("data", "terramind_examples")
    out = str(tmp_path / "geo.zarr")
    report = prepare_geotiff(str(src), out, scheduler="sync", progress=False)
    assert report.done == 5
    ds = xr.open_zarr(out)
    for i, stem in enumerate(ds["grid_cell"].values):
        with rasterio.open(src / "S2L1C" / f"{stem}.tif") as f:
            l1c = f.read()
        np.testing.assert_array_equal(ds["s2_l1c"].values[i], np.delete(l1c, 10, axis=0))
        with rasterio.open(src / "S2L2A" / f"{stem}.tif") as f:
            np.testing.assert_array_equal(ds["s2_l2a"].values[i], f.read())
        with rasterio.open(src / "S1RTC" / f"{stem}.tif") as f:
            np.testing.assert_array_equal(ds["s1"].values[i], f.read().astype(np.float32))
            assert ds["crs"].values[i] == f.crs.to_string()
    assert ds["available"].values.all()


def test_worldcover_real_cog_pixel_equal(tmp_path):
    cog = shared_path("data", "worldcover", "ESA_WorldCover_10m_2021_v200_N00E006_Map.tif")
    path = str(tmp_path / "wc.zarr")
    size = 64
    root = st.create_store(path, 2, size, encoding=st.Encoding(samples_per_shard=2))
    # Two tiles on Sao Tome island (UTM 32N), a real land-cover mix.
    for i, (x0, y0) in enumerate([(231000.0, 28000.0), (233000.0, 20000.0)]):
        sample = synthetic_scene(0, i, size)
        sample.crs, sample.transform, sample.worldcover = (
            "EPSG:32632",
            (10, 0, x0, 0, -10, y0),
            None,
        )
        write_sample(root, i, sample)
    prepare_worldcover(path, [str(cog)], scheduler="sync", progress=False)
    ds = xr.open_zarr(path)
    rows, cols = np.mgrid[0:size, 0:size]
    with rasterio.open(cog) as src:
        for i in range(2):
            xs, ys = xy(rasterio.Affine(*ds["transform"].values[i]), rows.ravel(), cols.ravel())
            lon, lat = warp("EPSG:32632", src.crs, xs, ys)
            expected = np.array(list(src.sample(zip(lon, lat, strict=True))))[:, 0]
            got = ds["worldcover"].values[i].ravel()
            assert (got == expected).mean() > 0.995
            assert len(np.unique(got[got > 0])) >= 2
    assert ds["worldcover_written"].values.all()
    assert abs(sum(ds.attrs["class_frequencies"].values()) - 1) < 1e-6


def test_geotiff_reprojects_other_grids_onto_the_s2_grid(tmp_path):
    rng = np.random.default_rng(0)
    size = 32
    s2_grid = rasterio.Affine(10, 0, 500105, 0, -10, 4000705)
    for folder, bands in (("S2L2A", 12), ("S2L1C", 13)):
        pixels = rng.integers(1, 5000, (bands, size, size)).astype(np.uint16)
        write_tif(tmp_path / "src" / folder / "cell.tif", pixels, "EPSG:32632", s2_grid, 0)
    # S1 on a coarser, shifted grid in the neighbouring UTM zone: it must be warped (nearest).
    s1_grid = rasterio.Affine(20, 0, 1_039_900, 0, -20, 4_017_600)
    s1 = rng.normal(-12, 3, (2, 60, 60)).astype(np.float32)
    s1_path = tmp_path / "src" / "S1RTC" / "cell.tif"
    write_tif(s1_path, s1, "EPSG:32631", s1_grid, np.nan)
    out = str(tmp_path / "geo.zarr")
    prepare_geotiff(str(tmp_path / "src"), out, scheduler="sync", progress=False)
    got = xr.open_zarr(out)["s1"].values[0]
    # Independent oracle: the S1 pixel containing each S2 pixel centre.
    rows, cols = np.mgrid[0:size, 0:size]
    xs, ys = xy(s2_grid, rows.ravel(), cols.ravel())
    x31, y31 = warp("EPSG:32632", "EPSG:32631", xs, ys)
    with rasterio.open(s1_path) as src:
        expected = np.array(list(src.sample(zip(x31, y31, strict=True)))).T.reshape(2, size, size)
    assert np.isfinite(got).all()
    assert (got == expected).mean() > 0.99
