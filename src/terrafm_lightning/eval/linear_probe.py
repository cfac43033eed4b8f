"""Linear probing: one linear head (:class:`LinearHead`) on frozen backbone features.

:class:`LinearHead` is the classifier and its loss (multiclass or multilabel); every linear probe
of the project trains it. Two trainers here: :class:`LinearProbe`, a LightningModule that runs
the backbone on every batch (``terrafm fit``), and :func:`linear_probe_on_features`, full-batch
training on cached features (exact for a frozen backbone without augmentation; seconds on a
CPU; ``make eval`` and the demo).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from terrafm_lightning.errors import UserError
from terrafm_lightning.eval.features import SplitFeatures
from terrafm_lightning.eval.metrics import classification_metrics
from terrafm_lightning.eval.task import BackboneTask, Batch

Pooling = Literal["cls", "cls_mean"]


class LinearHead(nn.Linear):
    """A linear classifier with its loss: cross-entropy, or binary cross-entropy (multilabel).

    Weights start from N(0, 0.01) (drawn with ``generator`` when given), biases from zero.

    Args:
        in_features: feature width.
        num_classes: classes.
        multilabel: multi-hot targets (binary cross-entropy, sigmoid scores).
        generator: RNG of the initial weights (default: the global one).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        multilabel: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(in_features, num_classes)
        self.multilabel = multilabel
        with torch.no_grad():
            self.weight.copy_(0.01 * torch.randn(self.weight.shape, generator=generator))
            self.bias.zero_()

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy on class indices, or binary cross-entropy on multi-hot labels."""
        if self.multilabel:
            return F.binary_cross_entropy_with_logits(logits, labels.float())
        return F.cross_entropy(logits, labels.long())

    def scores(self, logits: Tensor) -> Tensor:
        """What the metrics take: per-class probabilities (multilabel) or the logits."""
        return logits.sigmoid() if self.multilabel else logits


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
            raise UserError(f"pooling must be 'cls' or 'cls_mean', got {pooling!r}")
        self.save_hyperparameters()
        width = self.backbone.embed_dim * (2 if pooling == "cls_mean" else 1)
        self.head = LinearHead(width, num_classes, multilabel)
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

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:  # noqa: D102
        loss = self.head.loss(self(batch), batch["label"])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def evaluate(self, batch: Batch, stage: str) -> None:  # noqa: D102
        logits = self(batch)
        self.log(f"{stage}/loss", self.head.loss(logits, batch["label"]))
        self.metrics[stage].update(self.head.scores(logits), batch["label"].long())


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
    head = LinearHead(x_train.shape[1], num_classes, multilabel, generator)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        optimizer.zero_grad()
        head.loss(head(x_train), train.labels).backward()
        optimizer.step()
    with torch.no_grad():
        metrics = classification_metrics(num_classes, multilabel)
        metrics.update(head.scores(head(x_test)), test.labels.long())
        return {name: float(value) for name, value in metrics.compute().items()}
