"""Training throughput of pretraining runs: Lightning's ``ThroughputMonitor`` counting tiles."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ThroughputMonitor

from terrafm_lightning.batch import TileMetadata


def tiles_in_batch(batch: TileMetadata) -> int:
    """Samples of a pretraining-side batch: its tiles (all crops of a tile are one sample)."""
    return batch["dominant_class"].shape[0]


class PretrainThroughputMonitor(ThroughputMonitor):
    """``ThroughputMonitor`` for ``TerraFMDataModule`` batches (samples = tiles).

    Logs, on rank 0 every ``log_every_n_steps``, ``train/samples`` and ``train/batches`` so far,
    ``train/device/samples_per_sec`` and ``train/device/batches_per_sec`` (one process), with
    several processes also ``train/samples_per_sec`` (all of them); rates are means over the
    last ``window_size`` batches. On a GPU it synchronises the device at every batch to time it.

    Args:
        window_size: batches of the rolling mean.
        **kwargs: further ``lightning.fabric.utilities.throughput.Throughput`` arguments.
    """

    def __init__(self, window_size: int = 20, **kwargs: Any) -> None:
        super().__init__(batch_size_fn=tiles_in_batch, window_size=window_size, **kwargs)
