"""Segmentation probing: a linear or UPerNet-style head on frozen patch tokens."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.layers import ConvNormAct
from torch import Tensor, nn

from terrafm_lightning.errors import UserError
from terrafm_lightning.eval.metrics import segmentation_metrics
from terrafm_lightning.eval.task import BackboneTask, Batch

Head = Literal["linear", "upernet"]


class UPerNetHead(nn.Module):
    """UPerNet-style decoder over four ViT block maps (all at 1/16 resolution).

    A simple feature pyramid turns the maps into strides 4, 8, 16 and 32 (transposed
    convolutions up, max-pooling down); a pyramid pooling module on the coarsest level and a
    top-down FPN follow; all levels are upsampled to stride 4, concatenated and classified.

    Args:
        in_dim: backbone width d.
        num_classes: output classes.
        channels: decoder width.
        pool_scales: pyramid pooling output sizes.
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        channels: int = 256,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
    ) -> None:
        super().__init__()
        self.pyramid = nn.ModuleList(
            [
                nn.Sequential(
                    nn.ConvTranspose2d(in_dim, channels, 2, stride=2),
                    nn.GELU(),
                    nn.ConvTranspose2d(channels, channels, 2, stride=2),
                ),
                nn.ConvTranspose2d(in_dim, channels, 2, stride=2),
                nn.Conv2d(in_dim, channels, 1),
                nn.Sequential(nn.MaxPool2d(2, ceil_mode=True), nn.Conv2d(in_dim, channels, 1)),
            ]
        )
        self.ppm = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvNormAct(channels, channels, 1))
            for s in pool_scales
        )
        self.ppm_out = ConvNormAct(channels * (len(pool_scales) + 1), channels, 3)
        self.lateral = nn.ModuleList(ConvNormAct(channels, channels, 1) for _ in range(3))
        self.fpn = nn.ModuleList(ConvNormAct(channels, channels, 3) for _ in range(3))
        self.fuse = ConvNormAct(channels * 4, channels, 3)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        """Four (B, d, h, w) maps, shallow to deep -> logits (B, num_classes, 4h, 4w)."""
        if len(maps) != 4:
            raise ValueError(f"UPerNetHead takes 4 block maps, got {len(maps)}")
        levels = [stage(x) for stage, x in zip(self.pyramid, maps, strict=True)]
        top = levels[3]
        pooled = [_resize(ppm(top), top.shape[-2:]) for ppm in self.ppm]
        laterals = [lat(x) for lat, x in zip(self.lateral, levels[:3], strict=True)]
        laterals.append(self.ppm_out(torch.cat([top, *pooled], dim=1)))
        for i in range(3, 0, -1):
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [fpn(x) for fpn, x in zip(self.fpn, laterals[:3], strict=True)] + [laterals[3]]
        size = outs[0].shape[-2:]
        return self.classifier(self.fuse(torch.cat([_resize(x, size) for x in outs], dim=1)))


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class SegmentationProbe(BackboneTask):
    """Dense head on frozen patch tokens, logits upsampled bilinearly to the label grid.

    ``head="linear"``: a 1x1 convolution on the final (normed) patch tokens, the paper's probe.
    ``head="upernet"``: :class:`UPerNetHead` on four blocks from ``forward_intermediates``
    (default: evenly spaced, the last block included). Loss: cross-entropy ignoring
    ``ignore_index``; logs ``miou``, ``iou_<class>`` and ``pixel_acc``.

    Args:
        num_classes: number of classes (linked from the datamodule).
        ignore_index: label value excluded from loss and metrics (linked from the datamodule).
        head: ``"linear"`` or ``"upernet"``.
        block_indices: the four blocks the UPerNet head reads.
        decoder_channels: UPerNet decoder width.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        **kwargs: :class:`BackboneTask` arguments.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int | None = None,
        head: Head = "linear",
        block_indices: Sequence[int] | None = None,
        decoder_channels: int = 256,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("frozen", True)
        super().__init__(**kwargs)
        self.save_hyperparameters()
        dim, depth = self.backbone.embed_dim, len(self.backbone.blocks)
        if head == "linear":
            self.head = nn.Conv2d(dim, num_classes, 1)
        elif head == "upernet":
            self.block_indices = list(
                block_indices or torch.linspace(0, depth - 1, 4).round().long().tolist()
            )
            self.head = UPerNetHead(dim, num_classes, decoder_channels)
        else:
            raise UserError(f"head must be 'linear' or 'upernet', got {head!r}")
        self.metrics = nn.ModuleDict(
            {s: segmentation_metrics(num_classes, ignore_index) for s in ("val", "test")}
        )

    def forward(self, batch: Batch, size: Sequence[int] | None = None) -> Tensor:
        """Logits (B, num_classes, *size); ``size`` defaults to the input size."""
        inputs = self.inputs(batch)
        size = size or next(iter(inputs.values())).shape[-2:]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            if self.hparams.head == "linear":
                maps = self.backbone.forward_intermediates(
                    inputs, indices=1, norm=True, intermediates_only=True
                )
            else:
                unique = sorted(set(self.block_indices))
                found = self.backbone.forward_intermediates(
                    inputs, indices=unique, intermediates_only=True
                )
                maps = [found[unique.index(i)] for i in self.block_indices]
        logits = self.head(maps[0]) if self.hparams.head == "linear" else self.head(maps)
        return _resize(logits, size)

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Pixel cross-entropy without ``ignore_index`` pixels."""
        ignore = self.hparams.ignore_index
        return F.cross_entropy(logits, labels, ignore_index=-100 if ignore is None else ignore)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:  # noqa: D102
        labels = batch["label"].long()
        loss = self.loss(self(batch, labels.shape[-2:]), labels)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def evaluate(self, batch: Batch, stage: str) -> None:  # noqa: D102
        labels = batch["label"].long()
        logits = self(batch, labels.shape[-2:])
        self.log(f"{stage}/loss", self.loss(logits, labels))
        self.metrics[stage].update(logits, labels)
