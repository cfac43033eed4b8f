"""The batch dataset of whole store tiles: every tile and modality of a batch read concurrently.

:class:`StoreTileDataset` is a batch-level map dataset: the DataLoader hands a worker the list of
a batch's positions (``__getitems__``) and the worker

1. fetches the stored inner chunk of every (tile, modality) of the batch at once
   (:class:`~terrafm_lightning.store.shard_reader.ShardReader`);
2. verifies each chunk's crc32c and decodes it straight into one (B, C, H, W) buffer per
   modality; inside workers the buffers come from a
   :class:`~terrafm_lightning.data.shared_buffers.BufferPool`, so a batch crosses to the main
   process as file descriptors: no per-tile tensors pickled, no collate copy
   (:func:`collate_tile_batch` is the identity);
3. or, for a dataset built with ``encoded=True``, verifies the chunks and leaves them compressed
   (one shared byte buffer per modality) for an :class:`EncodedBatchDecoder` to decode on the
   device.

A damaged chunk (checksum mismatch), an unreadable shard or a tile without a usable modality is
a :class:`~terrafm_lightning.store.format.TileReadError` naming the store, modality, sample and
shard. Nodata rules come from the store format (:data:`~terrafm_lightning.store.schema.NODATA`);
per-sample metadata lives in shared memory so spawned workers map it instead of each
unpickling a copy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
import torch
import zarr
from torch.utils.data import Dataset, get_worker_info

from terrafm_lightning.batch import EncodedTileBatch, TileBatch
from terrafm_lightning.data.shared_buffers import (
    BufferPool,
    inline_small_tensors,
    shared_array,
    shared_empty,
)
from terrafm_lightning.modalities import MODALITIES
from terrafm_lightning.store.device_decoding import DeviceDecoder
from terrafm_lightning.store.format import StoreError, TileReadError, open_store
from terrafm_lightning.store.schema import NODATA, WRITTEN
from terrafm_lightning.store.shard_reader import ShardReader
from terrafm_lightning.store.sharding import ChunkLayout

if TYPE_CHECKING:
    from zarr.core.buffer import Buffer

METADATA_KEYS = ("available", "worldcover_hist", "dominant_class", "index")
ENCODED_KEYS = ("chunks", "chunk_offsets")


class SampleMetadata:
    """Per-sample metadata a reader needs, in :data:`MODALITIES` column order.

    Attributes:
        written: (N,) the sample is completely written.
        available: (N, 3) the store has the modality for the sample.
        nodata_fraction: (N, 3) share of nodata pixels (1 where absent).
        worldcover_hist: (N, 11) WorldCover class shares.
        dominant_class: (N,) dominant WorldCover code (0: none).
    """

    def __init__(self, root: zarr.Group) -> None:
        columns = [MODALITIES.index(m) for m in root.attrs["modalities"]]
        n = root[WRITTEN].shape[0]
        self.written = root[WRITTEN][:].astype(bool)
        self.available = np.zeros((n, len(MODALITIES)), bool)
        self.available[:, columns] = root["available"][:]
        self.nodata_fraction = np.ones((n, len(MODALITIES)), np.float32)
        self.nodata_fraction[:, columns] = root["nodata_fraction"][:]
        self.worldcover_hist = root["worldcover_hist"][:].astype(np.float32)
        self.dominant_class = root["dominant_class"][:].astype(np.int64)

    def selected(self, modalities: Sequence[str], nodata_threshold: float) -> np.ndarray:
        """(N, 3) ``available`` restricted to ``modalities`` and to nodata shares <= threshold.

        The datamodule's modality selection, applied once, here.
        """
        chosen = np.array([m in modalities for m in MODALITIES])
        return self.available & (self.nodata_fraction <= nodata_threshold) & chosen


def replace_nodata(
    pixels: torch.Tensor, modality: str, available: torch.Tensor, threshold: float
) -> torch.Tensor:
    """Zero nodata pixels in place; a row whose nodata share exceeds ``threshold`` becomes absent.

    Works batched on any device without a host synchronisation (no data-dependent branch).
    Modalities whose nodata value is 0 (S2 DN) need no scan: their nodata is 0 already and
    ``available`` came from the store's ``nodata_fraction``, computed with the same rule.

    Args:
        pixels: (B, C, H, W) decoded tiles of ``modality``.
        modality: modality key (its nodata value is ``NODATA[modality]``).
        available: (B,) bool, rows that hold the modality.
        threshold: largest nodata pixel share (a pixel is nodata when any band is).

    Returns:
        (B,) bool: ``available`` with too-empty rows removed.
    """
    nodata = NODATA[modality]
    if nodata == 0:
        return available
    invalid = torch.isnan(pixels) if math.isnan(nodata) else pixels == nodata
    share = invalid.any(dim=1).flatten(1).float().mean(dim=1)
    keep = available & (share <= threshold)
    pixels.masked_fill_(invalid | ~keep.view(-1, 1, 1, 1), 0)
    return keep


def collate_tile_batch(batch: TileBatch | EncodedTileBatch) -> TileBatch | EncodedTileBatch:
    """The DataLoader collate of :class:`StoreTileDataset`: batches come out already assembled."""
    return batch


class StoreTileDataset(Dataset):
    """Whole tiles of the selected modalities, read a batch at a time (``docs/contracts.md``).

    The store is opened on first access in the process that reads (each DataLoader worker), never
    pickled; the per-sample metadata is held in shared memory, so workers map it. Tiles keep the
    store dtype (S1 float32, S2 uint16; :class:`MultiCrop` converts on the device). Nodata becomes
    0 and a modality whose nodata pixel share exceeds ``nodata_threshold`` counts as absent
    (:func:`replace_nodata`); absent rows are all 0. Use with ``collate_fn=collate_tile_batch``.

    Args:
        path: local store path or fsspec URL.
        samples: store sample indices this dataset serves.
        available: (len(samples), 3) modalities to read per sample
            (:meth:`SampleMetadata.selected`: the datamodule's selection is already applied).
        worldcover_hist: (len(samples), 11) class shares.
        dominant_class: (len(samples),) dominant WorldCover codes.
        modalities: modalities to return (a key per modality, zeros where absent).
        nodata_threshold: the largest nodata pixel share an available modality may have.
        storage_options: fsspec options for remote stores.
        encoded: yield verified compressed chunks (:class:`EncodedTileBatch`) for an
            :class:`EncodedBatchDecoder` on the device, instead of decoded tiles.
    """

    def __init__(
        self,
        path: str,
        samples: np.ndarray,
        available: np.ndarray,
        worldcover_hist: np.ndarray,
        dominant_class: np.ndarray,
        modalities: Sequence[str],
        nodata_threshold: float = 0.5,
        storage_options: Mapping[str, Any] | None = None,
        encoded: bool = False,
    ) -> None:
        self.path = path
        self._columns = {
            "index": shared_array(np.asarray(samples, np.int64)),
            "available": shared_array(np.asarray(available, bool)),
            "worldcover_hist": shared_array(np.asarray(worldcover_hist, np.float32)),
            "dominant_class": shared_array(np.asarray(dominant_class, np.int64)),
        }
        self.modalities = [m for m in MODALITIES if m in set(modalities)]
        self.nodata_threshold = nodata_threshold
        self.storage_options = dict(storage_options or {})
        self.encoded = encoded
        self._reader: ShardReader | None = None
        self._pool: BufferPool | None = None

    @classmethod
    def from_store(
        cls,
        path: str,
        modalities: Sequence[str] = MODALITIES,
        nodata_threshold: float = 0.5,
        storage_options: Mapping[str, Any] | None = None,
        encoded: bool = False,
    ) -> StoreTileDataset:
        """Every sample of the store at ``path``, in store order (no split, no written filter).

        Each stored modality of ``modalities`` is read, whatever its stored nodata share; the
        ``nodata_threshold`` applies to the tiles read. For tools and tests that read a whole
        store; :class:`TerraFMDataModule` builds its own selection.
        """
        meta = SampleMetadata(open_store(path, storage_options=storage_options))
        return cls(
            path,
            np.arange(len(meta.written)),
            meta.selected(modalities, 1.0),
            meta.worldcover_hist,
            meta.dominant_class,
            modalities,
            nodata_threshold,
            storage_options,
            encoded=encoded,
        )

    @property
    def samples(self) -> np.ndarray:
        """(N,) store sample indices."""
        return self._columns["index"].numpy()

    @property
    def available(self) -> np.ndarray:
        """(N, 3) modalities read per sample."""
        return self._columns["available"].numpy()

    @property
    def worldcover_hist(self) -> np.ndarray:
        """(N, 11) WorldCover class shares."""
        return self._columns["worldcover_hist"].numpy()

    @property
    def dominant_class(self) -> np.ndarray:
        """(N,) dominant WorldCover codes."""
        return self._columns["dominant_class"].numpy()

    def __len__(self) -> int:
        return len(self._columns["index"])

    def __getstate__(self) -> dict[str, Any]:
        # Workers open their own handles; an open zarr group never crosses a process boundary.
        return {**self.__dict__, "_reader": None, "_pool": None}

    def open(self) -> ShardReader:
        """The store's chunk reader in this process (opened on first use)."""
        if self._reader is None:
            root = open_store(self.path, storage_options=self.storage_options)
            missing = [m for m in self.modalities if m not in root.attrs["modalities"]]
            if missing:
                raise StoreError(f"store {self.path} has no modality {missing}")
            try:
                self._reader = ShardReader(root, self.modalities)
            except StoreError as err:
                raise StoreError(f"store {self.path}: {err}") from err
        return self._reader

    @property
    def codecs(self) -> set[str]:
        """The chunk codecs of the selected pixel arrays."""
        return {layout.codec for layout in self.open().layouts.values()}

    def batch_decoder(self, device: DeviceDecoder) -> EncodedBatchDecoder:
        """The decoder of this dataset's encoded batches on ``device.device``."""
        return EncodedBatchDecoder(
            self.open().layouts, self.modalities, self.nodata_threshold, device
        )

    def _metadata(self, positions: torch.Tensor) -> dict[str, torch.Tensor]:
        return {key: self._columns[key][positions] for key in METADATA_KEYS}

    def _fetch(
        self, indices: Sequence[int], available: np.ndarray
    ) -> dict[str, list[Buffer | None]]:
        """Stored chunks per modality and row (None: not read or never written)."""
        reader = self.open()
        wanted = [
            (m, row)
            for row in range(len(indices))
            for m in self.modalities
            if available[row, MODALITIES.index(m)]
        ]
        fetched = reader.chunks([(m, int(indices[row])) for m, row in wanted])
        chunks: dict[str, list[Buffer | None]] = {m: [None] * len(indices) for m in self.modalities}
        for (m, row), chunk in zip(wanted, fetched, strict=True):
            if isinstance(chunk, BaseException):
                self._fail(m, indices[row], chunk)
            chunks[m][row] = chunk
        return chunks

    def _fail(self, modality: str, index: int, err: BaseException) -> NoReturn:
        shard = self.open().shard_key(modality, int(index))
        raise TileReadError(
            f"store {self.path}: cannot read {modality} of sample {index} (shard {shard}): "
            f"{type(err).__name__}: {err}"
        ) from err

    def __getitems__(self, positions: Sequence[int]) -> TileBatch | EncodedTileBatch:
        """The batch of ``positions``: decoded tiles, or compressed chunks if :attr:`encoded`."""
        meta = self._metadata(torch.as_tensor(positions, dtype=torch.int64))
        indices = meta["index"].tolist()
        chunks = self._fetch(indices, meta["available"].numpy())
        if self.encoded:
            return inline_small_tensors(self._encoded_batch(meta, chunks, indices), METADATA_KEYS)
        batch: dict[str, Any] = dict(meta)
        for m in self.modalities:
            layout = self._reader.layouts[m]
            shape = (len(indices), *layout.chunk_shape[1:])
            pixels, batch[m] = self._pixels(shape, _torch_dtype(layout))
            column = MODALITIES.index(m)
            for row, chunk in enumerate(chunks[m]):
                tile = pixels[row]
                if chunk is None:  # not read (absent) or never written (fill value)
                    tile.numpy().fill(NODATA[m] if meta["available"][row, column] else 0)
                    continue
                try:
                    layout.decode_into(chunk.as_numpy_array(), tile.numpy())
                except Exception as err:  # any codec or checksum failure names the tile
                    self._fail(m, indices[row], err)
            # Rows scanned one by one while they are still in cache.
            for row in range(len(indices)):
                keep = replace_nodata(
                    pixels[row : row + 1],
                    m,
                    meta["available"][row : row + 1, column],
                    self.nodata_threshold,
                )
                meta["available"][row, column] = keep[0]
        self._check_not_empty(meta["available"], indices)
        return inline_small_tensors(batch, METADATA_KEYS)

    def _pixels(self, shape: Sequence[int], dtype: torch.dtype) -> tuple[torch.Tensor, Any]:
        """A batch buffer to decode into and what the batch returns for it (see BufferPool)."""
        if get_worker_info() is None:
            tensor = shared_empty(shape, dtype)
            return tensor, tensor
        if self._pool is None:
            self._pool = BufferPool()
        return self._pool.take(shape, dtype)

    def _check_not_empty(self, available: torch.Tensor, indices: Sequence[int]) -> None:
        empty = (~available.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise TileReadError(
                f"store {self.path}: sample {indices[empty[0]]} has no modality with nodata "
                f"share <= {self.nodata_threshold} among {self.modalities}"
            )

    def _encoded_batch(
        self,
        meta: dict[str, torch.Tensor],
        chunks: dict[str, list[Buffer | None]],
        indices: Sequence[int],
    ) -> EncodedTileBatch:
        """The batch's compressed frames, checksums verified and stripped, one buffer each."""
        batch: dict[str, Any] = {**meta, "chunks": {}, "chunk_offsets": {}}
        for m, row_chunks in chunks.items():
            layout = self._reader.layouts[m]
            frames = []
            for row, chunk in enumerate(row_chunks):
                try:
                    frames.append(None if chunk is None else layout.frame(chunk.as_numpy_array()))
                except ValueError as err:
                    self._fail(m, indices[row], err)
            sizes = [0 if f is None else len(f) for f in frames]
            offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()
            data = shared_empty((offsets[-1],), torch.uint8)
            flat = data.numpy()
            for frame, start, stop in zip(frames, offsets[:-1], offsets[1:], strict=True):
                if frame is not None:
                    flat[start:stop] = frame
            batch["chunks"][m] = data
            batch["chunk_offsets"][m] = offsets
        return batch

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        """One tile (the batch of one, unbatched): for code that reads tile by tile."""
        return {key: value[0] for key, value in self.__getitems__([k]).items()}


class EncodedBatchDecoder:
    """Decodes the :class:`EncodedTileBatch` of a dataset on ``device.device`` into a TileBatch.

    The same result as the workers' CPU decode, except that a row left without any available
    modality is not reported (that check would synchronise with the device).

    Args:
        layouts: chunk layout per modality (the dataset's :class:`ShardReader` layouts).
        modalities: modalities of the batches.
        nodata_threshold: the dataset's nodata threshold.
        device: the device decoder (nvCOMP, or the host decoder).
    """

    def __init__(
        self,
        layouts: Mapping[str, ChunkLayout],
        modalities: Sequence[str],
        nodata_threshold: float,
        device: DeviceDecoder,
    ) -> None:
        self.layouts = dict(layouts)
        self.modalities = list(modalities)
        self.nodata_threshold = nodata_threshold
        self.device = device

    def decode(self, batch: EncodedTileBatch) -> TileBatch:
        """Decode a batch whose tensors already lie on ``self.device.device``."""
        device = self.device.device
        out: dict[str, Any] = {k: v for k, v in batch.items() if k not in ENCODED_KEYS}
        available = out["available"].clone()
        rows = len(available)
        for m in self.modalities:
            layout = self.layouts[m]
            column = MODALITIES.index(m)
            offsets = batch["chunk_offsets"][m]
            data = batch["chunks"][m]
            dtype = _torch_dtype(layout)
            # Zeroed through a signed view: CUDA fills no unsigned 16-bit tensor.
            pixels = torch.zeros(
                (rows, *layout.chunk_shape[1:]), dtype=_signed(dtype), device=device
            ).view(dtype)
            present = [row for row in range(rows) if offsets[row + 1] > offsets[row]]
            self.device.decode(
                layout,
                [data[offsets[row] : offsets[row + 1]] for row in present],
                [pixels[row] for row in present],
            )
            unwritten = sorted(set(range(rows)) - set(present))
            if unwritten and pixels.is_floating_point():  # fill value where a chunk is missing
                rows_index = torch.tensor(unwritten, device=device)
                fill = torch.where(available[rows_index, column], NODATA[m], 0.0).to(dtype)
                pixels[rows_index] = fill.view(-1, 1, 1, 1).expand(-1, *pixels.shape[1:])
            available[:, column] = replace_nodata(
                pixels, m, available[:, column], self.nodata_threshold
            )
            out[m] = pixels
        out["available"] = available
        return out


def _torch_dtype(layout: ChunkLayout) -> torch.dtype:
    return torch.from_numpy(np.empty(0, layout.dtype)).dtype


def _signed(dtype: torch.dtype) -> torch.dtype:
    """A dtype of the same width that every device can fill."""
    if dtype.is_floating_point:
        return dtype
    return {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
