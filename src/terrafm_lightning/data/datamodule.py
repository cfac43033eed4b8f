"""``TerraFMDataModule``: streams a store (local or fsspec URL) into TerraFM pretraining batches.

CPU workers (spawn/forkserver, persistent) only read and decode whole tiles, a batch at a time
into shared-memory buffers (:class:`StoreTileDataset`); batches are pinned when an accelerator is
present. With a GPU-decodable store codec, CUDA and nvCOMP, the workers send the compressed
chunks instead and :meth:`TerraFMDataModule.transfer_batch_to_device` decodes them on the device.
Multi-crop, flips, normalisation and modality draws run batched on the device in
:meth:`TerraFMDataModule.on_after_batch_transfer` (:class:`MultiCrop`).

Mid-epoch resume: the module's ``state_dict`` holds the sampler's epoch and this rank's position
counted in samples that reached ``on_after_batch_transfer`` during training (so DataLoader
prefetching does not skip tiles); Lightning saves it in every checkpoint and restores it before
it builds the train DataLoader, which then continues the epoch exactly where it stopped.

``__init__`` only checks arguments; the store is first opened in ``setup()`` (so
``--print_config`` and config parsing work with no store on disk), and ``setup()`` reads it once
for every stage.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Sampler

from terrafm_lightning.data.dataset import (
    EncodedBatchDecoder,
    SampleMetadata,
    StoreTileDataset,
    collate_tile_batch,
)
from terrafm_lightning.data.multicrop import DrawMode, MultiCrop
from terrafm_lightning.data.sampler import WorldCoverWeightedSampler, worldcover_tile_weights
from terrafm_lightning.errors import UserError
from terrafm_lightning.modalities import MODALITIES, check_modality
from terrafm_lightning.store.device_decoding import DeviceDecoder, device_decoder
from terrafm_lightning.store.format import StoreError, open_store
from terrafm_lightning.store.schema import WRITTEN
from terrafm_lightning.store.sharding import chunk_layout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictionSource:
    """What ``terrafm predict`` reads: the store and its usable samples, in store order.

    Attributes:
        path: store path or URL.
        storage_options: fsspec options of the store.
        source_digest: the store's ``source_digest`` attribute (what it was made from; "" if none).
        samples: store sample indices of every usable written tile.
    """

    path: str
    storage_options: dict[str, Any]
    source_digest: str
    samples: np.ndarray


@dataclass(frozen=True)
class PredictionPlan:
    """Which samples a prediction run reads and how they are split over ranks.

    Attributes:
        skip: store sample indices already done (a resumed run leaves them out).
        sampler: builds the predict sampler from the store sample indices left (None: in order).
    """

    skip: frozenset[int] = frozenset()
    sampler: Callable[[np.ndarray], Sampler] | None = None


@runtime_checkable
class PredictionPlanner(Protocol):
    """A callback that decides what :meth:`TerraFMDataModule.predict_dataloader` reads.

    The datamodule asks the trainer's first callback with this method (``EmbeddingWriter``)
    when Lightning builds the predict loader, after the checkpoint's weights are loaded.
    """

    def plan_prediction(self, trainer: Any, source: PredictionSource) -> PredictionPlan:
        """The plan for predicting ``source`` under ``trainer``."""


class ResumableDataLoader(DataLoader):
    """Train DataLoader whose state is its datamodule's sampler state.

    Lightning then treats the loader as resumable (no "dataloader is not resumable" warning on a
    mid-epoch resume) and restores it from the loop state too; both restores set the same state.
    """

    datamodule: TerraFMDataModule | None = None

    def state_dict(self) -> dict[str, Any]:
        """The datamodule's state (sampler epoch and consumed position)."""
        return self.datamodule.state_dict() if self.datamodule is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the datamodule's sampler state."""
        if self.datamodule is not None:
            self.datamodule.load_state_dict(state_dict)


class TerraFMDataModule(LightningDataModule):
    """WorldCover-weighted, distributed, resumable streaming of a TerraFM store.

    Args:
        path: store path or fsspec URL (``s3://bucket/store.zarr``).
        batch_size: tiles per batch and rank.
        num_workers: DataLoader worker processes (0 reads in the main process).
        worker_context: ``"spawn"`` or ``"forkserver"`` (zarr v3 with fork can deadlock).
        persistent_workers: keep workers (and their open store) across epochs.
        pin_memory: pin batches (only with an accelerator).
        prefetch_factor: batches each worker prepares ahead.
        storage_options: fsspec options (endpoint, credentials) for remote stores.
        modalities: modalities the model may use (default: all the store has).
        modality_draw: per-crop draw mode, ``"all"``, ``"one"`` or ``"subset"``.
        modality_probability: keep probability of ``"subset"`` draws (paper: 0.5).
        n_global_crops: global crops (teacher and student).
        global_crop_size: global crop size in pixels.
        global_crop_scale: area-share range of global crops.
        n_local_crops: local crops (student only).
        local_crop_size: local crop size in pixels.
        local_crop_scale: area-share range of local crops.
        hflip: random left-right flips per crop.
        vflip: random up-down flips per crop.
        normalisation: ``"store"`` (the store's ``stats`` attribute, documented defaults where
            missing) or ``"default"`` (always :data:`SSL4EO_STATS`).
        nodata_threshold: a modality with a larger nodata pixel share in a tile counts as absent.
        tau: tempering exponent of the WorldCover weights (0: uniform; 1: class-balanced).
        seed: sampler seed (shared by all ranks) and validation split seed.
        samples_per_epoch: draws per epoch over all ranks (default: the training tiles).
        high_frequency_threshold: classes with at least this store frequency are high-frequency.
        val_fraction: share of usable tiles held out for validation (online kNN; not weighted).
        val_batch_size: validation batch size (default ``batch_size``).
    """

    def __init__(
        self,
        path: str,
        batch_size: int = 32,
        num_workers: int = 4,
        worker_context: Literal["spawn", "forkserver"] = "spawn",
        persistent_workers: bool = True,
        pin_memory: bool = True,
        prefetch_factor: int = 2,
        storage_options: dict[str, Any] | None = None,
        modalities: list[str] | None = None,
        modality_draw: DrawMode = "subset",
        modality_probability: float = 0.5,
        n_global_crops: int = 2,
        global_crop_size: int = 224,
        global_crop_scale: tuple[float, float] = (0.25, 1.0),
        n_local_crops: int = 6,
        local_crop_size: int = 96,
        local_crop_scale: tuple[float, float] = (0.05, 0.25),
        hflip: bool = True,
        vflip: bool = True,
        normalisation: Literal["store", "default"] = "store",
        nodata_threshold: float = 0.5,
        tau: float = 0.5,
        seed: int = 0,
        samples_per_epoch: int | None = None,
        high_frequency_threshold: float = 0.1,
        val_fraction: float = 0.0,
        val_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if worker_context not in ("spawn", "forkserver"):
            raise UserError(f"worker_context must be spawn or forkserver, got {worker_context!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if not 0.0 <= nodata_threshold <= 1.0:
            raise UserError(f"nodata_threshold must be in [0, 1], got {nodata_threshold}")
        self.modalities: list[str] = []
        self.classes: list[int] = []
        self._class_frequencies: dict[int, float] | None = None
        self.multicrop: MultiCrop | None = None
        self.train_dataset: StoreTileDataset | None = None
        self.val_dataset: StoreTileDataset | None = None
        self.train_weights: np.ndarray | None = None
        self.skipped_samples = 0
        self.sampler: WorldCoverWeightedSampler | None = None
        self._progress = {"epoch": 0, "position": 0}
        self._resume: dict[str, Any] | None = None
        self.predict_dataset: StoreTileDataset | None = None
        self.batch_decoder: EncodedBatchDecoder | None = None
        self._source_digest = ""
        self._kept: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None

    def __str__(self) -> str:
        """Class and store path; unlike Lightning's default, builds no dataloader (no I/O)."""
        return f"{type(self).__name__}(path={self.hparams.path!r})"

    def _read_store_attributes(self, attrs: dict[str, Any]) -> None:
        """Modalities, classes, frequencies and statistics from the store's root attributes."""
        hp = self.hparams
        self._source_digest = str(attrs.get("source_digest", ""))
        stored = list(attrs["modalities"])
        wanted = [check_modality(m) for m in (hp.modalities or stored)]
        if missing := [m for m in wanted if m not in stored]:
            raise StoreError(f"store {hp.path} has no modality {missing} (it has {stored})")
        self.modalities = [m for m in MODALITIES if m in wanted]
        self.classes = [int(c) for c in attrs["worldcover_classes"]]
        frequencies = attrs.get("class_frequencies") or {}
        self._class_frequencies = {int(c): float(f) for c, f in frequencies.items()}
        if hp.tau > 0 and not self._class_frequencies:
            # Reported, not an error: without a WorldCover map the one switch a run needs is
            # the model's (centering dino), whose error names it.
            log.warning(
                "store %s has no WorldCover class_frequencies (no `terrafm-data worldcover` "
                "pass): tiles are drawn uniformly, tau=%s does not apply",
                hp.path,
                hp.tau,
            )
        store_stats = (attrs.get("stats") or {}) if hp.normalisation == "store" else {}
        self.multicrop = MultiCrop(
            modalities=self.modalities,
            n_global=hp.n_global_crops,
            global_size=hp.global_crop_size,
            global_scale=tuple(hp.global_crop_scale),
            n_local=hp.n_local_crops,
            local_size=hp.local_crop_size,
            local_scale=tuple(hp.local_crop_scale),
            hflip=hp.hflip,
            vflip=hp.vflip,
            draw_mode=hp.modality_draw,
            draw_probability=hp.modality_probability,
            stats={m: store_stats[m] for m in self.modalities if m in store_stats},
        )

    @property
    def class_frequencies(self) -> dict[int, float]:
        """WorldCover class code -> share of valid pixels in the store (after ``setup``)."""
        if self._class_frequencies is None:
            raise RuntimeError("TerraFMDataModule reads the store in setup(): call setup() first")
        return dict(self._class_frequencies)

    @property
    def high_frequency_classes(self) -> list[int]:
        """Class codes whose frequency is at least ``high_frequency_threshold``."""
        threshold = self.hparams.high_frequency_threshold
        return sorted(c for c, f in self.class_frequencies.items() if f >= threshold)

    def setup(self, stage: str | None = None) -> None:
        """Open the store: attributes, per-sample metadata, train / validation split (once).

        Every stage shares the split, so later calls (other stages, dataloader builders) return
        at once.
        """
        if self.train_dataset is not None:
            return
        hp = self.hparams
        root = open_store(hp.path, storage_options=hp.storage_options)
        if root[WRITTEN].shape[0] == 0:
            raise StoreError(
                f"store {hp.path} has no samples (it was created with 0 tiles): write tiles into "
                "it with terrafm-data, or choose another store"
            )
        self._read_store_attributes(root.attrs.asdict())
        meta = SampleMetadata(root)
        available = meta.selected(self.modalities, hp.nodata_threshold)
        keep = meta.written & available.any(axis=1)
        samples = np.flatnonzero(keep)
        self.skipped_samples = int((~keep).sum())
        if self.skipped_samples:
            log.warning(
                "store %s: skipping %d of %d samples (%d not written, %d without a usable "
                "modality among %s at nodata_threshold %s)",
                hp.path,
                self.skipped_samples,
                len(keep),
                int((~meta.written).sum()),
                int((meta.written & ~available.any(axis=1)).sum()),
                self.modalities,
                hp.nodata_threshold,
            )
        if len(samples) == 0:
            raise StoreError(f"store {hp.path} has no usable sample")
        self._kept = (
            samples,
            available[samples],
            meta.worldcover_hist[samples],
            meta.dominant_class[samples],
        )
        decoder = self.device_decoder or self._auto_decoder(root)
        self.batch_decoder = None
        order = np.random.default_rng(hp.seed).permutation(len(samples))
        n_val = int(round(hp.val_fraction * len(samples)))
        self.train_dataset = self._subset(np.sort(order[n_val:]), encoded=decoder is not None)
        self.val_dataset = (
            self._subset(np.sort(order[:n_val]), encoded=decoder is not None) if n_val else None
        )
        if decoder is not None:
            # Every stage's dataset reads the same arrays with the same nodata threshold.
            self.batch_decoder = self.train_dataset.batch_decoder(decoder)
        frequencies = [self._class_frequencies.get(c, 0.0) for c in self.classes]
        hist = self.train_dataset.worldcover_hist
        self.train_weights = (
            worldcover_tile_weights(hist, frequencies, hp.tau)
            if hp.tau > 0 and self._class_frequencies
            else np.ones(len(hist))
        )

    device_decoder: DeviceDecoder | None = None
    """Decoder of the device-decode path, read by ``setup``; None: nvCOMP when the store codec,
    CUDA and the library allow it (see
    :func:`~terrafm_lightning.store.device_decoding.device_decoder`), else the workers decode on
    the CPU. Set it before ``setup`` to force a backend (tests use the CPU one)."""

    def _subset(self, rows: np.ndarray, encoded: bool) -> StoreTileDataset:
        """Dataset of the usable samples at positions ``rows`` (see ``setup``)."""
        samples, available, hist, dominant = self._kept
        hp = self.hparams
        return StoreTileDataset(
            hp.path,
            samples[rows],
            available[rows],
            hist[rows],
            dominant[rows],
            self.modalities,
            hp.nodata_threshold,
            hp.storage_options,
            encoded=encoded,
        )

    def _loader(
        self,
        dataset: StoreTileDataset,
        batch_size: int,
        cls: type[DataLoader] = DataLoader,
        **kw: Any,
    ) -> DataLoader:
        hp = self.hparams
        workers = hp.num_workers > 0
        return cls(
            dataset,
            batch_size=batch_size,
            collate_fn=collate_tile_batch,
            num_workers=hp.num_workers,
            multiprocessing_context=hp.worker_context if workers else None,
            persistent_workers=hp.persistent_workers and workers,
            prefetch_factor=hp.prefetch_factor if workers else None,
            pin_memory=hp.pin_memory and torch.accelerator.is_available(),
            **kw,
        )

    def _auto_decoder(self, root: Any) -> DeviceDecoder | None:
        trainer = self.trainer
        if trainer is None or trainer.strategy.root_device.type != "cuda":
            return None
        codecs = {chunk_layout(root[m]).codec for m in self.modalities}
        if len(codecs) != 1:
            return None
        return device_decoder(codecs.pop(), trainer.strategy.root_device)

    def train_dataloader(self) -> DataLoader:
        """Weighted draws, a disjoint equal share per rank, resumed mid-epoch if restored."""
        if self.train_dataset is None:
            self.setup("fit")
        trainer = self.trainer
        self.sampler = WorldCoverWeightedSampler(
            self.train_weights,
            samples_per_epoch=self.hparams.samples_per_epoch,
            num_replicas=trainer.world_size if trainer is not None else None,
            rank=trainer.global_rank if trainer is not None else None,
            seed=self.hparams.seed,
        )
        if self._resume is not None:
            self.sampler.load_state_dict(self._resume)
            self._resume = None
        batch_size = self.hparams.batch_size
        if len(self.sampler) < batch_size:
            ranks = self.sampler.num_replicas
            raise StoreError(
                f"store {self.hparams.path}: batch_size {batch_size} is larger than the "
                f"{len(self.sampler)} training samples per rank ({self.sampler.total_size} over "
                f"{ranks} rank{'s' * (ranks > 1)}), so no batch would train: lower "
                f"--data.init_args.batch_size to at most {len(self.sampler)} or raise "
                "--data.init_args.samples_per_epoch"
            )
        loader = self._loader(
            self.train_dataset,
            self.hparams.batch_size,
            ResumableDataLoader,
            sampler=self.sampler,
            drop_last=True,
        )
        loader.datamodule = self
        return loader

    def val_dataloader(self) -> DataLoader | list:
        """Held-out tiles in store order (labels: dominant WorldCover class); empty without any."""
        if self.train_dataset is None:
            self.setup("validate")
        if self.val_dataset is None:
            return []
        return self._loader(
            self.val_dataset, self.hparams.val_batch_size or self.hparams.batch_size
        )

    def transfer_batch_to_device(
        self, batch: Any, device: torch.device, dataloader_idx: int
    ) -> Any:
        """Move the (pinned) batch; compressed chunks are decoded on ``device`` after the copy."""
        batch = super().transfer_batch_to_device(batch, device, dataloader_idx)
        if isinstance(batch, dict) and "chunks" in batch:
            batch = self.batch_decoder.decode(batch)
        return batch

    def predict_source(self) -> PredictionSource:
        """The store and usable samples that ``predict_dataloader`` reads (after ``setup``)."""
        if self.train_dataset is None:
            self.setup("predict")
        hp = self.hparams
        samples = self._kept[0]
        return PredictionSource(
            hp.path, dict(hp.storage_options or {}), self._source_digest, samples
        )

    def predict_dataloader(self) -> DataLoader:
        """Every usable written tile in store order, as the trainer's writer plans it.

        Under a Trainer, the first callback that is a :class:`PredictionPlanner`
        (``EmbeddingWriter``) says which samples are already done (resume) and how ranks split
        the rest. Predictions of this datamodule exist to be written: a Trainer without such a
        callback is refused (they would be computed and dropped).
        """
        source = self.predict_source()
        plan = PredictionPlan()
        if self.trainer is not None:
            planners = [c for c in self.trainer.callbacks if isinstance(c, PredictionPlanner)]
            if not planners:
                raise StoreError(
                    "predict with TerraFMDataModule writes embeddings through an EmbeddingWriter, "
                    "and none is configured: add --trainer.callbacks+=EmbeddingWriter "
                    "--trainer.callbacks.output=embeddings.zarr (or an EmbeddingWriter in the "
                    "config's trainer.callbacks)"
                )
            plan = planners[0].plan_prediction(self.trainer, source)
        rows = np.flatnonzero(~np.isin(source.samples, sorted(plan.skip)))
        self.predict_dataset = self._subset(rows, encoded=self.batch_decoder is not None)
        sampler = plan.sampler(source.samples[rows]) if plan.sampler else None
        return self._loader(
            self.predict_dataset,
            self.hparams.val_batch_size or self.hparams.batch_size,
            sampler=sampler,
        )

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict:
        """Training: multi-crop and modality draws; otherwise whole tiles (``whole_tiles``)."""
        self.multicrop.to(batch["available"].device)
        if self.trainer is not None and not self.trainer.training:
            return self.multicrop.whole_tiles(batch)
        if self.sampler is not None:
            if self._progress["epoch"] != self.sampler.epoch:
                self._progress = {"epoch": self.sampler.epoch, "position": 0}
            self._progress["position"] += len(batch["index"])
        return self.multicrop(batch)

    def state_dict(self) -> dict[str, Any]:
        """Sampler state with this rank's position = samples consumed by training so far."""
        if self.sampler is None:
            return {"sampler": dict(self._resume)} if self._resume else {}
        position = (
            self._progress["position"] if self._progress["epoch"] == self.sampler.epoch else 0
        )
        return {"sampler": self.sampler.state_dict(position=position)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the sampler (before or after the train DataLoader is built)."""
        if "sampler" not in state_dict:
            return
        self._resume = dict(state_dict["sampler"])
        self._progress = {"epoch": self._resume["epoch"], "position": self._resume["position"]}
        if self.sampler is not None:
            self.sampler.load_state_dict(self._resume)
