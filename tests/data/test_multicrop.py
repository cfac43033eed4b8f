from __future__ import annotations

import pytest
import torch

from terrafm_lightning.data.multicrop import (
    MultiCrop,
    crop_resize,
    draw_modalities,
    random_resized_boxes,
)
from terrafm_lightning.modalities import BANDS, MODALITIES, SSL4EO_STATS


def _batch(b: int = 4, size: int = 64) -> dict[str, torch.Tensor]:
    batch = {m: torch.rand(b, len(BANDS[m]), size, size) * 1000 + 1 for m in MODALITIES}
    available = torch.ones(b, 3, dtype=torch.bool)
    available[0, 0] = False  # sample 0 lacks S1: its row is all zero
    batch["s1"][0] = 0
    available[1] = torch.tensor([False, False, True])
    batch["s1"][1] = 0
    batch["s2_l1c"][1] = 0
    batch["available"] = available
    batch["worldcover_hist"] = torch.rand(b, 11)
    batch["dominant_class"] = torch.full((b,), 10)
    batch["index"] = torch.arange(b)
    return batch


def test_crop_resize_cuts_exact_pixels_at_unit_scale() -> None:
    images = torch.arange(2 * 3 * 20 * 30, dtype=torch.float32).view(2, 3, 20, 30)
    boxes = torch.tensor([[4.0, 2.0, 12.0, 10.0], [0.0, 12.0, 8.0, 20.0]])  # one crop, 2 samples
    out = crop_resize(images, boxes, 8)
    torch.testing.assert_close(out[0], images[0, :, 2:10, 4:12])
    torch.testing.assert_close(out[1], images[1, :, 12:20, 0:8])
    # Downscaling averages (anti-aliasing): a 2x box of a constant-per-block image gives the means.
    whole = crop_resize(images, torch.tensor([[0.0, 0.0, 30.0, 20.0]] * 2), 10)
    pooled = torch.nn.functional.avg_pool2d(images, kernel_size=(2, 3))
    torch.testing.assert_close(whole, pooled)


def test_random_boxes_respect_scale_ratio_and_bounds() -> None:
    boxes = random_resized_boxes(4000, 534, 534, (0.05, 0.25), (3 / 4, 4 / 3))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    share = w * h / 534**2
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 534).all() and (boxes[:, 3] <= 534).all()
    assert share.min() >= 0.05 - 1e-4 and share.max() <= 0.25 + 1e-4
    assert share.mean().item() == pytest.approx(0.15, abs=0.01)
    assert ((w / h) >= 3 / 4 - 1e-4).all() and ((w / h) <= 4 / 3 + 1e-4).all()


def test_draw_modes_never_pick_missing_and_never_empty() -> None:
    available = torch.tensor([[True, True, True], [False, True, True], [False, False, True]])
    available = available.repeat(2000, 1)
    for mode in ("all", "one", "subset"):
        drawn = draw_modalities(available, mode, 0.5)
        assert not (drawn & ~available).any()
        assert drawn.any(dim=1).all()
    assert torch.equal(draw_modalities(available, "all"), available)
    assert (draw_modalities(available, "one").sum(dim=1) == 1).all()
    one = draw_modalities(available, "one")[0::3].float().mean(dim=0)
    torch.testing.assert_close(one, torch.full((3,), 1 / 3), atol=0.04, rtol=0)
    # subset, three available, p = 0.5: P(kept | not empty) = 0.5 / (1 - 0.5**3) = 4/7.
    subset = draw_modalities(available, "subset", 0.5)[0::3].float().mean(dim=0)
    torch.testing.assert_close(subset, torch.full((3,), 4 / 7), atol=0.04, rtol=0)
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        draw_modalities(torch.tensor([[True, False, False], [False, False, False]]), "subset")


def test_multicrop_shapes_presence_and_normalisation() -> None:
    batch = _batch()
    crop = MultiCrop(n_global=2, global_size=32, n_local=3, local_size=16)
    out = crop(batch)
    assert len(out["global_crops"]) == 2 and len(out["local_crops"]) == 3
    assert len(out["teacher_presence"]) == 2 and len(out["student_presence"]) == 5
    for crops, size in ((out["global_crops"], 32), (out["local_crops"], 16)):
        for views in crops:
            assert set(views) == set(MODALITIES)
            for m, x in views.items():
                assert x.shape == (4, len(BANDS[m]), size, size)
                assert torch.isfinite(x).all()
    for presence in out["teacher_presence"] + out["student_presence"]:
        assert not (presence & ~batch["available"]).any() and presence.any(dim=1).all()
    # Absent rows (nodata 0) stay 0 after normalisation; present ones are standardised.
    assert (out["global_crops"][0]["s1"][0] == 0).all()
    normalised = crop.normalise(batch)["s2_l2a"]
    mean = torch.tensor(SSL4EO_STATS["s2_l2a"]["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(SSL4EO_STATS["s2_l2a"]["std"]).view(1, -1, 1, 1)
    torch.testing.assert_close(normalised, (batch["s2_l2a"] - mean) / std)
    for key in ("available", "dominant_class", "worldcover_hist", "index"):
        assert out[key] is batch[key]


def test_teacher_and_student_draw_independently() -> None:
    batch = _batch(b=64, size=32)
    batch["available"][:] = True
    out = MultiCrop(global_size=16, n_local=0, draw_mode="subset")(batch)
    teacher, student = out["teacher_presence"], out["student_presence"]
    assert not torch.equal(teacher[0], student[0]) and not torch.equal(teacher[1], student[1])


def test_store_stats_and_modality_restriction() -> None:
    batch = _batch(size=32)
    stats = {"s2_l2a": {"mean": [1.0] * 12, "std": [2.0] * 12}}
    crop = MultiCrop(modalities=["s2_l2a"], global_size=16, n_local=0, stats=stats)
    out = crop(batch)
    assert set(out["global_crops"][0]) == {"s2_l2a"}
    for presence in out["teacher_presence"] + out["student_presence"]:
        assert torch.equal(presence, torch.tensor([[False, False, True]] * 4))
    torch.testing.assert_close(crop.normalise(batch)["s2_l2a"], (batch["s2_l2a"] - 1.0) / 2.0)
    whole = crop.whole_tiles(batch)
    assert whole["inputs"]["s2_l2a"].shape == (4, 12, 16, 16)
    with pytest.raises(ValueError, match="s1: need 2 means"):
        MultiCrop(stats={"s1": {"mean": [0.0], "std": [1.0]}})


def test_flips_mirror_crops() -> None:
    batch = {m: torch.rand(1, len(BANDS[m]), 16, 16) + 1 for m in MODALITIES}
    batch["available"] = torch.ones(1, 3, dtype=torch.bool)
    common = {"global_size": 16, "global_scale": (1.0, 1.0), "ratio": (1.0, 1.0), "n_local": 0}
    plain = MultiCrop(hflip=False, vflip=False, **common)(batch)["global_crops"][0]["s2_l2a"]
    torch.manual_seed(0)
    flips = [
        MultiCrop(hflip=True, vflip=False, **common)(batch)["global_crops"][0]["s2_l2a"]
        for _ in range(16)
    ]
    assert any(torch.equal(f, plain) for f in flips)
    assert any(torch.equal(f, plain.flip(-1)) for f in flips)
