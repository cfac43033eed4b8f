"""DINO head, loss, centring, schedules and EMA against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from terrafm_lightning.ssl.centering import Centering, DualCentering
from terrafm_lightning.ssl.checkpoint import next_hpc_checkpoint
from terrafm_lightning.ssl.ema import ema_update
from terrafm_lightning.ssl.head import DINOHead
from terrafm_lightning.ssl.loss import dino_loss
from terrafm_lightning.ssl.schedules import WarmupCosine


def test_loss_matches_hand_computed_case() -> None:
    teacher = torch.tensor([[[0.5, 0.5]], [[1.0, 0.0]]])  # (2 globals, B=1, K=2)
    ln3 = math.log(3.0)
    student = torch.tensor([[[0.0, 0.0]], [[0.0, ln3]], [[ln3, 0.0]]])  # 2 globals + 1 local
    # Pairs (t0,s1), (t0,s2), (t1,s0), (t1,s2): ln(16/3) + ln 2 + ln(4/3), averaged.
    expected = math.log(128 / 9) / 4
    assert dino_loss(student, teacher, student_temp=1.0).item() == pytest.approx(expected, rel=1e-6)
    # The temperature divides the student logits before the softmax.
    halved = dino_loss(student * 0.5, teacher, student_temp=0.5)
    assert halved.item() == pytest.approx(expected, rel=1e-6)


def test_loss_skips_same_view_pairs_and_averages_batch() -> None:
    k = 5
    teacher = torch.softmax(torch.randn(2, 3, k), -1)
    student = torch.randn(4, 3, k)
    log_p = torch.log_softmax(student / 0.1, -1)
    pairs = [-(teacher[i] * log_p[j]).sum(-1).mean() for i in range(2) for j in range(4) if i != j]
    assert dino_loss(student, teacher, 0.1).item() == pytest.approx(
        torch.stack(pairs).mean().item(), rel=1e-5
    )
    with pytest.raises(ValueError, match="student crops"):
        dino_loss(student[:1], teacher, 0.1)


def test_dino_centering_is_ema_of_batch_mean() -> None:
    centre = Centering(3, momentum=0.9)
    logits = torch.tensor([[[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]])  # (1, B=2, 3)
    centre.update(logits, torch.tensor([10, 20]))
    torch.testing.assert_close(centre.center, torch.full((1, 3), 0.2))
    torch.testing.assert_close(centre(logits), logits - 0.2)


def test_dual_centering_uses_high_frequency_samples_only() -> None:
    centre = DualCentering(2, high_frequency_classes=[10, 80], momentum=0.5, alpha=0.8)
    logits = torch.tensor([[[4.0, 0.0], [0.0, 8.0], [2.0, 2.0]]])  # classes 10, 95, 80
    centre.update(logits, torch.tensor([10, 95, 80]))
    torch.testing.assert_close(centre.center, torch.tensor([[1.0, 5 / 3]]))  # 0.5 * mean
    torch.testing.assert_close(centre.center_hf, torch.tensor([[1.5, 0.5]]))  # 0.5 * hf mean
    torch.testing.assert_close(
        centre(torch.zeros(1, 2)), -(0.8 * centre.center + 0.2 * centre.center_hf)
    )
    # A batch without any high-frequency sample moves c but leaves c_h unchanged.
    before = centre.center_hf.clone()
    centre.update(torch.ones(2, 2, 2), torch.tensor([95, 50]))
    torch.testing.assert_close(centre.center_hf, before)
    torch.testing.assert_close(centre.center, torch.tensor([[1.0, 5 / 3]]) * 0.5 + 0.5)
    assert set(centre.norms()) == {"center_norm", "center_hf_norm"}
    with pytest.raises(ValueError, match="high_frequency_classes"):
        DualCentering(2, high_frequency_classes=[])


def test_schedule_endpoints() -> None:
    momentum = WarmupCosine(0.996, 1.0, total_steps=100)
    assert momentum(0) == pytest.approx(0.996)
    assert momentum(100) == pytest.approx(1.0)
    assert momentum(50) == pytest.approx(0.998)
    temp = WarmupCosine(0.06, 0.06, total_steps=100, warmup_steps=10, warmup_start=0.04)
    assert temp(0) == pytest.approx(0.04)
    assert temp(5) == pytest.approx(0.05)
    assert temp(10) == temp(99) == pytest.approx(0.06)
    lr = WarmupCosine(1e-3, 1e-6, total_steps=20, warmup_steps=4)
    assert [lr(s) for s in range(5)] == pytest.approx([0, 2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lr(20) == pytest.approx(1e-6)
    wd = WarmupCosine(0.04, 0.4, total_steps=10)
    assert wd(0) == pytest.approx(0.04) and wd(10) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupCosine(1.0, 0.0, total_steps=5, warmup_steps=6)


def test_ema_update_matches_formula() -> None:
    student, teacher = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    old = [p.clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.9)
    for t, o, s in zip(teacher.parameters(), old, student.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * o + 0.1 * s)
    with pytest.raises(ValueError, match="same model"):
        ema_update(teacher, torch.nn.Linear(3, 2, bias=False), 0.9)


def test_dino_head_prototypes_are_unit_norm_and_fixed() -> None:
    head = DINOHead(16, num_prototypes=32, hidden_dim=24, bottleneck_dim=8)
    out = head(torch.randn(5, 16))
    assert out.shape == (5, 32)
    # Unit prototypes and an L2-normalised bottleneck: logits are cosines.
    assert out.abs().max() <= 1.0 + 1e-5
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(32))
    magnitude = head.last_layer.parametrizations.weight.original0
    assert not magnitude.requires_grad
    assert DINOHead(
        16, 32, 24, 8, norm_last_layer=False
    ).last_layer.parametrizations.weight.original0.requires_grad


def test_next_hpc_checkpoint_follows_the_highest_number(tmp_path) -> None:
    assert next_hpc_checkpoint(str(tmp_path / "missing")) == str(
        tmp_path / "missing" / "hpc_ckpt_1.ckpt"
    )
    assert next_hpc_checkpoint(str(tmp_path)) == str(tmp_path / "hpc_ckpt_1.ckpt")
    for name in ("hpc_ckpt_2.ckpt", "hpc_ckpt_10.ckpt", "hpc_ckpt_x.ckpt", "last.ckpt"):
        (tmp_path / name).touch()
    assert next_hpc_checkpoint(str(tmp_path)) == str(tmp_path / "hpc_ckpt_11.ckpt")
