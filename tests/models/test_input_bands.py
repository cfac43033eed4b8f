"""Plain-tensor channel layouts, checked by content: which stem channel receives which band."""

import pytest
import timm
import torch

import terrafm_lightning.models  # noqa: F401  (registers terrafm_* in timm)
from terrafm_lightning.modalities import BANDS, S2_L1C_ALL_BANDS


def stem_input(model, modality, x):
    """The tensor the ``modality`` stem receives when the model is called on ``x``."""
    seen = []
    conv = getattr(model.patch_embed, f"conv2d_{modality}")
    handle = conv.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen[0]


def banded(count):
    """(1, count, 16, 16) with channel k holding the value k + 1."""
    return torch.arange(1, count + 1, dtype=torch.float32)[None, :, None, None].expand(
        1, count, 16, 16
    )


@pytest.mark.parametrize(
    "kwargs,modality,source",
    [
        ({}, "s2_l2a", BANDS["s2_l2a"]),
        ({"in_chans": 12}, "s2_l2a", BANDS["s2_l2a"]),
        ({"in_chans": 13}, "s2_l1c", S2_L1C_ALL_BANDS),
        ({"in_chans": 2}, "s1", ("VV", "VH")),
        ({"default_modality": "s1", "bands": ["VH", "VV"]}, "s1", ("VH", "VV")),
        ({"bands": ["B8A", "B02", "b4", "B03"]}, "s2_l2a", ("B8A", "B02", "B04", "B03")),
        ({"default_modality": "s2_l1c", "bands": ["B10", "B02"]}, "s2_l1c", ("B10", "B02")),
    ],
)
def test_each_stem_band_receives_its_input_band(kwargs, modality, source):
    model = timm.create_model("terrafm_tiny", depth=1, **kwargs).eval()
    received = stem_input(model, modality, banded(len(source)))[0, :, 0, 0]
    # Input channel k carries k + 1; a stem band the input lacks receives 0 (the mean).
    expected = [source.index(b) + 1.0 if b in source else 0.0 for b in BANDS[modality]]
    assert received.tolist() == expected


def test_l1c_13_bands_drop_b10_and_keep_b8a_after_b08():
    model = timm.create_model("terrafm_tiny", depth=1, in_chans=13).eval()
    received = stem_input(model, "s2_l1c", banded(13))[0, :, 0, 0].tolist()
    # B01..B08 = 1..8, B8A = 9, B09 = 10, (B10 = 11 dropped), B11 = 12, B12 = 13.
    assert received == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13]
