"""TerraFM self-distillation pretraining as a LightningModule: the DINO step.

The networks (student, EMA teacher, FSDP2 sharding, compilation, activation checkpointing) come
from :class:`~terrafm_lightning.ssl.student_teacher.StudentTeacherModule`; per-parameter clipping
from :mod:`~terrafm_lightning.ssl.clipping`, the non-finite check from
:mod:`~terrafm_lightning.ssl.finite`, per-batch reseeding from :mod:`~terrafm_lightning.ssl.rng`
and the validation kNN from :mod:`~terrafm_lightning.ssl.online_knn`. Throughput is
:class:`~terrafm_lightning.ssl.throughput.PretrainThroughputMonitor`, a callback.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from lightning.pytorch.cli import instantiate_class
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from terrafm_lightning.batch import CropBatch, TileView
from terrafm_lightning.errors import UserError
from terrafm_lightning.modalities import worldcover_index
from terrafm_lightning.ssl.centering import Centering, DualCentering
from terrafm_lightning.ssl.clipping import clip_per_parameter_
from terrafm_lightning.ssl.ema import ema_update
from terrafm_lightning.ssl.finite import NonFiniteLossGuard
from terrafm_lightning.ssl.loss import dino_loss
from terrafm_lightning.ssl.online_knn import gather_samples, unique_samples, validation_metrics
from terrafm_lightning.ssl.optim import layer_decay_groups
from terrafm_lightning.ssl.rng import reseed_training_batch
from terrafm_lightning.ssl.schedules import WarmupCosine
from terrafm_lightning.ssl.student_teacher import StudentTeacherModule


class TerraFMPretrainModule(StudentTeacherModule):
    """DINO-style student/EMA-teacher pretraining of a TerraFM backbone with dual centring.

    Consumes the pretraining batch of ``docs/contracts.md`` (global/local crops with per-crop
    presence masks, produced by ``TerraFMDataModule``). All schedules are per optimizer step
    (so they are correct under gradient accumulation) and derive from ``trainer.global_step``,
    so a resumed run continues them exactly.

    Args:
        backbone: backbone factory name (``terrafm_tiny|small|base|large``, timm registry).
        backbone_kwargs: extra factory arguments (e.g. ``depth``, ``modalities``).
        drop_path_rate: stochastic depth of the student (the teacher has none).
        num_prototypes: K of the DINO head.
        head_hidden_dim: DINO head MLP width.
        head_bottleneck_dim: DINO head bottleneck width.
        norm_last_layer: fix the prototype norms to 1 (DINO's ``norm_last_layer``).
        centering: ``"dual"`` (TerraFM; needs the store's WorldCover class statistics) or
            ``"dino"`` (plain DINO centring, for stores without a WorldCover map).
        center_momentum: EMA momentum of the centre(s).
        dual_alpha: weight of the global centre in dual centring.
        class_frequencies: WorldCover class code -> pixel share of the store (linked from the
            datamodule; recorded in the checkpoint's hyper-parameters).
        high_frequency_classes: WorldCover codes whose samples update ``c_h`` (linked from the
            datamodule; required for dual centring).
        lr: peak learning rate per 256 samples (DINO's 5e-4); the run's peak is
            ``lr * global_batch / 256`` with global batch = devices x nodes x batch size x
            gradient accumulation, computed at fit start and logged.
        min_lr: learning rate at the end of the cosine (absolute, as in DINO).
        warmup_epochs: linear learning-rate warm-up length.
        weight_decay: weight decay at the start of the cosine.
        weight_decay_end: weight decay at the end.
        layer_decay: layer-wise lr decay factor (1.0 disables it).
        momentum_teacher: EMA momentum at the start (cosine to ``momentum_teacher_end``).
        momentum_teacher_end: EMA momentum at the end.
        warmup_teacher_temp: teacher temperature at step 0.
        teacher_temp: teacher temperature after its warm-up.
        teacher_temp_warmup_epochs: length of the linear teacher temperature warm-up.
        student_temp: student temperature.
        freeze_last_layer_epochs: the head's prototype layer gets no updates this long.
        seed: seeds the per-batch random stream (crops, modality draws, drop-path), so a
            resumed run draws exactly what an uninterrupted one draws.
        clip_mode: how ``trainer.gradient_clip_val`` clips: ``"per_parameter"`` (DINO: each
            gradient tensor rescaled to norm <= the value on its own) or ``"global_norm"``
            (Lightning's clip of the norm over all gradients).
        compile: ``torch.compile`` the networks (:class:`StudentTeacherModule`).
        grad_checkpointing: activation checkpointing of the student's blocks
            (:class:`StudentTeacherModule`).

    Modules that train something else on the pretrained networks subclass
    :class:`StudentTeacherModule` instead (see :mod:`terrafm_lightning.ssl.probe`).

    Validation (held-out tiles of ``TerraFMDataModule``, every ``check_val_every_n_epoch``):
    ``val/loss`` is the DINO loss between the whole tile and its left-right flip (deterministic
    views, no local crops), ``val/knn_top1`` the weighted kNN (k=20, T=0.07) top-1 accuracy of
    the teacher's CLS on the tiles' dominant WorldCover class (two folds of the validation set,
    each the other's bank) and ``val/knn_rare_top1`` the same over tiles whose dominant class is
    not high-frequency. Per-sample values are gathered over ranks and de-duplicated by sample
    index, so any number of processes gives the same metrics.

    ``--optimizer X`` on the CLI replaces AdamW by X over the same layer groups (lr and weight
    decay still follow the schedules); ``--lr_scheduler`` is refused, the schedules being part of
    the recipe.
    """

    flops_per_batch: int | None = None
    """FLOPs of one training batch per device, for ``ThroughputMonitor``'s MFU (None: unknown)."""

    def __init__(
        self,
        backbone: str = "terrafm_base",
        backbone_kwargs: dict[str, Any] | None = None,
        drop_path_rate: float = 0.1,
        num_prototypes: int = 65536,
        head_hidden_dim: int = 2048,
        head_bottleneck_dim: int = 256,
        norm_last_layer: bool = True,
        centering: Literal["dual", "dino"] = "dual",
        center_momentum: float = 0.9,
        dual_alpha: float = 0.8,
        class_frequencies: dict[int, float] | None = None,
        high_frequency_classes: list[int] | None = None,
        lr: float = 5e-4,
        min_lr: float = 1e-6,
        warmup_epochs: float = 10.0,
        weight_decay: float = 0.04,
        weight_decay_end: float = 0.4,
        layer_decay: float = 1.0,
        momentum_teacher: float = 0.996,
        momentum_teacher_end: float = 1.0,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.06,
        teacher_temp_warmup_epochs: float = 30.0,
        student_temp: float = 0.1,
        freeze_last_layer_epochs: float = 1.0,
        seed: int = 0,
        clip_mode: Literal["per_parameter", "global_norm"] = "per_parameter",
        compile: bool | str = False,
        grad_checkpointing: bool | int = False,
    ) -> None:
        super().__init__(
            backbone,
            backbone_kwargs,
            drop_path_rate,
            num_prototypes,
            head_hidden_dim,
            head_bottleneck_dim,
            norm_last_layer,
            compile,
            grad_checkpointing,
        )
        if class_frequencies is not None and high_frequency_classes is not None:
            unknown = sorted(set(high_frequency_classes) - set(class_frequencies))
            if unknown:
                raise UserError(
                    f"high_frequency_classes {unknown} are not in class_frequencies "
                    f"{sorted(class_frequencies)}"
                )
        if centering not in ("dual", "dino"):
            raise UserError(f"centering must be 'dual' or 'dino', got {centering!r}")
        if clip_mode not in ("per_parameter", "global_norm"):
            raise UserError(
                f"clip_mode must be 'per_parameter' or 'global_norm', got {clip_mode!r}"
            )
        self.optimizer_init: dict[str, Any] | None = None
        self.peak_lr: float | None = None
        self.centering: Centering | None = None
        if centering == "dino" or high_frequency_classes:
            self._build_centering()
        self._schedules: dict[str, WarmupCosine] = {}
        self._freeze_last_layer_steps = 0
        self._warmup_steps = 0
        self._val_outputs: list[dict[str, Tensor]] = []
        self._non_finite = NonFiniteLossGuard()
        self._high_frequency: Tensor | None = None

    # ----------------------------------------------------------------------------- setup
    def _build_centering(self, source: str | None = None) -> None:
        """Build the centring; ``source`` names where the class statistics came from."""
        hp = self.hparams
        if hp.centering == "dino":
            self.centering = Centering(hp.num_prototypes, hp.center_momentum)
            return
        if not hp.high_frequency_classes:
            if source is not None:
                raise UserError(
                    f"dual centring needs WorldCover class frequencies and {source} has none (no "
                    "WorldCover map): train with --model.init_args.centering dino"
                )
            raise UserError(
                "dual centring needs model.init_args.high_frequency_classes (WorldCover codes), "
                "or a datamodule that reads them from its store (TerraFMDataModule); "
                "--model.init_args.centering dino needs neither"
            )
        self.centering = DualCentering(
            hp.num_prototypes, hp.high_frequency_classes, hp.center_momentum, hp.dual_alpha
        )

    def setup(self, stage: str) -> None:
        """Take the store's class statistics from the datamodule unless given explicitly.

        This replaces a CLI link (which would open the store when the config is parsed): values
        set in the YAML (``model.init_args.class_frequencies`` / ``high_frequency_classes``) win;
        missing ones come from ``trainer.datamodule`` once it is set up, are recorded in
        ``hparams`` (so the checkpoint rebuilds the same centring) and build the centring.
        """
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        source = None
        for name in ("class_frequencies", "high_frequency_classes"):
            if self.hparams[name] is None and hasattr(datamodule, name):
                self.hparams[name] = getattr(datamodule, name)
                path = getattr(datamodule.hparams, "path", None)
                source = f"the store {path}" if path else type(datamodule).__name__
        if self.centering is None:
            self._build_centering(source)

    def _param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups of the student by layer (:func:`layer_decay_groups`).

        Each group keeps its ``lr_scale`` and ``decay`` flag; both are applied per step in
        ``optimizer_step``.
        """
        return layer_decay_groups(self.student, self.student.backbone, self.hparams.layer_decay)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW (or the CLI's ``--optimizer``) over the student's layer groups.

        lr and weight decay are set per step in ``optimizer_step``. The default AdamW is fused
        (one kernel for all parameters) on CUDA and CPU.
        """
        if self.optimizer_init is not None:
            return instantiate_class(self._param_groups(), self.optimizer_init)
        fused = self.device.type in ("cuda", "cpu")
        optimizer = torch.optim.AdamW(
            self._param_groups(), lr=self.hparams.lr, weight_decay=0.0, fused=fused
        )
        # A fused AdamW claims to unscale AMP gradients itself, so Lightning refuses to clip them
        # (Lightning-AI/pytorch-lightning#21435). Unclaimed, a GradScaler unscales first as for
        # the unfused path (bf16 has no scaler at all), so clipping sees true gradients.
        optimizer._step_supports_amp_scaling = False
        return optimizer

    def on_fit_start(self) -> None:
        """Build the per-step schedules from the trainer's step counts."""
        hp = self.hparams
        total = max(1, int(self.trainer.estimated_stepping_batches))
        batches = self.trainer.num_training_batches
        # Lightning also steps on an epoch's last partial accumulation, hence ceil.
        per_epoch = (
            max(1, math.ceil(batches / self.trainer.accumulate_grad_batches))
            if math.isfinite(batches)
            else total
        )

        def steps(epochs: float) -> int:
            return min(total, round(epochs * per_epoch))

        self._warmup_steps = steps(hp.warmup_epochs)
        self._schedules = {
            "weight_decay": WarmupCosine(hp.weight_decay, hp.weight_decay_end, total),
            "momentum": WarmupCosine(hp.momentum_teacher, hp.momentum_teacher_end, total),
            "teacher_temp": WarmupCosine(
                hp.teacher_temp,
                hp.teacher_temp,
                total,
                steps(hp.teacher_temp_warmup_epochs),
                hp.warmup_teacher_temp,
            ),
        }
        self._freeze_last_layer_steps = steps(hp.freeze_last_layer_epochs)

    def on_train_batch_start(self, batch: dict[str, Any], batch_idx: int) -> None:
        """At the first batch, scale ``lr`` (per 256 samples) by the global batch and log it.

        Global batch = processes (devices x nodes) x this batch's size x gradient accumulation;
        the batch is the one source that holds for every loader, resumed runs included.
        """
        if "lr" in self._schedules:
            return
        trainer = self.trainer
        global_batch = (
            trainer.world_size * len(batch["dominant_class"]) * trainer.accumulate_grad_batches
        )
        self.peak_lr = self.hparams.lr * global_batch / 256
        rank_zero_info(
            f"peak lr {self.peak_lr:.4g} = lr {self.hparams.lr:g} per 256 samples x global batch "
            f"{global_batch} ({trainer.world_size} processes x {len(batch['dominant_class'])} x "
            f"{trainer.accumulate_grad_batches} accumulation) / 256"
        )
        total = self._schedules["momentum"].total_steps
        self._schedules["lr"] = WarmupCosine(
            self.peak_lr, self.hparams.min_lr, total, self._warmup_steps
        )

    def schedule_values(self, step: int) -> dict[str, float]:
        """Every scheduled value at optimizer step ``step``."""
        if not self._schedules:
            raise RuntimeError("schedules are built in on_fit_start: run this module via fit")
        return {name: schedule(step) for name, schedule in self._schedules.items()}

    # ---------------------------------------------------------------------------- forward
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Reseed the global RNG before each training batch (:mod:`~terrafm_lightning.ssl.rng`).

        A run resumed from a checkpoint then draws exactly what an uninterrupted run draws.
        """
        reseed_training_batch(self.trainer, self.hparams.seed)
        return batch

    def _student_teacher_logits(self, batch: CropBatch) -> tuple[Tensor, Tensor, Tensor]:
        """Raw student logits (n_crops, B, K), teacher logits (n_global, B, K), student CLS.

        Two backbone calls on the concatenated crops: the teacher's on the global crops and the
        student's on the global and local crops packed (``TerraFM.forward_packed``).
        """
        batch_size = batch["dominant_class"].shape[0]
        n_global = batch["teacher_presence"].shape[0]
        global_crops, local_crops = batch["global_crops"], batch["local_crops"]
        presence = batch["student_presence"]
        with torch.no_grad():
            teacher = self.teacher.head(
                self.teacher.backbone(global_crops, batch["teacher_presence"])
            )
        crops, masks = [global_crops], [presence[:n_global]]
        if local_crops:
            crops.append(local_crops)
            masks.append(presence[n_global:])
        cls = self.student.backbone(crops, masks)
        student = self.student.head(cls)
        return (
            student.view(-1, batch_size, student.shape[-1]),
            teacher.view(-1, batch_size, teacher.shape[-1]),
            cls[:n_global],
        )

    def _loss(self, batch: CropBatch, teacher_temp: float) -> dict[str, Tensor]:
        student, teacher, cls = self._student_teacher_logits(batch)
        teacher_probs = torch.softmax(self.centering(teacher.float()) / teacher_temp, dim=-1)
        loss = dino_loss(student, teacher_probs, self.hparams.student_temp)
        # Stems of modalities the crops lack (and the fusion, with one modality) still take
        # part, with weight 0, so DDP runs without find_unused_parameters.
        unused = self.student.backbone.patch_embed.unused_parameters(batch["global_crops"])
        if unused:
            loss = loss + 0.0 * sum(p.sum() for p in unused)
        entropy = -(teacher_probs * torch.log(teacher_probs.clamp_min(1e-12))).sum(-1).mean()
        feature_std = torch.nn.functional.normalize(cls.detach().float(), dim=-1).std(0).mean()
        return {"loss": loss, "teacher": teacher, "entropy": entropy, "feature_std": feature_std}

    def training_step(self, batch: CropBatch, batch_idx: int) -> Tensor:
        """DINO loss of one (micro-)batch; accumulates the centre sums; no host sync.

        Logged values are device tensors or CPU scalars (no host-to-device copies). A
        non-finite loss is recorded on the device and raised at the next read
        (:class:`~terrafm_lightning.ssl.finite.NonFiniteLossGuard`).
        """
        step = self.trainer.global_step
        values = self.schedule_values(step)
        out = self._loss(batch, values["teacher_temp"])
        loss = out["loss"]
        self._non_finite.record(loss, step)
        dominant, size = batch["dominant_class"], batch["dominant_class"].shape[0]
        if (batch_idx + 1) % self.trainer.log_every_n_steps == 0 or self.trainer.is_last_batch:
            # The progress bar turns its values into numbers after every batch, so it gets the
            # loss read here, with the finite check, as a CPU number.
            value = torch.tensor(self._non_finite.check(self.current_epoch, loss))
            self.log("loss", value, prog_bar=True, logger=False, batch_size=size)
        self.centering.accumulate(out["teacher"], dominant)
        logs = {
            "loss": loss.detach(),
            # Host numbers as views of one CPU tensor: one tensor creation for all of them.
            **dict(zip(values, torch.tensor(list(values.values())).unbind(), strict=True)),
            "teacher_entropy": out["entropy"],
            "student_feature_std": out["feature_std"],
            **self.centering.norms(),
        }
        if self.hparams.high_frequency_classes:
            if self._high_frequency is None or self._high_frequency.device != dominant.device:
                self._high_frequency = torch.tensor(
                    self.hparams.high_frequency_classes, device=dominant.device
                )
            logs["high_frequency_share"] = torch.isin(dominant, self._high_frequency).float().mean()
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, prog_bar=False, batch_size=size)
        return loss

    def validation_step(self, batch: TileView, batch_idx: int) -> None:
        """Per-sample DINO loss on (tile, flipped tile) and teacher CLS, kept for epoch end."""
        inputs, presence = batch["inputs"], batch["presence"]
        both = torch.cat([presence, presence])
        views = {
            "global_crops": {m: torch.cat([x, x.flip(-1)]) for m, x in inputs.items()},
            "local_crops": {},
            "teacher_presence": both,
            "student_presence": both,
            "dominant_class": batch["dominant_class"],
        }
        student, teacher, _ = self._student_teacher_logits(views)
        probs = torch.softmax(self.centering(teacher.float()) / self.hparams.teacher_temp, dim=-1)
        loss = torch.stack(
            [
                dino_loss(student[:, i : i + 1], probs[:, i : i + 1], self.hparams.student_temp)
                for i in range(student.shape[1])
            ]
        )
        features = self.teacher.backbone(inputs, presence).float()
        label = worldcover_index(batch["dominant_class"])
        self._val_outputs.append(
            {"index": batch["index"], "loss": loss, "features": features, "label": label}
        )

    def on_validation_epoch_end(self) -> None:
        """Gather every rank's samples, drop the sampler's padding duplicates, log the metrics.

        Metrics of :func:`~terrafm_lightning.ssl.online_knn.validation_metrics`; the rare-class
        kNN is logged when the validation set has a sample of a rare class.
        """
        if not self._val_outputs:
            return
        local = {k: torch.cat([o[k] for o in self._val_outputs]) for k in self._val_outputs[0]}
        self._val_outputs.clear()
        rows = gather_samples(self, local)
        # Distinct samples: the validation set (ranks pad their shares with repeats).
        count = len(local["index"]) if self.trainer.world_size == 1 else None
        rows = unique_samples(rows, count or len(self.trainer.val_dataloaders.dataset))
        metrics = validation_metrics(rows, self.hparams.high_frequency_classes or [])
        if not metrics.pop("rare_samples", 0):  # one host read per validation epoch
            metrics.pop("val/knn_rare_top1", None)
        self.log_dict(metrics)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Never write a checkpoint after a non-finite loss; keep plain hyper-parameters only."""
        self._non_finite.check(self.current_epoch)
        super().on_save_checkpoint(checkpoint)

    # ------------------------------------------------------------------------ optimisation
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop the prototype layer's gradients while it is frozen (before clipping)."""
        if self.trainer.global_step < self._freeze_last_layer_steps:
            for param in self.student.head.last_layer.parameters():
                param.grad = None

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip each gradient tensor on its own (DINO) or, with ``clip_mode``, the global norm.

        Per parameter: :func:`~terrafm_lightning.ssl.clipping.clip_per_parameter_`.
        """
        per_parameter = self.hparams.clip_mode == "per_parameter"
        if not gradient_clip_val or not per_parameter or gradient_clip_algorithm == "value":
            super().configure_gradient_clipping(
                optimizer, gradient_clip_val, gradient_clip_algorithm
            )
            return
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        clip_per_parameter_(grads, gradient_clip_val)

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: torch.optim.Optimizer,
        optimizer_closure: Any = None,
    ) -> None:
        """Set this step's lr and weight decay, step, then update the EMA teacher."""
        values = self.schedule_values(self.trainer.global_step)
        for group in optimizer.param_groups:
            group["lr"] = values["lr"] * group["lr_scale"]
            group["weight_decay"] = values["weight_decay"] if group["decay"] else 0.0
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        ema_update(self.teacher, self.student, values["momentum"])
        self.centering.step()
