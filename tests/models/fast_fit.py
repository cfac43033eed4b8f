"""One ``fast_dev_run`` fit of a LightningModule on in-memory batches (peer-library tests)."""

import lightning as L
from torch.utils.data import DataLoader


def fast_dev_fit(task: L.LightningModule, batches: list[dict]) -> L.Trainer:
    """Fit ``task`` for one training and one validation batch of ``batches`` on the CPU."""
    trainer = L.Trainer(
        fast_dev_run=True,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = DataLoader(batches, batch_size=None)
    trainer.fit(task, train_dataloaders=loader, val_dataloaders=loader)
    return trainer
