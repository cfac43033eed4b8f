"""Per-batch reseeding of the global random stream: a resumed run draws what an unbroken one did.

The index of the batch about to be transferred (before ``on_train_batch_start``, when the
on-device multi-crop draws) has no public Lightning API: it is read from the fit loop's batch
progress, the state Lightning restores on a mid-epoch resume. ``pyproject.toml`` therefore pins
``lightning`` to the minor release this is tested with (2.6).
"""

from __future__ import annotations

import zlib

import torch
from lightning import Trainer


def batch_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    """The seed of one training batch: a pure function of the run seed and its position."""
    return zlib.crc32(f"{seed}/{epoch}/{batch}/{rank}".encode())


def reseed_training_batch(trainer: Trainer, seed: int) -> None:
    """Seed the global RNG for the training batch about to be moved to the device.

    The on-device multi-crop, the modality draws and the student's drop-path all draw from the
    global stream, so each training batch becomes a function of (seed, epoch, batch, rank).
    Outside training (validation, prediction) nothing is reseeded.
    """
    if trainer.training:
        batch = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        torch.manual_seed(batch_seed(seed, trainer.current_epoch, batch, trainer.global_rank))
