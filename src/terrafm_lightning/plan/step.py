"""One training step on fake (or real) tensors: its crops, and its measured FLOPs and bytes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.plugins.precision import Precision
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from terrafm_lightning.batch import CropBatch
from terrafm_lightning.modalities import BANDS, MODALITIES, WORLDCOVER_CLASSES
from terrafm_lightning.plan.flops import SDPA_FLOPS
from terrafm_lightning.plan.memory import LiveBytes
from terrafm_lightning.ssl.ema import ema_update
from terrafm_lightning.ssl.module import TerraFMPretrainModule


def crop_batch(data: Mapping[str, Any], modalities: Sequence[str], batch_size: int) -> CropBatch:
    """A ``CropBatch`` of the shapes ``MultiCrop`` makes for ``data``'s crop settings.

    Every crop carries every modality (the datamodule sends all selected ones; the presence
    masks only choose among them), so the shapes do not depend on the draws.
    """
    n_global, n_local = data["n_global_crops"], data["n_local_crops"]

    def crops(n: int, size: int) -> dict[str, Tensor]:
        return {m: torch.zeros(n * batch_size, len(BANDS[m]), size, size) for m in modalities}

    return {
        "global_crops": crops(n_global, data["global_crop_size"]),
        "local_crops": crops(n_local, data["local_crop_size"]) if n_local else {},
        "teacher_presence": torch.ones(n_global * batch_size, len(MODALITIES), dtype=torch.bool),
        "student_presence": torch.ones(
            (n_global + n_local) * batch_size, len(MODALITIES), dtype=torch.bool
        ),
        "available": torch.ones(batch_size, len(MODALITIES), dtype=torch.bool),
        "dominant_class": torch.full((batch_size,), min(WORLDCOVER_CLASSES)),
        "worldcover_hist": torch.zeros(batch_size, len(WORLDCOVER_CLASSES)),
        "index": torch.arange(batch_size),
    }


@dataclass(frozen=True)
class StepMemory:
    """Peaks of one fake training step over the state held across it, bytes."""

    peak: float
    """Activations, temporaries and the device's share of the gradients."""
    activations: float
    """Activations and temporaries alone."""


class StepRunner:
    """A module, its optimizer and precision on fake tensors; runs and measures steps.

    With ``fake=False`` the same steps run on the module's real tensors (to validate the plan).

    A step is the forward under the precision's context, the backward and the gradient
    clipping, then AdamW, the EMA and the centring update. The latter three run outside the
    measurement: on the device they are in-place fused kernels, while their fake versions
    decompose into temporaries. (FLOPs and bytes are counted in separate steps because
    ``FlopCounterMode``'s module hooks keep checkpointed activations alive.)
    """

    def __init__(
        self,
        module: TerraFMPretrainModule,
        plugin: Precision,
        data: Mapping[str, Any],
        modalities: Sequence[str],
        accumulate: int,
        clip: float | None,
        fake: bool = True,
    ) -> None:
        self.module, self.plugin, self.data, self.modalities = module, plugin, data, modalities
        self.accumulate, self.clip = accumulate, clip
        self.fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else nullcontext()
        with self.fake_mode:
            if fake:
                module = module.to_empty(device="cpu")
            self.module = plugin.convert_module(module)
            self.module.train()
            self.optimizer = self.module.configure_optimizers()
        self.trainable = [p for p in self.module.student.parameters() if p.requires_grad]

    def _step(self, batch_size: int, mode: AbstractContextManager) -> None:
        """One step; ``mode`` (a counter) is active from the batch to the clipping."""
        module, optimizer = self.module, self.optimizer
        with self.fake_mode:
            if self.accumulate == 1:
                optimizer.zero_grad(set_to_none=True)
            with mode:
                batch = crop_batch(self.data, self.modalities, batch_size)
                batch = self.plugin.convert_input(batch)
                with self.plugin.forward_context():
                    out = module._loss(batch, module.hparams.teacher_temp)
                    module.centering.accumulate(out["teacher"], batch["dominant_class"])
                loss = out.pop("loss")
                del out
                loss.backward()
                del loss
                module.configure_gradient_clipping(optimizer, self.clip, "norm")
            optimizer.step()
            ema_update(module.teacher, module.student, module.hparams.momentum_teacher)
            module.centering.step()

    def flops(self, batch_size: int, checkpointing: bool) -> int:
        """FLOPs of one step of ``batch_size`` samples (the first step creates AdamW's state)."""
        self.module.student.backbone.set_grad_checkpointing(checkpointing)
        counter = FlopCounterMode(display=False, custom_mapping=SDPA_FLOPS)
        self._step(batch_size, counter)
        return counter.get_total_flops()

    def memory(self, batch_size: int, checkpointing: bool, gradient_share: float) -> StepMemory:
        """Peak bytes of one step of ``batch_size`` samples."""
        self.module.student.backbone.set_grad_checkpointing(checkpointing)
        counter = LiveBytes(gradient_share)
        hooks = [
            p.register_post_accumulate_grad_hook(lambda p: counter.mark_gradient(p.grad))
            for p in self.trainable
        ]
        try:
            self._step(batch_size, counter)
        finally:
            for hook in hooks:
                hook.remove()
        return StepMemory(counter.peak, counter.peak_other)
