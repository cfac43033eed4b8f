"""TerraFMPretrainModule on hand-made contract batches: gradients, EMA, schedules, NaN stop."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from terrafm_lightning.ssl import module as module_lib
from terrafm_lightning.ssl.module import TerraFMPretrainModule
from tests.generators.batches import make_batch

TINY = {
    "backbone": "terrafm_tiny",
    "backbone_kwargs": {"depth": 2},
    "num_prototypes": 128,
    "head_hidden_dim": 64,
    "head_bottleneck_dim": 32,
    "high_frequency_classes": [10, 30],
    "warmup_epochs": 0.5,
    "teacher_temp_warmup_epochs": 0.5,
    "freeze_last_layer_epochs": 0.0,
}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    # Two shared cores: more threads only add contention.
    torch.set_num_threads(1)


def _loader(n: int) -> DataLoader:
    batches = [make_batch(generator=torch.Generator().manual_seed(i)) for i in range(n)]
    return DataLoader(batches, batch_size=None)


def _fit(model: L.LightningModule, n_batches: int = 2, **trainer: Any) -> L.Trainer:
    trainer = L.Trainer(
        **{
            "max_epochs": 1,
            "accelerator": "cpu",
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "gradient_clip_val": 3.0,
            **trainer,
        }
    )
    trainer.fit(model, _loader(n_batches))
    return trainer


class _Recorder(L.Callback):
    """Checks the teacher before and after each optimizer step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        assert not pl_module.teacher.training
        assert all(p.grad is None for p in pl_module.teacher.parameters())
        assert any(p.grad is not None for p in pl_module.student.parameters())
        self.steps.append(
            {
                "step": trainer.global_step,
                "teacher": [p.clone() for p in pl_module.teacher.parameters()],
                "lr": [g["lr"] for g in optimizer.param_groups],
            }
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.steps or "after" in self.steps[-1]:
            return  # accumulating: no optimizer step this batch
        record = self.steps[-1]
        m = pl_module.schedule_values(record["step"])["momentum"]
        for t, old, s in zip(
            pl_module.teacher.parameters(),
            record["teacher"],
            pl_module.student.parameters(),
            strict=True,
        ):
            torch.testing.assert_close(t, m * old + (1 - m) * s)
        record["after"] = True


def test_teacher_gets_no_gradient_and_follows_the_ema() -> None:
    model = TerraFMPretrainModule(**TINY)
    recorder = _Recorder()
    trainer = _fit(model, 3, callbacks=[recorder])
    assert trainer.global_step == 3 and all("after" in r for r in recorder.steps)
    assert not any(p.requires_grad for p in model.teacher.parameters())
    metrics = trainer.callback_metrics
    for key in (
        "loss",
        "lr",
        "weight_decay",
        "momentum",
        "teacher_temp",
        "teacher_entropy",
        "student_feature_std",
        "center_norm",
        "center_hf_norm",
        "high_frequency_share",
        "samples_per_sec",
    ):
        assert torch.isfinite(metrics[f"train/{key}"]), key
    assert metrics["train/high_frequency_share"] == pytest.approx(0.5)  # classes 10,30,50,95


def test_schedules_advance_per_optimizer_step_under_accumulation(monkeypatch) -> None:
    calls: list[float] = []
    real = module_lib.ema_update
    monkeypatch.setattr(
        module_lib, "ema_update", lambda t, s, m: (calls.append(m), real(t, s, m))[1]
    )
    model = TerraFMPretrainModule(**TINY)
    recorder = _Recorder()
    trainer = _fit(model, 4, accumulate_grad_batches=2, callbacks=[recorder])
    assert trainer.global_step == 2
    assert [r["step"] for r in recorder.steps] == [0, 1]
    # 4 micro-batches, 2 optimizer steps -> schedules built over 2 steps, EMA run twice.
    assert calls == [model.schedule_values(0)["momentum"], model.schedule_values(1)["momentum"]]
    assert calls[0] == pytest.approx(0.996)
    lr = [model.schedule_values(s)["lr"] for s in (0, 1)]
    assert [r["lr"][0] for r in recorder.steps] == pytest.approx(lr)
    # lr is per 256 samples: global batch 4 samples x 2 accumulated micro-batches.
    assert lr[0] == 0.0 and lr[1] == pytest.approx(5e-4 * 4 * 2 / 256)
    assert model.peak_lr == pytest.approx(5e-4 * 8 / 256)


def test_last_layer_frozen_for_the_first_steps() -> None:
    model = TerraFMPretrainModule(**{**TINY, "freeze_last_layer_epochs": 1.0, "warmup_epochs": 0})
    last = model.student.head.last_layer.parametrizations.weight.original1.clone()
    mlp = model.student.head.mlp[0].weight.clone()
    _fit(model, 2)
    torch.testing.assert_close(
        model.student.head.last_layer.parametrizations.weight.original1, last
    )
    assert not torch.equal(model.student.head.mlp[0].weight, mlp)


def test_non_finite_loss_stops_naming_the_step() -> None:
    model = TerraFMPretrainModule(**TINY)
    with torch.no_grad():
        model.student.head.mlp[0].bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite DINO loss .* at optimizer step 0"):
        _fit(model, 2)


def test_param_groups_exclude_norms_biases_tokens_and_queries() -> None:
    model = TerraFMPretrainModule(**{**TINY, "layer_decay": 0.5})
    names = {id(p): n for n, p in model.student.named_parameters()}
    groups = model.configure_optimizers().param_groups
    decayed = {names[id(p)] for g in groups if g["decay"] for p in g["params"]}
    plain = {names[id(p)] for g in groups if not g["decay"] for p in g["params"]}
    for name in (
        "backbone.pos_embed",
        "backbone.cls_token",
        "backbone.patch_embed.fusion.queries",
        "backbone.patch_embed.fusion.score",
        "backbone.blocks.0.norm1.weight",
        "backbone.blocks.1.attn.qkv.bias",
    ):
        assert name in plain
    assert {"backbone.blocks.0.attn.qkv.weight", "head.mlp.0.weight"} <= decayed
    # Frozen prototype norms (norm_last_layer) are not optimised at all.
    assert "head.last_layer.parametrizations.weight.original0" not in decayed | plain
    scales = {names[id(g["params"][0])]: g["lr_scale"] for g in groups}
    by_layer = {n.split(".")[2] if ".blocks." in n else n: s for n, s in scales.items()}
    assert by_layer["0"] == pytest.approx(0.25) and by_layer["1"] == pytest.approx(0.5)


def test_dual_centering_needs_the_high_frequency_set() -> None:
    later = TerraFMPretrainModule(**{**TINY, "high_frequency_classes": None})
    assert later.centering is None  # built in setup, from the datamodule's classes
    with pytest.raises(ValueError, match="high_frequency_classes"):
        later._build_centering()
    with pytest.raises(ValueError, match=r"\[30\] are not in class_frequencies"):
        TerraFMPretrainModule(**{**TINY, "class_frequencies": {10: 0.7, 50: 0.3}})
    plain = TerraFMPretrainModule(**{**TINY, "centering": "dino", "high_frequency_classes": None})
    assert set(plain.centering.norms()) == {"center_norm"}


def test_gradients_clipped_per_parameter_as_dino_by_default() -> None:
    model = TerraFMPretrainModule(**TINY)
    optimizer = model.configure_optimizers()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        p.grad = torch.full_like(p, 10.0 if i == 0 else 1e-4)  # one huge, the rest small
    before = [p.grad.clone() for p in params]
    model.configure_gradient_clipping(optimizer, 3.0, None)
    norms = [float(p.grad.norm()) for p in params]
    assert norms[0] == pytest.approx(3.0, rel=1e-5)  # the big one rescaled to the clip value
    for p, old in zip(params[1:], before[1:], strict=True):
        if float(old.norm()) < 3.0:
            torch.testing.assert_close(p.grad, old)  # DINO leaves the others alone
    assert any(float(old.norm()) < 3.0 for old in before[1:])


def test_global_norm_clipping_is_an_option() -> None:
    model = TerraFMPretrainModule(**{**TINY, "clip_mode": "global_norm"})
    seen: list[float] = []

    class Norm(L.Callback):
        def on_before_zero_grad(self, trainer, pl_module, optimizer) -> None:
            grads = [p.grad for p in pl_module.student.parameters() if p.grad is not None]
            if grads:  # the zero_grad before the first step sees no gradient yet
                seen.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    _fit(model, 3, gradient_clip_val=1e-3, callbacks=[Norm()])
    assert seen and all(n == pytest.approx(1e-3, rel=1e-3) for n in seen)
    with pytest.raises(ValueError, match="clip_mode"):
        TerraFMPretrainModule(**{**TINY, "clip_mode": "each"})
