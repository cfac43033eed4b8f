"""Run by tests/eval/test_eval_knn.py: ``KNNProbe`` validation under DDP (gloo on CPU).

``python tests/scripts/knn_gather_run.py OUT DEVICES``: reads the EuroSAT fixture in
``OUT/eurosat``; every rank saves its gathered kNN bank and the logged metrics.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]  # this checkout, not an installed copy

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy  # noqa: E402

from terrafm_lightning.eval import EuroSATDataModule, KNNProbe  # noqa: E402


def main(out: Path, devices: int) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0)
    probe = KNNProbe(10, backbone="terrafm_tiny", backbone_kwargs={"depth": 2})
    dm = EuroSATDataModule(out / "eurosat", batch_size=3, img_size=16)
    strategy = DDPStrategy(process_group_backend="gloo") if devices > 1 else "auto"
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.validate(probe, datamodule=dm, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    bank = {"features": probe.bank[0].cpu(), "labels": probe.bank[1].cpu(), "metrics": metrics}
    torch.save(bank, out / f"devices{devices}_rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
