"""The one kNN of the project (TerraFM section 7: cosine, k=20, weights exp(sim / 0.07)).

Functions (features in, scores / metrics out): :func:`knn_scores` (the classifier),
:func:`knn_evaluate` (its metrics), :func:`cross_fold_knn` (each half of a labelled set queries
the other's bank, for a set without a separate bank), :func:`gather_split_features` and
:func:`datamodule_bank` (a split's features on every rank under DDP: each rank extracts a
1/world shard and ``all_gather`` interleaves them back, so every rank holds what one process
would). Users: :class:`KNNProbe` (``terrafm validate|test`` on a labelled datamodule),
:class:`KNNCallback` (online, during pretraining), ``make eval`` and the demo.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning import Callback, LightningDataModule, LightningModule, Trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from terrafm_lightning.errors import UserError
from terrafm_lightning.eval.features import SplitFeatures, extract_features
from terrafm_lightning.eval.metrics import classification_metrics
from terrafm_lightning.eval.task import BackboneTask, Batch


def knn_scores(
    train_features: Tensor,
    train_labels: Tensor,
    query_features: Tensor,
    num_classes: int,
    *,
    k: int = 20,
    temperature: float = 0.07,
    multilabel: bool = False,
    chunk_size: int = 1024,
) -> Tensor:
    """Weighted kNN class scores of the queries.

    Neighbours are the ``k`` training features of highest cosine similarity ``s``, each voting
    with weight ``exp(s / temperature)``. Multiclass: the score of class c is the weight share of
    neighbours labelled c (argmax = prediction). Multilabel: one binary kNN per class over the
    same neighbours, i.e. the weight share of neighbours carrying label c (> 0.5 = positive).

    Args:
        train_features: (N, d) bank features.
        train_labels: (N,) int class indices, or (N, C) multi-hot when ``multilabel``.
        query_features: (Q, d).
        num_classes: C.
        k: neighbours (capped at N).
        temperature: similarity temperature.
        multilabel: multi-hot labels.
        chunk_size: queries per similarity block (bounds memory).

    Returns:
        (Q, C) scores in [0, 1], rows summing to 1 when multiclass.
    """
    if train_features.shape[0] != train_labels.shape[0]:
        raise ValueError(
            f"{train_features.shape[0]} training features but {train_labels.shape[0]} labels"
        )
    bank = F.normalize(train_features.float(), dim=1)
    votes = (
        train_labels.float() if multilabel else F.one_hot(train_labels.long(), num_classes).float()
    )
    k = min(k, bank.shape[0])
    out = []
    for queries in F.normalize(query_features.float(), dim=1).split(chunk_size):
        sim, idx = (queries @ bank.T).topk(k, dim=1)
        weights = (sim / temperature).exp()
        out.append(torch.einsum("qk,qkc->qc", weights, votes[idx]) / weights.sum(1, keepdim=True))
    return torch.cat(out)


def knn_evaluate(
    train_features: Tensor,
    train_labels: Tensor,
    query_features: Tensor,
    query_labels: Tensor,
    num_classes: int,
    *,
    k: int = 20,
    temperature: float = 0.07,
    multilabel: bool = False,
) -> dict[str, float]:
    """Weighted-kNN metrics: ``top1``, ``f1_macro`` (or ``f1_micro``, ``f1_macro``, ``map``)."""
    scores = knn_scores(
        train_features,
        train_labels,
        query_features,
        num_classes,
        k=k,
        temperature=temperature,
        multilabel=multilabel,
    )
    return score_metrics(scores, query_labels, num_classes, multilabel)


def score_metrics(
    scores: Tensor, labels: Tensor, num_classes: int, multilabel: bool = False
) -> dict[str, float]:
    """Classification metrics (``classification_metrics``) of class scores against labels."""
    metrics = classification_metrics(num_classes, multilabel)
    metrics.update(scores, labels.long())
    return {name: float(value) for name, value in metrics.compute().items()}


def cross_fold_knn(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    *,
    folds: int = 2,
    k: int = 20,
    temperature: float = 0.07,
) -> Tensor:
    """Predicted classes of a labelled set by kNN, each fold using the other folds as the bank.

    Sample i is in fold ``i % folds``. The folds are gathered by index, never by a boolean mask,
    so this reads nothing back to the host (the pretraining module's online kNN uses it).
    Needs at least ``folds`` samples.

    Returns:
        (N,) predicted class indices.
    """
    n = len(labels)
    if n < folds:
        raise ValueError(f"cross_fold_knn needs at least {folds} samples, got {n}")
    members = [torch.arange(f, n, folds, device=labels.device) for f in range(folds)]
    predicted = torch.empty_like(labels)
    for f, query in enumerate(members):
        bank = torch.cat([m for g, m in enumerate(members) if g != f])
        scores = knn_scores(
            features[bank], labels[bank], features[query], num_classes,
            k=k, temperature=temperature,
        )  # fmt: skip
        predicted[query] = scores.argmax(1)
    return predicted


def gather_split_features(
    module: LightningModule, backbone: nn.Module, dataset: Dataset, batch_size: int
) -> SplitFeatures:
    """Features and labels of a whole dataset, in dataset order, on every rank.

    Rank r extracts samples r, r + world, ...; the shards are padded to one length,
    ``all_gather``-ed and interleaved back, which reproduces the single-process result.
    """
    world, rank = module.trainer.world_size, module.trainer.global_rank
    shard = Subset(dataset, range(rank, len(dataset), world))
    features, labels = extract_features(
        backbone, DataLoader(shard, batch_size=batch_size), module.device
    )
    if world == 1:
        return SplitFeatures(features, labels)
    longest = -(-len(dataset) // world)
    pad = longest - len(features)
    features = F.pad(features, (0, 0, 0, pad)).to(module.device)
    labels = F.pad(labels, (0, 0) * (labels.ndim - 1) + (0, pad)).to(module.device)
    gathered = [module.all_gather(t) for t in (features, labels)]  # (world, longest, ...)
    return SplitFeatures(*(g.transpose(0, 1).flatten(0, 1)[: len(dataset)].cpu() for g in gathered))


def datamodule_bank(
    module: LightningModule, backbone: nn.Module, datamodule: LightningDataModule, split: str
) -> SplitFeatures:
    """Features of one split of a labelled datamodule (``datasets[split]``), on every rank."""
    datamodule.setup("fit")
    return gather_split_features(
        module, backbone, datamodule.datasets[split], datamodule.batch_size
    )


class KNNProbe(BackboneTask):
    """kNN evaluation as a module: ``terrafm validate|test`` with a labelled datamodule.

    The feature bank is built from the datamodule's training split at the start of each
    validation / test epoch; nothing is trained. Logs ``<stage>/knn/<metric>``.

    Args:
        num_classes: number of classes (linked from the datamodule by the CLI).
        multilabel: multi-hot labels (linked from the datamodule).
        k: neighbours.
        temperature: similarity temperature.
        **kwargs: :class:`BackboneTask` arguments (backbone source).
    """

    def __init__(
        self,
        num_classes: int,
        multilabel: bool = False,
        k: int = 20,
        temperature: float = 0.07,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.metric_prefix = "knn/"
        self.metrics = nn.ModuleDict(
            {s: classification_metrics(num_classes, multilabel) for s in ("val", "test")}
        )
        self.bank: tuple[Tensor, Tensor] | None = None

    def _build_bank(self) -> None:
        bank = datamodule_bank(self, self.backbone, self.trainer.datamodule, "train")
        self.bank = (bank.features.to(self.device), bank.labels.to(self.device))

    def on_validation_epoch_start(self) -> None:  # noqa: D102
        self._build_bank()

    def on_test_epoch_start(self) -> None:  # noqa: D102
        self._build_bank()

    def evaluate(self, batch: Batch, stage: str) -> None:  # noqa: D102
        hp = self.hparams
        scores = knn_scores(
            *self.bank,
            self.backbone(self.inputs(batch)),
            hp.num_classes,
            k=hp.k,
            temperature=hp.temperature,
            multilabel=hp.multilabel,
        )
        self.metrics[stage].update(scores, batch["label"].long())


class KNNCallback(Callback):
    """Online kNN during pretraining on a labelled datamodule, every ``every_n_epochs``.

    Features come from ``pl_module.teacher.backbone`` when the module has a teacher, else from
    ``pl_module.backbone``. The bank is the datamodule's training split, the queries its
    validation split. Logs ``knn/top1`` (multiclass) or ``knn/f1_micro`` (multilabel), plus the
    other metrics of :func:`knn_evaluate` under ``knn/``.

    Args:
        datamodule: labelled evaluation datamodule exposing ``num_classes`` and ``multilabel``.
        every_n_epochs: evaluation period in training epochs.
        k: neighbours.
        temperature: similarity temperature.
    """

    def __init__(
        self,
        datamodule: LightningDataModule,
        every_n_epochs: int = 1,
        k: int = 20,
        temperature: float = 0.07,
    ) -> None:
        if every_n_epochs < 1:
            raise UserError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.datamodule = datamodule
        self.every_n_epochs = every_n_epochs
        self.k = k
        self.temperature = temperature

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:  # noqa: D102
        if (trainer.current_epoch + 1) % self.every_n_epochs or trainer.sanity_checking:
            return
        teacher = getattr(pl_module, "teacher", None)
        backbone = teacher.backbone if teacher is not None else pl_module.backbone
        dm = self.datamodule
        bank, queries = (datamodule_bank(pl_module, backbone, dm, s) for s in ("train", "val"))
        metrics = knn_evaluate(
            *bank,
            *queries,
            dm.num_classes,
            k=self.k,
            temperature=self.temperature,
            multilabel=dm.multilabel,
        )
        pl_module.log_dict({f"knn/{name}": value for name, value in metrics.items()})
