"""What ``make eval`` runs, as data: benchmark -> protocols per task type -> metric.

:data:`BENCHMARKS` lists the benchmarks in detection order, each with its datamodule (whose
``detect(folder)`` recognises it), the protocols of each task type and any metric reported
besides the datamodule's headline ``metric`` (mIoU, micro-F1 for multilabel tasks, top-1;
Copernicus-Bench's own per task). :data:`PROTOCOLS` says how each protocol runs, following the
paper's tables (``reference/paper_results.md``):

- ``kNN 100%``: cosine, k = 20, exp(sim / 0.07) on frozen CLS features, the training split as
  the bank; ``kNN 1%``: a seeded 1% subset of the bank (at least one sample), redrawn per seed;
- ``frozen probe``: a linear head on the cached frozen features (full-batch AdamW);
- ``fine-tune``: :class:`~terrafm_lightning.eval.finetune.FineTune` (layer decay 0.75), only
  with ``--finetune-epochs`` > 0;
- ``linear seg`` / ``UPerNet seg``: a segmentation head on frozen patch tokens (UPerNet only
  with ``--upernet``).

:class:`Settings` holds every option of the report and its default (the one place of defaults:
the command line is built from it, and the Makefile passes only what the user set).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning import Trainer, seed_everything

from terrafm_lightning.eval.datasets import (
    BigEarthNetDataModule,
    CopernicusBenchDataModule,
    EuroSATDataModule,
    EuroSATSARDataModule,
    EvalDataModule,
    GeoBenchDataModule,
    Landslide4SenseDataModule,
    Sen1Floods11DataModule,
)
from terrafm_lightning.eval.features import SplitFeatures
from terrafm_lightning.eval.finetune import FineTune
from terrafm_lightning.eval.knn import knn_evaluate
from terrafm_lightning.eval.linear_probe import linear_probe_on_features
from terrafm_lightning.eval.segmentation import SegmentationProbe
from terrafm_lightning.eval.task import BackboneTask

Metrics = dict[str, float]


@dataclass
class Settings:
    """Every option of ``make eval`` besides the backbone source, data and output folders."""

    epochs: int = field(default=10, metadata={"help": "segmentation probe epochs"})
    probe_steps: int = field(default=300, metadata={"help": "frozen-probe AdamW steps"})
    finetune_epochs: int = field(
        default=0, metadata={"help": "GEO-Bench fine-tuning epochs (0: no fine-tuning)"}
    )
    upernet: bool = field(default=False, metadata={"help": "also the UPerNet segmentation probe"})
    seeds: int = field(default=1, metadata={"help": "repeats of the seeded protocols"})
    batch_size: int = field(default=64, metadata={"help": "feature extraction / probe batch"})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes"})
    split_seed: int | None = field(
        default=None,
        metadata={"help": "opt-in seeded 60/20/20 split for datasets without split files"},
    )
    min_test_samples: int = field(
        default=50, metadata={"help": "test splits smaller than this are flagged as tiny"}
    )


@dataclass
class Run:
    """One backbone source on one datamodule: what a protocol needs."""

    dm: EvalDataModule
    source: dict[str, Any]
    settings: Settings
    features: Callable[[str], SplitFeatures]

    @property
    def seeds(self) -> range:
        """The seeds of the seeded protocols."""
        return range(self.settings.seeds)


def seeded_subset(features: SplitFeatures, fraction: float, seed: int) -> SplitFeatures:
    """A deterministic random ``fraction`` of a split (at least one sample)."""
    n = features.features.shape[0]
    keep = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    keep = keep[: max(1, round(fraction * n))].sort().values
    return SplitFeatures(features.features[keep], features.labels[keep])


def _knn(run: Run, fraction: float) -> list[Metrics]:
    train, test = run.features("train"), run.features("test")
    kw = {"multilabel": run.dm.multilabel}
    if fraction == 1.0:
        return [knn_evaluate(*train, *test, run.dm.num_classes, **kw)]
    return [
        knn_evaluate(*seeded_subset(train, fraction, s), *test, run.dm.num_classes, **kw)
        for s in run.seeds
    ]


def _frozen_probe(run: Run) -> list[Metrics]:
    train, test = run.features("train"), run.features("test")
    return [
        linear_probe_on_features(
            train, test, run.dm.num_classes, run.dm.multilabel,
            steps=run.settings.probe_steps, seed=s,
        )
        for s in run.seeds
    ]  # fmt: skip


def train_and_test(module: BackboneTask, dm: EvalDataModule, epochs: int, seed: int) -> Metrics:
    """Fit ``module`` for ``epochs`` on one device, then its test metrics (loss dropped)."""
    seed_everything(seed, verbose=False)
    trainer = Trainer(
        max_epochs=epochs, devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    test = trainer.test(module, datamodule=dm, verbose=False)[0]
    return {k.removeprefix("test/"): v for k, v in test.items() if k != "test/loss"}


def _fine_tune(run: Run) -> list[Metrics]:
    dm = run.dm
    return [
        train_and_test(
            FineTune(num_classes=dm.num_classes, multilabel=dm.multilabel, **run.source),
            dm, run.settings.finetune_epochs, s,
        )
        for s in run.seeds
    ]  # fmt: skip


def _segmentation(run: Run, head: str) -> list[Metrics]:
    dm = run.dm
    return [
        train_and_test(
            SegmentationProbe(dm.num_classes, dm.ignore_index, head=head, **run.source),
            dm, run.settings.epochs, s,
        )
        for s in run.seeds
    ]  # fmt: skip


@dataclass(frozen=True)
class Protocol:
    """How a protocol runs, and whether the settings ask for it."""

    run: Callable[[Run], list[Metrics]]
    enabled: Callable[[Settings], bool] = lambda settings: True


PROTOCOLS: dict[str, Protocol] = {
    "kNN 100%": Protocol(lambda run: _knn(run, 1.0)),
    "kNN 1%": Protocol(lambda run: _knn(run, 0.01)),
    "frozen probe": Protocol(_frozen_probe),
    "fine-tune": Protocol(_fine_tune, lambda s: s.finetune_epochs > 0),
    "linear seg": Protocol(lambda run: _segmentation(run, "linear")),
    "UPerNet seg": Protocol(lambda run: _segmentation(run, "upernet"), lambda s: s.upernet),
}
"""Protocol name -> how it runs (names as in the paper's tables and ``paper_results.json``)."""


@dataclass(frozen=True)
class Benchmark:
    """A benchmark: its datamodule, protocols per task type, and metrics besides the headline.

    ``extra_metrics`` are (metric, suffix of the row label) pairs, e.g. Landslide4Sense's
    landslide-class IoU.
    """

    datamodule: type[EvalDataModule]
    protocols: Mapping[str, tuple[str, ...]]
    extra_metrics: tuple[tuple[str, str], ...] = ()


CLASSIFICATION = ("kNN 100%", "kNN 1%", "frozen probe")
SEGMENTATION = ("linear seg", "UPerNet seg")

BENCHMARKS: dict[str, Benchmark] = {
    "copernicus": Benchmark(
        CopernicusBenchDataModule,
        {"classification": CLASSIFICATION, "segmentation": SEGMENTATION},
    ),
    "geobench": Benchmark(
        GeoBenchDataModule,
        {"classification": (*CLASSIFICATION, "fine-tune"), "segmentation": SEGMENTATION},
    ),
    "eurosat": Benchmark(EuroSATDataModule, {"classification": CLASSIFICATION}),
    "eurosat-sar": Benchmark(EuroSATSARDataModule, {"classification": CLASSIFICATION}),
    "sen1floods11": Benchmark(Sen1Floods11DataModule, {"segmentation": SEGMENTATION}),
    "landslide4sense": Benchmark(
        Landslide4SenseDataModule,
        {"segmentation": SEGMENTATION},
        extra_metrics=(("iou_1", " (landslide IoU)"),),
    ),
    "bigearthnet": Benchmark(BigEarthNetDataModule, {"classification": CLASSIFICATION}),
}
"""Benchmark name -> datamodule, protocols per task type, extra metrics; in detection order."""


def protocols_of(benchmark: Benchmark, task: str, settings: Settings) -> list[str]:
    """The protocols the settings ask for on a task of ``benchmark``."""
    return [p for p in benchmark.protocols[task] if PROTOCOLS[p].enabled(settings)]
