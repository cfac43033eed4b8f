"""``terrafm predict``: teacher embeddings of every written tile into a Zarr store.

:class:`EmbeddingWriter` (a Lightning ``BasePredictionWriter``) writes one row per sample of the
source store, so row = store sample index: ``cls`` (sample, feature) and optionally
``mean_patch`` (sample, feature) float32, the source's ``grid_cell``, ``tile_index``,
``centre_lat``, ``centre_lon``, ``sample_index`` and a ``written`` marker set after a row's
embeddings. ``xarray.open_zarr(output)`` reads it (dimension names ``sample`` / ``feature``).

Provenance: the store records the checkpoint that made it (``checkpoint``, ``checkpoint_sha256``:
the sha256 of the checkpoint file, or of the module's weights when no checkpoint is loaded) and
the source store (``source``, ``source_digest``). A run into an existing output continues it only
with the same checkpoint digest and source; anything else is refused with one line naming both,
unless ``overwrite`` starts the output afresh.

Resume: the writer is the datamodule's
:class:`~terrafm_lightning.data.datamodule.PredictionPlanner`: rows already ``written`` are left
out of the predict dataloader, so a killed run continues where it stopped. DDP: the
:class:`ChunkShardSampler` gives each rank whole output chunks, so ranks never write to the same
chunk (no read-modify-write race) and no row twice. Written by hand because no library writes
Lightning predictions to Zarr.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DistributedSampler

from terrafm_lightning.data.datamodule import PredictionPlan, PredictionSource
from terrafm_lightning.store.format import StoreError, consolidate, open_store
from terrafm_lightning.store.records import write_rows

METADATA = ("grid_cell", "tile_index", "centre_lat", "centre_lon")
PROVENANCE = ("checkpoint", "checkpoint_sha256", "source", "source_digest")
"""Root attributes naming what made an embeddings store; a resumed run must match them."""


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``module``'s state dict."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def checkpoint_provenance(trainer: Trainer, module: LightningModule) -> dict[str, str]:
    """The checkpoint a predict run loaded and its digest (of the weights if no file)."""
    path = trainer.ckpt_path
    if path and Path(path).is_file():
        return {"checkpoint": str(path), "checkpoint_sha256": file_sha256(path)}
    return {"checkpoint": str(path or ""), "checkpoint_sha256": weights_sha256(module)}


def _describe(provenance: dict[str, Any]) -> str:
    def short(key: str) -> str:
        value = provenance.get(key)
        return str(value)[:12] if value else "none recorded"

    path = provenance.get("checkpoint")
    checkpoint = f"checkpoint {path}" if path else "weights without a checkpoint file"
    return (
        f"{checkpoint} (sha256 {short('checkpoint_sha256')}) of store "
        f"{provenance.get('source') or 'none recorded'} (source_digest {short('source_digest')})"
    )


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
        output: output store path (created if missing, continued if it was made by the same
            checkpoint from the same source store).
        mean_patch_tokens: also write the mean of the final patch tokens.
        chunk: samples per output chunk (each written by one rank only).
        overwrite: replace an existing output made by another checkpoint or source store.
    """

    def __init__(
        self,
        output: str,
        mean_patch_tokens: bool = False,
        chunk: int = 256,
        overwrite: bool = False,
    ) -> None:
        super().__init__(write_interval="batch")
        self.output = output
        self.mean_patch_tokens = mean_patch_tokens
        self.chunk = chunk
        self.overwrite = overwrite
        self.root: zarr.Group | None = None
        self._plan: PredictionPlan | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Forget the previous run's plan: the next predict loader is planned afresh."""
        if stage == "predict":
            self._plan, self.root = None, None

    def plan_prediction(self, trainer: Trainer, source: PredictionSource) -> PredictionPlan:
        """Create (rank 0) or reopen the output, check what made it, and plan what is left.

        Called by the datamodule when Lightning builds the predict loader (weights loaded).

        Raises:
            StoreError: the output was made by another checkpoint or source store (and not
                ``overwrite``), or holds embeddings of another width.
        """
        if self._plan is not None:
            return self._plan
        module = trainer.lightning_module
        provenance = {
            **checkpoint_provenance(trainer, module),
            "source": source.path,
            "source_digest": source.source_digest,
        }
        if trainer.is_global_zero and (
            self.overwrite or not Path(self.output, "zarr.json").exists()
        ):
            self._create(source, module, provenance)
        trainer.strategy.barrier("embedding-writer-create")
        self.root = zarr.open_group(self.output, mode="r+", zarr_format=3)
        recorded = {key: self.root.attrs.get(key) for key in PROVENANCE}
        if {k: recorded[k] for k in ("checkpoint_sha256", "source", "source_digest")} != {
            k: provenance[k] for k in ("checkpoint_sha256", "source", "source_digest")
        }:
            raise StoreError(
                f"{self.output} holds embeddings of {_describe(recorded)}; this run uses "
                f"{_describe(provenance)}: choose another output, or replace it with "
                "--trainer.callbacks.overwrite=true (EmbeddingWriter overwrite: true)"
            )
        width = self.root["cls"].shape[1]
        if width != module.teacher.backbone.embed_dim:
            raise StoreError(
                f"{self.output} holds {width}-wide embeddings, this model makes "
                f"{module.teacher.backbone.embed_dim}: choose another output"
            )
        done = frozenset(np.flatnonzero(self.root["written"][:]).tolist())
        if done and done >= set(source.samples.tolist()):
            rank_zero_info(
                f"{self.output} already holds every embedding of this run: nothing to do"
            )
        self._plan = PredictionPlan(
            skip=done,
            sampler=lambda samples: ChunkShardSampler(
                samples, self.chunk, trainer.world_size, trainer.global_rank
            ),
        )
        return self._plan

    def _create(
        self, source: PredictionSource, module: LightningModule, provenance: dict[str, str]
    ) -> None:
        store = open_store(source.path, storage_options=source.storage_options)
        n = store["written"].shape[0]
        width = module.teacher.backbone.embed_dim
        root = zarr.open_group(self.output, mode="w", zarr_format=3)
        root.attrs.update({**provenance, "mean_patch_tokens": self.mean_patch_tokens})
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
