import numpy as np
import pytest
import rasterio
import torch

from terrafm_lightning.bands import (
    BandError,
    canonical_band,
    file_bands,
    input_bands,
    map_bands,
    stem_indices,
)
from terrafm_lightning.eval.datasets.base import read_tif_bands
from terrafm_lightning.modalities import BANDS, S2_L1C_ALL_BANDS, SSL4EO_STATS
from terrafm_lightning.prep.errors import InputError
from terrafm_lightning.prep.raster import read_geotiff


@pytest.mark.parametrize(
    "name,expected",
    [("B1", "B01"), ("b01", "B01"), ("B08A", "B8A"), ("8A", "B8A"), ("12", "B12"), ("vv", "VV")],
)
def test_canonical_band_names(name, expected):
    assert canonical_band(name) == expected


def test_13_band_l1c_drops_b10_and_normalises_by_name():
    mapping = map_bands(S2_L1C_ALL_BANDS, "s2_l1c")
    assert mapping.dropped == ["B10"] and mapping.missing == []
    # Channel k holds the value k, so the output shows which source band fed each stem band.
    x = np.arange(13, dtype=np.float32)[:, None, None].repeat(4, 1).repeat(4, 2)
    out = mapping(x)
    assert out.shape == (12, 4, 4)
    source = [S2_L1C_ALL_BANDS.index(b) for b in BANDS["s2_l1c"]]
    stats = SSL4EO_STATS["s2_l1c"]
    expected = [(s - m) / d for s, m, d in zip(source, stats["mean"], stats["std"], strict=True)]
    torch.testing.assert_close(out[:, 0, 0], torch.tensor(expected))


def test_band_order_is_matched_by_name_not_position():
    shuffled = ["VH", "VV"]
    x = np.stack([np.full((2, 2), -20.0), np.full((2, 2), -10.0)])
    out = map_bands(shuffled, "s1", stats={"mean": [0, 0], "std": [1, 1]})(x)
    assert out[0, 0, 0] == -10.0 and out[1, 0, 0] == -20.0


def test_missing_bands_error_names_source_and_bands():
    ten = [b for b in BANDS["s2_l2a"] if b not in ("B01", "B09")]
    with pytest.raises(ValueError, match=r"so2sat.*\['B01', 'B09'\].*missing_bands='fill'"):
        map_bands(ten, "s2_l2a", source="so2sat")


def test_fill_warns_loudly_and_fills_the_mean():
    ten = [b for b in BANDS["s2_l2a"] if b not in ("B01", "B09")]
    with pytest.warns(UserWarning, match=r"\['B01', 'B09'\].*normalisation mean"):
        mapping = map_bands(ten, "s2_l2a", missing="fill")
    x = np.full((10, 2, 2), 5000.0, dtype=np.float32)
    out = mapping(x)
    filled = [BANDS["s2_l2a"].index(b) for b in ("B01", "B09")]
    assert (out[filled] == 0).all() and (out[1] != 0).all()


def test_nan_nodata_becomes_zero_and_duplicates_are_rejected():
    x = np.array([[[np.nan, -10.0]], [[-20.0, np.nan]]], dtype=np.float32)
    out = map_bands(["VV", "VH"], "s1")(x)
    assert torch.isfinite(out).all() and out[0, 0, 0] == 0 and out[1, 0, 1] == 0
    with pytest.raises(ValueError, match="duplicate bands"):
        map_bands(["VV", "vv"], "s1")
    with pytest.raises(ValueError, match="expected 2 channels"):
        map_bands(["VV", "VH"], "s1")(np.zeros((3, 2, 2)))


def write_banded_tif(path, names, descriptions=True):
    """A GeoTIFF whose band k holds 100 * (k + 1) everywhere, described by ``names``."""
    profile = {
        "driver": "GTiff",
        "dtype": "uint16",
        "count": len(names),
        "width": 8,
        "height": 8,
        "crs": "EPSG:32633",
        "transform": rasterio.transform.from_origin(500000, 4000000, 10, 10),
    }
    with rasterio.open(path, "w", **profile) as dst:
        for k, name in enumerate(names, start=1):
            dst.write(np.full((8, 8), 100 * k, dtype=np.uint16), k)
            if descriptions:
                dst.set_band_description(k, name)
    return path


SHUFFLED_L1C = ("B8A", "B02", "B10", "B12", "B01", "B03", "B04", "B05")
SHUFFLED_L1C += ("B06", "B07", "B08", "B09", "B11")


@pytest.mark.parametrize(
    "names,descriptions",
    [
        (SHUFFLED_L1C, True),  # named bands in any order: matched by name
        (S2_L1C_ALL_BANDS, False),  # no descriptions: the documented 13-band order
        (S2_L1C_ALL_BANDS, ["BANDS"] * 13),  # descriptions that name no band: documented order
    ],
)
def test_prep_and_benchmark_readers_resolve_band_order_alike(tmp_path, names, descriptions):
    labels = descriptions if isinstance(descriptions, list) else names
    path = write_banded_tif(tmp_path / "l1c.tif", labels, descriptions is not False)
    # Each stem band must receive the value written to that band in the file.
    expected = [100 * (names.index(b) + 1) for b in BANDS["s2_l1c"]]
    pixels = read_geotiff(path, "s2_l1c")[0]
    assert pixels[:, 0, 0].tolist() == expected
    data, bands = read_tif_bands(path, S2_L1C_ALL_BANDS)
    mapping = map_bands(bands, "s2_l1c", stats={"mean": [0] * 12, "std": [1] * 12})
    assert mapping(data)[:, 0, 0].tolist() == expected


def test_prep_reader_names_the_file_when_a_stem_band_is_absent(tmp_path):
    path = write_banded_tif(tmp_path / "rgb.tif", ["B04", "B03", "B02"])
    with pytest.raises(InputError, match=r"rgb.tif: no s2_l2a bands \['B01'.*among its bands"):
        read_geotiff(path, "s2_l2a")


def test_file_bands_and_input_bands_errors():
    with pytest.raises(BandError, match=r"x.tif: 3 bands, expected 2 \['VV', 'VH'\]"):
        file_bands(["", "", ""], ("VV", "VH"), "x.tif")
    with pytest.raises(BandError, match=r"duplicate bands \['B02'\]"):
        stem_indices(["B02", "b2"], "s2_l2a", "y.tif")
    assert input_bands(13, None, None) == ("s2_l1c", S2_L1C_ALL_BANDS)
    assert input_bands(12, None, "s2_l1c") == ("s2_l1c", BANDS["s2_l1c"])
    with pytest.raises(BandError, match=r"in_chans=13 does not fit default_modality='s2_l2a'"):
        input_bands(13, None, "s2_l2a")
