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


def test_subset_draws_follow_the_rejection_loop_distribution() -> None:
    # The paper's draw: keep each available modality with p, redraw while empty. The static draw
    # must give every subset the same probability.
    patterns = [[True, True, True], [False, True, True], [True, False, True], [False, False, True]]
    rows = 20000
    for p in (0.5, 0.3):
        for pattern in patterns:
            available = torch.tensor([pattern]).repeat(rows, 1)
            drawn = draw_modalities(available, "subset", p)
            reference = torch.zeros_like(available)
            todo = torch.ones(rows, dtype=torch.bool)
            while todo.any():
                keep = (torch.rand(rows, 3) < p) & available
                reference = torch.where(todo[:, None], keep, reference)
                todo = ~reference.any(dim=1)
            codes = torch.tensor([1, 2, 4])
            hist = torch.bincount((drawn.long() * codes).sum(1), minlength=8).float() / rows
            ref = torch.bincount((reference.long() * codes).sum(1), minlength=8).float() / rows
            kept = torch.tensor(pattern).sum().item()
            exact = torch.zeros(8)
            for code in range(1, 8):
                subset = torch.tensor([bool(code & c) for c in (1, 2, 4)])
                if not (subset & ~torch.tensor(pattern)).any():
                    size = subset.sum().item()
                    exact[code] = p**size * (1 - p) ** (kept - size) / (1 - (1 - p) ** kept)
            torch.testing.assert_close(hist, exact, atol=0.015, rtol=0)
            torch.testing.assert_close(ref, exact, atol=0.015, rtol=0)
    # p = 1 keeps every available modality.
    available = torch.tensor(patterns)
    assert torch.equal(draw_modalities(available, "subset", 1.0), available)
    with pytest.raises(ValueError, match="unknown modality draw mode"):
        draw_modalities(available, "most")


def test_multicrop_shapes_presence_and_normalisation() -> None:
    batch = _batch()
    crop = MultiCrop(n_global=2, global_size=32, n_local=3, local_size=16)
    out = crop(batch)
    # Crops stay concatenated, crop-major: row k * B + b is crop k of tile b.
    assert out["teacher_presence"].shape == (2 * 4, 3)
    assert out["student_presence"].shape == (5 * 4, 3)
    for crops, n, size in ((out["global_crops"], 2, 32), (out["local_crops"], 3, 16)):
        assert set(crops) == set(MODALITIES)
        for m, x in crops.items():
            assert x.shape == (n * 4, len(BANDS[m]), size, size)
            assert torch.isfinite(x).all()
    for presence in (out["teacher_presence"], out["student_presence"]):
        available = batch["available"].repeat(presence.shape[0] // 4, 1)
        assert not (presence & ~available).any() and presence.any(dim=1).all()
    # Absent rows (nodata 0) stay 0 after normalisation; present ones are standardised.
    assert (out["global_crops"]["s1"][0] == 0).all() and (out["global_crops"]["s1"][4] == 0).all()
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
    assert not torch.equal(teacher[:64], student[:64])
    assert not torch.equal(teacher[64:], student[64:128])


def test_store_stats_and_modality_restriction() -> None:
    batch = _batch(size=32)
    stats = {"s2_l2a": {"mean": [1.0] * 12, "std": [2.0] * 12}}
    crop = MultiCrop(modalities=["s2_l2a"], global_size=16, n_local=0, stats=stats)
    out = crop(batch)
    assert set(out["global_crops"]) == {"s2_l2a"} and out["local_crops"] == {}
    for presence in (out["teacher_presence"], out["student_presence"]):
        assert torch.equal(presence, torch.tensor([[False, False, True]] * 8))
    torch.testing.assert_close(crop.normalise(batch)["s2_l2a"], (batch["s2_l2a"] - 1.0) / 2.0)
    whole = crop.whole_tiles(batch)
    assert whole["inputs"]["s2_l2a"].shape == (4, 12, 16, 16)
    with pytest.raises(ValueError, match="s1: need 2 means"):
        MultiCrop(stats={"s1": {"mean": [0.0], "std": [1.0]}})


def test_flips_mirror_crops() -> None:
    batch = {m: torch.rand(1, len(BANDS[m]), 16, 16) + 1 for m in MODALITIES}
    batch["available"] = torch.ones(1, 3, dtype=torch.bool)
    common = {"global_size": 16, "global_scale": (1.0, 1.0), "ratio": (1.0, 1.0), "n_local": 0}

    def first_crop(**flips: bool) -> torch.Tensor:
        return MultiCrop(**flips, **common)(batch)["global_crops"]["s2_l2a"][:1]

    plain = first_crop(hflip=False, vflip=False)
    torch.manual_seed(0)
    flips = [first_crop(hflip=True, vflip=False) for _ in range(16)]
    assert any(torch.equal(f, plain) for f in flips)
    assert any(torch.equal(f, plain.flip(-1)) for f in flips)
    # Both directions: every crop is one of the four mirrors, and each of them occurs.
    mirrors = [plain, plain.flip(-1), plain.flip(-2), plain.flip(-1).flip(-2)]
    both = [first_crop(hflip=True, vflip=True) for _ in range(24)]
    seen = {next(i for i, m in enumerate(mirrors) if torch.equal(f, m)) for f in both}
    assert seen == {0, 1, 2, 3}
