"""Run by tests/ssl/test_pretrain_fsdp.py: a few pretraining steps, FSDP2-sharded or in one process.

``python tests/scripts/fsdp_pretrain_run.py OUT DEVICES``: with DEVICES=2, two gloo processes on
CPU under
``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)`` (so ``configure_model``
applies ``fully_shard``), each taking half of every global batch; with DEVICES=1, one unsharded
process on the whole global batches. Every rank saves, before training and after every step, the
centres and the full (gathered) student and teacher parameters, plus how each parameter is stored
on that rank.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.tensor import DTensor

from terrafm_lightning.ssl.module import TerraFMPretrainModule
from tests.scripts.ddp_centering_run import FixedBatches, quiet_trainer, tiny_module


def _full(param: torch.Tensor) -> torch.Tensor:
    """The whole parameter (all-gathered when sharded)."""
    return (param.full_tensor() if isinstance(param, DTensor) else param).detach().clone()


class RecordState(L.Callback):
    """Centres and full parameters before training (entry 0), then after every step."""

    def __init__(self) -> None:
        self.states: list[dict[str, Any]] = []

    def _record(self, pl_module: TerraFMPretrainModule) -> None:
        c = pl_module.centering
        record: dict[str, Any] = {"c": c.center.clone(), "c_h": c.center_hf.clone()}
        for net in ("student", "teacher"):
            params = dict(getattr(pl_module, net).named_parameters())
            record[net] = {name: _full(p) for name, p in params.items()}
            # How this rank stores each parameter: (is a DTensor, local numel, full numel).
            record[f"{net}_layout"] = {
                name: (
                    isinstance(p, DTensor),
                    (p.to_local() if isinstance(p, DTensor) else p).numel(),
                    p.numel(),
                )
                for name, p in params.items()
            }
        self.states.append(record)

    def on_train_start(self, trainer, pl_module) -> None:
        self._record(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._record(pl_module)


def main(out: Path, devices: int) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0)
    # A large EMA step, so a wrong update shows clearly.
    model = tiny_module(momentum_teacher=0.9, freeze_last_layer_epochs=0.0)
    recorder = RecordState()
    strategy = ModelParallelStrategy(
        data_parallel_size=devices, tensor_parallel_size=1, process_group_backend="gloo"
    )
    trainer = quiet_trainer(
        devices, strategy if devices > 1 else "auto", recorder, gradient_clip_val=3.0
    )
    trainer.fit(model, datamodule=FixedBatches())
    torch.save(recorder.states, out / f"devices{devices}_rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
