"""Subclassing the pretraining module: a linear probe on the frozen teacher (README example).

``TeacherLinearProbe.load_from_checkpoint("pretrain.ckpt")`` rebuilds the pretrained networks
from the checkpoint's hyper-parameters, loads their weights and adds a fresh linear head; with
``pretraining = False`` the base runs no EMA, DINO schedule, centring update or student step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from terrafm_lightning.batch import CropBatch
from terrafm_lightning.modalities import WORLDCOVER_CLASSES
from terrafm_lightning.ssl.module import TerraFMPretrainModule, worldcover_index


class TeacherLinearProbe(TerraFMPretrainModule):
    """Linear head on the frozen teacher's CLS, trained on the tiles' dominant WorldCover class."""

    pretraining = False  # keep student and teacher as pretrained
    strict_loading = False  # a pretraining checkpoint has no probe tensors

    def __init__(self, probe_lr: float = 1e-3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.probe = nn.Linear(self.teacher.backbone.embed_dim, len(WORLDCOVER_CLASSES))

    def training_step(self, batch: CropBatch, batch_idx: int) -> Tensor:  # noqa: D102
        b = len(batch["dominant_class"])  # the first global crop: rows 0..B-1
        with torch.no_grad():
            crop = {m: x[:b] for m, x in batch["global_crops"].items()}
            cls = self.teacher.backbone(crop, batch["teacher_presence"][:b])
        loss = F.cross_entropy(self.probe(cls), worldcover_index(batch["dominant_class"]))
        self.log("train/probe_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:  # noqa: D102
        return torch.optim.AdamW(self.probe.parameters(), lr=self.hparams.probe_lr)
