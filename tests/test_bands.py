import numpy as np
import pytest
import torch

from terrafm_lightning.bands import canonical_band, map_bands
from terrafm_lightning.modalities import BANDS, S2_L1C_ALL_BANDS, SSL4EO_STATS


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
