"""Linear probing: a linear classifier on frozen backbone features.

Two forms: :class:`LinearProbe`, a LightningModule that runs the backbone on every batch (image
augmentation, ``terrafm fit``), and :func:`linear_probe_on_features`, full-batch training on
cached features (exact for a frozen backbone without augmentation; seconds on a CPU).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from terrafm_lightning.eval.features import SplitFeatures
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


def linear_probe_on_features(
    train: SplitFeatures,
    test: SplitFeatures,
    num_classes: int,
    multilabel: bool = False,
    *,
    steps: int = 300,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> dict[str, float]:
    """A linear classifier on frozen, standardised features; full-batch AdamW; test metrics.

    Features are standardised with the training split's statistics; the head starts from
    N(0, 0.01) weights drawn with ``seed``. Cross-entropy (multiclass) or binary cross-entropy
    (multilabel); metrics of :func:`~terrafm_lightning.eval.metrics.classification_metrics`.
    """
    mean, std = train.features.mean(0), train.features.std(0).nan_to_num(1.0).clamp_min(1e-6)
    x_train, x_test = (train.features - mean) / std, (test.features - mean) / std
    generator = torch.Generator().manual_seed(seed)
    head = nn.Linear(x_train.shape[1], num_classes)
    with torch.no_grad():
        head.weight.copy_(0.01 * torch.randn(head.weight.shape, generator=generator))
        head.bias.zero_()
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        optimizer.zero_grad()
        logits = head(x_train)
        if multilabel:
            F.binary_cross_entropy_with_logits(logits, train.labels.float()).backward()
        else:
            F.cross_entropy(logits, train.labels.long()).backward()
        optimizer.step()
    with torch.no_grad():
        scores = head(x_test)
        metrics = classification_metrics(num_classes, multilabel)
        metrics.update(scores.sigmoid() if multilabel else scores, test.labels.long())
        return {name: float(value) for name, value in metrics.compute().items()}
