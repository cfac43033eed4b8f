"""Linear probing: a linear classifier on frozen backbone features."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from terrafm_lightning.eval.metrics import classification_metrics
from terrafm_lightning.eval.task import BackboneTask, Batch

Pooling = Literal["cls", "cls_mean"]


class LinearProbe(BackboneTask):
    """Linear head on the CLS feature (or CLS + mean patch token) of a frozen backbone.

    Multiclass: cross-entropy on integer labels; logs ``top1``, ``f1_macro``. Multilabel:
    binary cross-entropy on multi-hot labels; logs ``f1_micro``, ``f1_macro``, ``map``.

    Args:
        num_classes: number of classes (linked from the datamodule by the CLI).
        multilabel: multi-hot labels (linked from the datamodule).
        pooling: ``"cls"`` or ``"cls_mean"`` (concatenate the mean of the patch tokens).
        lr: AdamW learning rate (cosine-decayed per step).
        weight_decay: AdamW weight decay.
        **kwargs: :class:`BackboneTask` arguments (backbone source, ``frozen``).
    """

    def __init__(
        self,
        num_classes: int,
        multilabel: bool = False,
        pooling: Pooling = "cls",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("frozen", True)
        super().__init__(**kwargs)
        if pooling not in ("cls", "cls_mean"):
            raise ValueError(f"pooling must be 'cls' or 'cls_mean', got {pooling!r}")
        self.save_hyperparameters()
        width = self.backbone.embed_dim * (2 if pooling == "cls_mean" else 1)
        self.head = nn.Linear(width, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        self.metrics = nn.ModuleDict(
            {s: classification_metrics(num_classes, multilabel) for s in ("val", "test")}
        )

    def pooled(self, batch: Batch) -> Tensor:
        """The pooled feature the head sees, (B, d) or (B, 2d)."""
        tokens = self.tokens(batch)
        if self.hparams.pooling == "cls":
            return tokens[:, 0]
        return torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=1)

    def forward(self, batch: Batch) -> Tensor:
        """Class logits, (B, num_classes)."""
        return self.head(self.pooled(batch))

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy (multiclass) or binary cross-entropy (multilabel)."""
        if self.hparams.multilabel:
            return F.binary_cross_entropy_with_logits(logits, labels.float())
        return F.cross_entropy(logits, labels.long())

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:  # noqa: D102
        loss = self.loss(self(batch), batch["label"])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def evaluate(self, batch: Batch, stage: str) -> None:  # noqa: D102
        logits = self(batch)
        self.log(f"{stage}/loss", self.loss(logits, batch["label"]))
        scores = logits.sigmoid() if self.hparams.multilabel else logits
        self.metrics[stage].update(scores, batch["label"].long())
