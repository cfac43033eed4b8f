"""Subclassing the shared base: a linear probe on the frozen teacher (README example).

``TeacherLinearProbe.load_from_checkpoint("pretrain.ckpt")`` rebuilds the pretrained networks
from the checkpoint's hyper-parameters (:class:`StudentTeacherModule`), loads their weights and
adds a fresh linear head (the evaluation's :class:`LinearHead`); only that head trains.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from terrafm_lightning.batch import CropBatch
from terrafm_lightning.eval.linear_probe import LinearHead
from terrafm_lightning.modalities import WORLDCOVER_CLASSES, worldcover_index
from terrafm_lightning.ssl.student_teacher import StudentTeacherModule


class TeacherLinearProbe(StudentTeacherModule):
    """Linear head on the frozen teacher's CLS, trained on the tiles' dominant WorldCover class.

    Args:
        probe_lr: AdamW learning rate of the linear head.
        **pretraining_hparams: the pretraining module's hyper-parameters (from its checkpoint);
            the networks' ones build student and teacher, the DINO ones are not used.
    """

    strict_loading = False  # a pretraining checkpoint has no probe tensors

    def __init__(self, probe_lr: float = 1e-3, **pretraining_hparams: Any) -> None:
        super().__init__(**self.network_arguments(pretraining_hparams))
        self.student.requires_grad_(False)  # keep the pretrained networks as they are
        self.probe = LinearHead(self.teacher.backbone.embed_dim, len(WORLDCOVER_CLASSES))

    def training_step(self, batch: CropBatch, batch_idx: int) -> Tensor:  # noqa: D102
        b = len(batch["dominant_class"])  # the first global crop: rows 0..B-1
        with torch.no_grad():
            crop = {m: x[:b] for m, x in batch["global_crops"].items()}
            cls = self.teacher.backbone(crop, batch["teacher_presence"][:b])
        loss = self.probe.loss(self.probe(cls), worldcover_index(batch["dominant_class"]))
        self.log("train/probe_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:  # noqa: D102
        return torch.optim.AdamW(self.probe.parameters(), lr=self.hparams.probe_lr)
