"""The shared base of every downstream task: a TerraFM backbone from a checkpoint or weights."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

import timm
import torch
from lightning import LightningModule
from torch import Tensor, nn

from terrafm_lightning.errors import UserError
from terrafm_lightning.modalities import MODALITIES
from terrafm_lightning.models import load_released_weights
from terrafm_lightning.ssl.checkpoint import load_pretraining_backbone

log = logging.getLogger(__name__)

Batch = dict[str, Tensor]

ARCHITECTURE: dict[str, Callable[[nn.Module], Any]] = {
    "embed_dim": lambda m: m.embed_dim,
    "depth": lambda m: len(m.blocks),
    "num_heads": lambda m: m.blocks[0].attn.num_heads,
    "mlp_ratio": lambda m: m.blocks[0].mlp.fc1.out_features / m.embed_dim,
    "patch_size": lambda m: m.patch_size,
    "img_size": lambda m: m.grid_size * m.patch_size,
    "modalities": lambda m: sorted(m.modalities),
}
"""Backbone arguments a checkpoint fixes, and how to read each from a built backbone."""


def check_architecture(backbone: nn.Module, requested: dict[str, Any], source: str) -> None:
    """Raise if ``requested`` asks for an architecture other than ``backbone``'s.

    Raises:
        ValueError: naming the argument, both values and the fix.
    """
    for key, want in requested.items():
        if key not in ARCHITECTURE:
            continue
        have = ARCHITECTURE[key](backbone)
        if (sorted(want) if key == "modalities" else want) != have:
            raise UserError(
                f"{source}: the checkpoint's backbone has {key}={have}, backbone_kwargs asks "
                f"{key}={want}; remove {key} from backbone_kwargs (the checkpoint sets the "
                "architecture) or give a checkpoint of that architecture"
            )


class BackboneTask(LightningModule):
    """LightningModule base holding ``self.backbone``, loaded from one of three sources.

    Exactly one source applies: a pretraining ``checkpoint`` (teacher by default), the
    ``released_weights`` of TerraFM-B/-L, or random initialisation (the baseline) when neither
    is given. Batches are dicts of modality -> normalised (B, C, H, W) plus ``"label"``.

    Args:
        backbone: timm factory name, e.g. ``terrafm_base`` (ignored with ``checkpoint``, whose
            hyper-parameters name the architecture).
        backbone_kwargs: factory keyword arguments (with ``checkpoint``: overrides such as
            ``drop_path_rate``; an architecture argument of :data:`ARCHITECTURE` must equal the
            checkpoint's, else ``ValueError``).
        checkpoint: path of a ``TerraFMPretrainModule`` checkpoint.
        checkpoint_branch: ``"teacher"`` or ``"student"``.
        released_weights: path of ``TerraFM-B.pth`` / ``TerraFM-L.pth``.
        frozen: freeze the backbone and keep it in eval mode (norms, drop-path) while training.
    """

    def __init__(
        self,
        backbone: str = "terrafm_base",
        backbone_kwargs: dict[str, Any] | None = None,
        checkpoint: str | None = None,
        checkpoint_branch: str = "teacher",
        released_weights: str | None = None,
        frozen: bool = True,
    ) -> None:
        super().__init__()
        if checkpoint and released_weights:
            raise UserError("give either checkpoint or released_weights, not both")
        if checkpoint:
            overrides = {k: v for k, v in (backbone_kwargs or {}).items() if k not in ARCHITECTURE}
            self.backbone = load_pretraining_backbone(checkpoint, checkpoint_branch, overrides)
            check_architecture(self.backbone, backbone_kwargs or {}, checkpoint)
        else:
            self.backbone = timm.create_model(backbone, **(backbone_kwargs or {}))
            if released_weights:
                load_released_weights(self.backbone, released_weights)
        self.frozen = frozen
        self.metric_prefix = ""
        self.metrics = nn.ModuleDict()  # stage -> MetricCollection, filled by subclasses
        if frozen:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> BackboneTask:
        """Set training mode, keeping a frozen backbone in eval mode."""
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    @staticmethod
    def inputs(batch: Batch) -> dict[str, Tensor]:
        """The modality tensors of a batch (every given modality is present in every row)."""
        return {m: batch[m] for m in MODALITIES if m in batch}

    def tokens(self, batch: Batch) -> Tensor:
        """Backbone CLS + patch tokens, (B, 1 + N, d); without autograd when frozen."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return self.backbone.forward_features(self.inputs(batch))

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW over :meth:`param_groups` with a per-step cosine schedule."""
        optimizer = torch.optim.AdamW(self.param_groups(), lr=self.hparams.lr)
        steps = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimiser parameter groups: every trainable parameter, weight decay from hparams."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "weight_decay": self.hparams.weight_decay}]

    def evaluate(self, batch: Batch, stage: str) -> None:
        """Update ``self.metrics[stage]`` (and log losses) for one ``val``/``test`` batch."""
        raise NotImplementedError

    def validation_step(self, batch: Batch, batch_idx: int) -> None:  # noqa: D102
        self.evaluate(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:  # noqa: D102
        self.evaluate(batch, "test")

    def _log_metrics(self, stage: str) -> None:
        values = self.metrics[stage].compute()
        self.log_dict({f"{stage}/{self.metric_prefix}{k}": v for k, v in values.items()})
        self.metrics[stage].reset()

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, Tensor]:
        """Frozen CLS embeddings ``(B, d)`` of a batch, with its labels (``terrafm predict``)."""
        return {"embedding": self.backbone(self.inputs(batch)), "label": batch["label"]}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only hyper-parameters the class takes.

        The CLI links every datamodule property (e.g. ``ignore_index``) into the model; a class
        without that argument receives it in ``**kwargs`` of the config, and the saved value would
        break ``terrafm test|validate --ckpt_path``, which re-instantiates from the saved hparams.
        """
        accepted = {
            name
            for cls in type(self).__mro__
            if issubclass(cls, BackboneTask)
            for name in inspect.signature(cls.__init__).parameters
        }
        hparams = checkpoint.get("hyper_parameters", {})
        for key in [k for k in hparams if not k.startswith("_") and k not in accepted]:
            del hparams[key]

    def on_validation_epoch_end(self) -> None:  # noqa: D102
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:  # noqa: D102
        self._log_metrics("test")
