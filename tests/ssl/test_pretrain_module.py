"""TerraFMPretrainModule on hand-made contract batches: gradients, EMA, schedules, NaN, syncs."""

from __future__ import annotations

import csv
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader

from terrafm_lightning.data.multicrop import MultiCrop
from terrafm_lightning.modalities import BANDS, MODALITIES
from terrafm_lightning.ssl import module as module_lib
from terrafm_lightning.ssl.ema import ema_update
from terrafm_lightning.ssl.module import TerraFMPretrainModule
from terrafm_lightning.ssl.throughput import PretrainThroughputMonitor
from tests.generators.batches import make_batch, take_samples
from tests.generators.modules import TINY_NETWORKS

TINY = {
    **TINY_NETWORKS,
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


def _fit(model: L.LightningModule, n_batches: int | list = 2, **trainer: Any) -> L.Trainer:
    """Fit one epoch over ``n_batches`` generated batches (or the given list of batches)."""
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
    batches = n_batches if isinstance(n_batches, list) else None
    trainer.fit(model, DataLoader(batches, batch_size=None) if batches else _loader(n_batches))
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
    ):
        assert torch.isfinite(metrics[f"train/{key}"]), key
    assert metrics["train/high_frequency_share"] == pytest.approx(0.5)  # classes 10,30,50,95


def test_throughput_monitor_counts_tiles(tmp_path) -> None:
    model = TerraFMPretrainModule(**TINY)
    logger = CSVLogger(tmp_path, name="run")
    monitor = PretrainThroughputMonitor(window_size=2)
    _fit(model, 4, logger=logger, log_every_n_steps=1, callbacks=[monitor])
    with open(logger.log_dir + "/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/samples")]
    # 4 tiles per batch (make_batch), counted after each of the 4 batches.
    assert [(int(r["train/batches"]), int(r["train/samples"])) for r in rows] == [
        (1, 4),
        (2, 8),
        (3, 12),
        (4, 16),
    ]
    rates = [r for r in rows if r.get("train/device/samples_per_sec")]
    assert len(rates) == 3  # a rate needs a full window of 2 batches
    for row in rates:
        samples = float(row["train/device/samples_per_sec"])
        assert samples == pytest.approx(4 * float(row["train/device/batches_per_sec"]), rel=1e-9)


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


def test_layers_of_equal_lr_scale_share_one_param_group() -> None:
    model = TerraFMPretrainModule(**TINY)  # no layer decay: one group with decay, one without
    groups = model.configure_optimizers().param_groups
    assert sorted(g["decay"] for g in groups) == [False, True]
    assert all(g["lr_scale"] == 1.0 for g in groups)
    grouped = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in model.student.parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable)


def test_dual_centering_needs_the_high_frequency_set() -> None:
    later = TerraFMPretrainModule(**{**TINY, "high_frequency_classes": None})
    assert later.centering is None  # built in setup, from the datamodule's classes
    with pytest.raises(ValueError, match="high_frequency_classes"):
        later._build_centering()
    with pytest.raises(ValueError, match=r"\[30\] are not in class_frequencies"):
        TerraFMPretrainModule(**{**TINY, "class_frequencies": {10: 0.7, 50: 0.3}})
    plain = TerraFMPretrainModule(**{**TINY, "centering": "dino", "high_frequency_classes": None})
    assert set(plain.centering.norms()) == {"center_norm"}


class _CountHostReads(TorchDispatchMode):
    """Counts the ops, called from Python, that read a device value back to the host."""

    READS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.item")

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []
        self.asserts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        bool_index = name == "aten.index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
        )
        if name.startswith(self.READS) or bool_index:
            self.reads.append(str(func))
        self.asserts += name == "aten._assert_async"
        return func(*args, **(kwargs or {}))


def test_step_components_read_nothing_back_to_the_host() -> None:
    # Multi-crop with subset draws, both forwards, loss, centring, backward, fused AdamW and EMA.
    tiles = {m: torch.rand(4, len(BANDS[m]), 64, 64) * 1000 + 1 for m in MODALITIES}
    tiles["available"] = torch.tensor([[1, 1, 1], [0, 1, 1], [1, 0, 1], [0, 0, 1]]).bool()
    tiles["dominant_class"] = torch.tensor([10, 30, 50, 95])
    multicrop = MultiCrop(global_size=32, n_local=2, local_size=16)
    model = TerraFMPretrainModule(**TINY)
    optimizer = torch.optim.AdamW(model.student.parameters(), fused=True)
    with _CountHostReads() as counter:
        batch = multicrop(tiles)
        out = model._loss(batch, teacher_temp=0.04)
        model.centering.accumulate(out["teacher"], batch["dominant_class"])
        out["loss"].backward()
        optimizer.step()
        ema_update(model.teacher, model.student, 0.996)
        model.centering.step()
    assert counter.reads == []
    # Mask checks are device-side assertions: the draw, and one per backbone call.
    assert counter.asserts == 4


class _CentreRecorder(L.Callback):
    def __init__(self) -> None:
        self.centres: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.centres.append(pl_module.centering.center.clone())


def test_centres_move_once_per_optimizer_step_like_one_big_batch() -> None:
    whole = make_batch(8, generator=torch.Generator().manual_seed(3))
    halves = [take_samples(whole, slice(0, 4)), take_samples(whole, slice(4, 8))]
    centres = {}
    for name, batches, accumulate in (("whole", [whole], 1), ("halves", halves, 2)):
        torch.manual_seed(0)
        model = TerraFMPretrainModule(**TINY)
        record = _CentreRecorder()
        trainer = _fit(model, batches, accumulate_grad_batches=accumulate, callbacks=[record])
        assert trainer.global_step == 1
        centres[name] = (model.centering.center, model.centering.center_hf)
        if accumulate > 1:  # untouched after the first micro-batch
            assert torch.equal(record.centres[0], torch.zeros_like(record.centres[0]))
    assert centres["whole"][0].abs().sum() > 0 and centres["whole"][1].abs().sum() > 0
    for got, expected in zip(centres["halves"], centres["whole"], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_non_finite_loss_is_reported_before_any_checkpoint(tmp_path) -> None:
    model = TerraFMPretrainModule(**TINY)
    with torch.no_grad():
        model.student.head.mlp[0].bias.fill_(float("nan"))
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)
    message = r"non-finite DINO loss \(nan\) at optimizer step 0"
    with pytest.raises(FloatingPointError, match=message):
        _fit(model, 3, log_every_n_steps=5, enable_checkpointing=True, callbacks=[checkpoints])
    assert not list(tmp_path.iterdir())


def test_stems_without_crops_still_take_part_with_zero_gradient() -> None:
    # DDP without find_unused_parameters needs a gradient, even a zero one, for every parameter.
    model = TerraFMPretrainModule(**TINY)
    embed = model.student.backbone.patch_embed
    for kept in (("s2_l1c", "s2_l2a"), ("s2_l2a",)):
        batch = make_batch()
        for crops in (batch["global_crops"], batch["local_crops"]):
            for m in set(crops) - set(kept):
                del crops[m]
        for key in ("teacher_presence", "student_presence"):
            batch[key] = torch.zeros_like(batch[key])
            batch[key][:, [MODALITIES.index(m) for m in kept]] = True
        model.zero_grad(set_to_none=True)
        model._loss(batch, teacher_temp=0.04)["loss"].backward()
        unused = embed.unused_parameters(kept)
        ids = {id(p) for p in unused}
        assert id(embed.conv2d_s1.weight) in ids
        assert (id(embed.fusion.queries) in ids) == (len(kept) == 1)
        assert all(p.grad is not None and not p.grad.any() for p in unused)
        assert embed.conv2d_s2_l2a.weight.grad.abs().sum() > 0


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


def test_per_parameter_clipping_equals_the_loop_over_parameters() -> None:
    model = TerraFMPretrainModule(**TINY)
    optimizer = model.configure_optimizers()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    generator = torch.Generator().manual_seed(0)
    for i, p in enumerate(params):
        if i % 7 != 3:  # some parameters without a gradient
            scale = 10.0 ** torch.randint(-4, 3, (), generator=generator).item()
            p.grad = torch.randn(p.shape, generator=generator) * scale
    expected = []
    for p in params:
        if p.grad is not None:
            norm = torch.linalg.vector_norm(p.grad)
            expected.append(p.grad * (3.0 / (norm + 1e-6)).clamp(max=1.0))
    model.configure_gradient_clipping(optimizer, 3.0, None)
    grads = [p.grad for p in params if p.grad is not None]
    assert len(grads) == len(expected) < len(params)
    for grad, reference in zip(grads, expected, strict=True):
        torch.testing.assert_close(grad, reference)


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
