"""Run by tests/ssl/test_pretrain_ddp.py: a few pretraining steps on fixed global batches.

``python tests/scripts/ddp_centering_run.py OUT DEVICES``: DEVICES processes (gloo on CPU) each
take an
equal slice of every global batch; the centres after every step are saved per rank.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader

from terrafm_lightning.ssl.module import TerraFMPretrainModule
from tests.generators.batches import make_batch, take_samples

GLOBAL_BATCH = 8
# Rank 1 of 2 sees no high-frequency sample in the first batch; the last batch has none at all.
CLASSES = [
    [10, 30, 50, 95, 50, 95, 50, 95],
    [10, 50, 30, 95, 95, 10, 50, 30],
    [50, 95, 50, 95, 50, 95, 50, 95],
]


class FixedBatches(L.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        share = GLOBAL_BATCH // world
        rows = slice(rank * share, (rank + 1) * share)
        batches = [
            take_samples(
                make_batch(
                    GLOBAL_BATCH, dominant_class=c, generator=torch.Generator().manual_seed(i)
                ),
                rows,
            )
            for i, c in enumerate(CLASSES)
        ]
        return DataLoader(batches, batch_size=None)


class RecordCentres(L.Callback):
    def __init__(self) -> None:
        self.centres: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        c = pl_module.centering
        self.centres.append({"c": c.center.clone(), "c_h": c.center_hf.clone()})


def tiny_module(**overrides: Any) -> TerraFMPretrainModule:
    """A depth-2 TerraFM-Ti pretraining module with a small head (classes 10, 30 frequent)."""
    settings: dict[str, Any] = {
        "drop_path_rate": 0.0,
        "num_prototypes": 64,
        "head_hidden_dim": 32,
        "head_bottleneck_dim": 16,
        "high_frequency_classes": [10, 30],
        "warmup_epochs": 0.0,
        # Per 256 samples: a peak lr of 5e-4 at the global batch of 8.
        "lr": 5e-4 * 256 / GLOBAL_BATCH,
    }
    return TerraFMPretrainModule("terrafm_tiny", {"depth": 2}, **{**settings, **overrides})


def quiet_trainer(devices: int, strategy: Any, recorder: L.Callback, **kwargs: Any) -> L.Trainer:
    """A CPU Trainer for one epoch over the fixed batches, with nothing but ``recorder``."""
    return L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[recorder],
        **kwargs,
    )


def main(out: Path, devices: int) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0)
    model = tiny_module()
    recorder = RecordCentres()
    # Every stem and the fusion take part in every step (static shapes), whatever the draws.
    strategy = DDPStrategy(find_unused_parameters=False, process_group_backend="gloo")
    trainer = quiet_trainer(devices, strategy if devices > 1 else "auto", recorder)
    trainer.fit(model, datamodule=FixedBatches())
    torch.save(recorder.centres, out / f"devices{devices}_rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
