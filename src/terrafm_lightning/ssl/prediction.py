"""``terrafm predict``: teacher embeddings of every written tile into a Zarr store.

:class:`EmbeddingWriter` (a Lightning ``BasePredictionWriter``) writes one row per sample of the
source store, so row = store sample index: ``cls`` (sample, feature) and optionally
``mean_patch`` (sample, feature) float32, the source's ``grid_cell``, ``tile_index``,
``centre_lat``, ``centre_lon``, ``sample_index`` and a ``written`` marker set after a row's
embeddings. ``xarray.open_zarr(output)`` reads it (dimension names ``sample`` / ``feature``).

Resume: rows already ``written`` are excluded from the predict dataloader
(``TerraFMDataModule.predict_exclude``), so a killed run continues where it stopped. DDP: the
:class:`ChunkShardSampler` gives each rank whole output chunks, so ranks never write to the same
chunk (no read-modify-write race) and no row twice. Written by hand because no library writes
Lightning predictions to Zarr.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DistributedSampler

from terrafm_lightning.store.format import consolidate, open_store
from terrafm_lightning.store.records import write_rows

METADATA = ("grid_cell", "tile_index", "centre_lat", "centre_lon")


class ChunkShardSampler(DistributedSampler):
    """Dataset positions whose store sample falls in an output chunk owned by this rank.

    Chunk ``c`` (samples ``c * chunk .. (c + 1) * chunk - 1``) belongs to rank ``c % replicas``;
    positions stay in store order, without padding or repeats.
    """

    def __init__(self, samples: Sequence[int], chunk: int, num_replicas: int, rank: int) -> None:
        self.samples = np.asarray(samples)
        self.num_replicas, self.rank = num_replicas, rank
        owner = (self.samples // chunk) % num_replicas
        self.positions = np.flatnonzero(owner == rank)

    def __iter__(self) -> Iterator[int]:
        return iter(self.positions.tolist())

    def __len__(self) -> int:
        return len(self.positions)

    def set_epoch(self, epoch: int) -> None:  # noqa: D102
        pass  # order never changes


class EmbeddingWriter(BasePredictionWriter):
    """Write teacher embeddings of ``terrafm predict`` into a Zarr store, resumably.

    Args:
        output: output store path (created if missing, continued if present).
        mean_patch_tokens: also write the mean of the final patch tokens.
        chunk: samples per output chunk (each written by one rank only).
    """

    def __init__(self, output: str, mean_patch_tokens: bool = False, chunk: int = 256) -> None:
        super().__init__(write_interval="batch")
        self.output = output
        self.mean_patch_tokens = mean_patch_tokens
        self.chunk = chunk
        self.root: zarr.Group | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Create (rank 0) or reopen the output, and tell the datamodule what is done."""
        if stage != "predict":
            return
        datamodule = trainer.datamodule
        if trainer.is_global_zero and not Path(self.output, "zarr.json").exists():
            self._create(datamodule.hparams.path, datamodule.hparams.storage_options, pl_module)
        trainer.strategy.barrier("embedding-writer-create")
        self.root = zarr.open_group(self.output, mode="r+", zarr_format=3)
        width = self.root["cls"].shape[1]
        if width != pl_module.teacher.backbone.embed_dim:
            raise ValueError(
                f"{self.output} holds {width}-wide embeddings, this model makes "
                f"{pl_module.teacher.backbone.embed_dim}: choose another output"
            )
        datamodule.predict_exclude = set(np.flatnonzero(self.root["written"][:]).tolist())
        datamodule.predict_sampler = lambda samples: ChunkShardSampler(
            samples, self.chunk, trainer.world_size, trainer.global_rank
        )

    def _create(self, source: str, options: dict[str, Any] | None, module: LightningModule) -> None:
        store = open_store(source, storage_options=options)
        n = store["written"].shape[0]
        width = module.teacher.backbone.embed_dim
        root = zarr.open_group(self.output, mode="w", zarr_format=3)
        root.attrs.update({"source": source, "mean_patch_tokens": self.mean_patch_tokens})
        chunk = min(self.chunk, n)
        names = ["cls", "mean_patch"] if self.mean_patch_tokens else ["cls"]
        for name in names:
            root.create_array(
                name,
                shape=(n, width),
                chunks=(chunk, width),
                dtype="float32",
                fill_value=np.nan,
                dimension_names=["sample", "feature"],
            )
        for name in METADATA:
            src = store[name]
            array = root.create_array(
                name,
                shape=(n,),
                chunks=(chunk,),
                dtype=str if src.dtype.kind in "OUT" else src.dtype,
                fill_value=src.fill_value,
                dimension_names=["sample"],
            )
            array[:] = src[:]
        index = root.create_array(
            "sample_index", shape=(n,), chunks=(chunk,), dtype="int64", dimension_names=["sample"]
        )
        index[:] = np.arange(n)
        root.create_array(
            "written",
            shape=(n,),
            chunks=(chunk,),
            dtype="bool",
            fill_value=False,
            dimension_names=["sample"],
        )
        consolidate(self.output)

    def write_on_batch_end(  # noqa: D102
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: dict[str, Any],
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        rows = prediction["index"].cpu().numpy()
        write_rows(self.root["cls"], rows, prediction["cls"].float().cpu().numpy())
        if self.mean_patch_tokens:
            write_rows(
                self.root["mean_patch"], rows, prediction["mean_patch"].float().cpu().numpy()
            )
        # The marker last: a row is only ``written`` once its embeddings are.
        write_rows(self.root["written"], rows, np.ones(len(rows), dtype=bool))
