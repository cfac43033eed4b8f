"""Copernicus-Bench tasks (Wang et al. 2025, arXiv 2503.11849) through torchgeo's classes.

``root`` means what it means for torchgeo's ``CopernicusBench*`` classes: the folder holding the
task's directory (``eurosat_s1/``, ``cloud_s2/``, ``bigearthnet_s1s2/``, ``dfc2020_s1s2/``,
``flood_s1/``; their split files inside) or, for ``lcz_s2``, the ``lcz_{split}.h5`` files. The
official Hugging Face release (``wangyi111/Copernicus-Bench``) keeps the same folders one level
down (``l2_eurosat_s1s2/eurosat_s1/``, ``l3_lcz_s2/lcz_train.h5``); a checkout of it works as
``root`` too. A task zip that torchgeo would extract (e.g. ``eurosat_s1.zip``) also counts.

Band order: each torchgeo class's ``all_bands`` (file order as published; EuroSAT-S2 has B8A
last). Choices where the benchmark is silent for TerraFM: Flood-S1 feeds the post-event image
(torchgeo's last time step, ``MS1``) alone; DFC2020's class 0 (``Background``, not a DFC2020
class) is ignored; LCZ-S2 (So2Sat LCZ42) stores reflectance / 10000 and is scaled back to DN.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor
from torch.utils.data import Dataset
from torchgeo.datasets.copernicus import DATASET_REGISTRY, CopernicusBenchLCZS2

from terrafm_lightning.errors import UserError
from terrafm_lightning.eval.datasets.base import (
    SPLITS,
    AdaptedDataset,
    Detection,
    EvalDataModule,
    Sample,
    Task,
    layout_error,
)


@dataclass(frozen=True)
class CopernicusTask:
    """What a Copernicus-Bench task is: its stem, task type, classes and headline metric."""

    modality: str
    task: Task
    num_classes: int
    metric: str
    multilabel: bool = False
    ignore_index: int | None = None
    scale: float = 1.0


COPERNICUS_TASKS: dict[str, CopernicusTask] = {
    "cloud_s2": CopernicusTask("s2_l1c", "segmentation", 4, "miou"),
    "eurosat_s1": CopernicusTask("s1", "classification", 10, "top1"),
    "eurosat_s2": CopernicusTask("s2_l1c", "classification", 10, "top1"),
    "bigearthnet_s1": CopernicusTask("s1", "classification", 19, "map", multilabel=True),
    "bigearthnet_s2": CopernicusTask("s2_l2a", "classification", 19, "map", multilabel=True),
    "dfc2020_s1": CopernicusTask("s1", "segmentation", 11, "miou", ignore_index=0),
    "dfc2020_s2": CopernicusTask("s2_l1c", "segmentation", 11, "miou", ignore_index=0),
    "lcz_s2": CopernicusTask("s2_l1c", "classification", 17, "top1", scale=10000.0),
    "flood_s1": CopernicusTask("s1", "segmentation", 3, "miou"),
}
"""The Copernicus-Bench tasks TerraFM reports (and Flood-S1), by torchgeo's task names."""


def _split_file(cls: type, split: str) -> str:
    if cls is CopernicusBenchLCZS2:
        return cls.filename.format(split)
    return f"{cls.directory}/{cls.filename.format(split)}"


def torchgeo_root(root: Path, task: str) -> Path | None:
    """The folder to give torchgeo: ``root`` or its official-release sub-folder (``l*_*/``)."""
    cls = DATASET_REGISTRY[task]
    for candidate in [root, *sorted(root.glob("l[0-9]_*"))]:
        if all((candidate / _split_file(cls, s)).is_file() for s in SPLITS):
            return candidate
        if getattr(cls, "zipfile", None) and (candidate / cls.zipfile).is_file():
            return candidate
    return None


class CopernicusBenchDataModule(EvalDataModule):
    """One Copernicus-Bench task as an evaluation datamodule (torchgeo reads the files).

    Args:
        root: torchgeo's Copernicus-Bench root (see the module docstring).
        task: torchgeo's task name, one of :data:`COPERNICUS_TASKS`.
        modalities: the stem (default: the task's sensor; ``s2_l2a`` may replace ``s2_l1c``).
        **kwargs: :class:`EvalDataModule` arguments.
    """

    supported = ("s1", "s2_l1c", "s2_l2a")

    @classmethod
    def detect(cls, root: Path) -> list[Detection]:
        """One detection per task whose files (or zip) are under ``root``."""
        return [
            Detection({"task": t}, f"/{t}", f"copernicus/{t}")
            for t in COPERNICUS_TASKS
            if torchgeo_root(root, t) is not None
        ]

    @property
    def metric(self) -> str:
        """The task's headline metric (Copernicus-Bench's: mAP for BigEarthNet)."""
        return self.spec.metric

    def __init__(
        self, root: str | Path, task: str, modalities: Sequence[str] | None = None, **kwargs: Any
    ) -> None:
        if task not in COPERNICUS_TASKS:
            raise UserError(
                f"unknown Copernicus-Bench task {task!r}; known: {list(COPERNICUS_TASKS)}"
            )
        spec = COPERNICUS_TASKS[task]
        super().__init__(root, modalities or [spec.modality], **kwargs)
        if (spec.modality == "s1") != (self.modalities == ["s1"]):
            raise UserError(
                f"{task}: modalities must be ['s1'] or S2 stems to match the task's sensor"
            )
        self.name = task
        self.spec = spec
        self.task = spec.task
        self.num_classes = spec.num_classes
        self.multilabel = spec.multilabel
        self.ignore_index = spec.ignore_index
        cls = DATASET_REGISTRY[task]
        found = torchgeo_root(self.root, task)
        if found is None:
            raise layout_error(
                self.root,
                f"Copernicus-Bench {task}: {[_split_file(cls, s) for s in SPLITS]} under root "
                "or under its official l<level>_<name>/ folder",
            )
        self.torchgeo_root = found
        self.bands: tuple[str, ...] = tuple(cls.all_bands)

    def split_datasets(self) -> dict[str, Dataset]:  # noqa: D102
        cls = DATASET_REGISTRY[self.name]
        return {
            s: AdaptedDataset(
                cls(root=str(self.torchgeo_root), split=s),
                self._convert,
                [self.torchgeo_root / _split_file(cls, s)],
            )
            for s in SPLITS
        }

    def _convert(self, sample: dict[str, Tensor]) -> Sample:
        image = sample["image"].float()
        if image.ndim == 4:  # Flood-S1: (time, C, H, W), post-event last
            image = image[-1]
        image = image.numpy() * self.spec.scale
        source = f"Copernicus-Bench {self.name}"
        out = {m: self.prepare(image, m, self.bands, source) for m in self.modalities}
        if self.task == "segmentation":
            out["label"] = sample["mask"].long()
        else:
            out["label"] = sample["label"].float() if self.multilabel else sample["label"].long()
        return out
